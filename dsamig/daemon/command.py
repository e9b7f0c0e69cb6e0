"""``dsamig receiver`` and ``dsamig sender``: load the config, run the daemon."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dsamig.daemon.base import Daemon
from dsamig.logs import configure
from dsamig.native import impl
from dsamig.runtime import run_loop
from dsamig.settings import EXIT_OK


@dataclass
class DaemonCommand:
    """Run the ``role`` daemon from ``config_path`` in the foreground.

    ``log_level`` overrides the config's ``log_level``; ``check_only``
    validates the config and runs every check start-up makes (the same
    functions: :meth:`Daemon.checks`), then exits, for ``ExecStartPre=``.
    A running daemon holds its addresses and control socket, so this fails
    while it runs, as a second start would.
    """

    role: str
    config_path: str
    log_level: str | None = None
    check_only: bool = False

    def build(self) -> Daemon:
        """The daemon, its config validated (ConfigError if not valid)."""
        from dsamig.daemon.receiver import ReceiverDaemon
        from dsamig.daemon.sender import SenderDaemon

        cls: type[Daemon] = ReceiverDaemon if self.role == "receiver" else SenderDaemon
        config = cls.load_config(self.config_path)
        return cls(config)

    def run(self) -> int:
        """Validate, then serve until stopped; the exit code."""
        daemon = self.build()
        if self.check_only:
            for warning in daemon.preflight():
                print(f"dsamig: warning: {warning}", file=sys.stderr, flush=True)
            print(f"{self.config_path}: valid {self.role} configuration; start-up checks passed",
                  flush=True)
            return EXIT_OK
        configure(self.log_level or daemon.config.log_level)
        # Names the loop thread for top -H: dsamig-receiver / dsamig-sender.
        impl.set_thread_name(f"dsamig-{self.role}")
        return run_loop(daemon.serve())
