"""A job's figures, kept once, by the job core of each side.

The transport reads them for ``--json``, the progress display and the
metrics; QEMU's names (``duplicate`` for zero pages, ``normal``,
``normal-bytes``) appear only where the JSON is written (``dsamig.stats``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class JobCounters:
    """The figures of one job, on either side."""

    #: Pages of the image known to be zero / to hold data, so far. Both sides
    #: count the whole image, packets held from an earlier attempt included:
    #: COMMIT_REQUEST compares these.
    zero_pages: int = 0
    normal_pages: int = 0
    #: Bytes of the image handled so far (zero or stored): how far the job has come.
    done_bytes: int = 0
    #: Payload bytes of normal pages that crossed the wire in this job, the
    #: first time each; packets the receiver already held are not counted.
    normal_bytes: int = 0
    #: Payload bytes sent (or received) a second time after a broken session.
    retransmitted_bytes: int = 0
    #: Packets the receiver already held when the job (re)started, and the
    #: share of zero_pages, normal_pages and done_bytes they make up: the
    #: job's figures cover the whole image, a daemon's counters only what it
    #: moved itself.
    resumed_packets: int = 0
    reused_zero_pages: int = 0
    reused_normal_pages: int = 0
    reused_bytes: int = 0
    #: Sessions the job opened: 1, plus one per reconnect.
    sessions: int = 0


__all__ = ["JobCounters"]
