"""Live transfers: change detection between rounds and control of the image's writer.

* :mod:`dsamig.live.dirty` — which pages may differ from what the receiver
  holds (the dirty-source seam and its content-fingerprint implementation);
* :mod:`dsamig.live.pause` — pausing and resuming the writer (shell commands
  or QMP), resumed on every failure;
* :mod:`dsamig.live.qmp` — the QMP client.

No module here imports the transport or the protocol: the send core decides
rounds, these pieces answer its questions.
"""
