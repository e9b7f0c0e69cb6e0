"""The long-running services: lifecycle, signals, sd_notify, pacing, metrics.

:class:`~dsamig.daemon.receiver.ReceiverDaemon` and
:class:`~dsamig.daemon.sender.SenderDaemon` share
:class:`~dsamig.daemon.base.Daemon`; :class:`DaemonCommand` is what the CLI
runs.
"""

from dsamig.daemon.command import DaemonCommand

__all__ = ["DaemonCommand"]
