"""The control API: newline-delimited JSON on a Unix socket, in the style of QMP.

``protocol`` has the messages, ``server`` the daemon side, ``client`` the
client, ``commands`` the CLI commands built on it (start, status, stop, jobs).
"""

from dsamig.control.client import ControlClient, ControlError
from dsamig.control.protocol import CommandError, ErrorClass

__all__ = ["CommandError", "ControlClient", "ControlError", "ErrorClass"]
