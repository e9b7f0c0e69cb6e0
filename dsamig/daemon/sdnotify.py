"""The systemd notification protocol, without libsystemd.

systemd passes ``$NOTIFY_SOCKET``: an ``AF_UNIX`` datagram socket, a path or,
with a leading ``@``, a name in the abstract namespace.  A message is one
datagram of newline-separated ``KEY=VALUE`` lines (``READY=1``,
``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``, ``RELOADING=1``).  Without
the variable every call is a no-op, so the daemons run the same under
systemd, in a terminal and in tests.  Send failures are ignored, as
sd_notify(3) recommends: the service must not die because the manager is
busy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends sd_notify messages to ``address`` (None: does nothing)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        #: The watchdog period systemd expects pings within, in seconds (None: off).
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        The watchdog applies only when ``WATCHDOG_PID`` is unset or names this
        process: a child that inherited the environment must not ping for its
        parent.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", "")) or None
        except ValueError:
            usec = None
        pid = env.get("WATCHDOG_PID")
        if usec is not None and pid and pid != str(os.getpid()):
            usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a manager to notify."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the period, as systemd advises."""
        return None if self.watchdog_s is None else self.watchdog_s / 2

    def send(self, **fields: str | int) -> bool:
        """Send one message (``READY=1`` is ``send(READY=1)``); True if it left."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            # A STATUS with a newline would split into a bogus second field.
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}")
        payload = "\n".join(lines).encode("utf-8", "replace")
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, target)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        """``READY=1`` with a status line."""
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        """``STATUS=``: one line that ``systemctl status`` shows."""
        self.send(STATUS=status)

    def watchdog(self) -> None:
        """``WATCHDOG=1``: the main loop is alive."""
        self.send(WATCHDOG=1)

    def reloading(self) -> None:
        """``RELOADING=1``; a ``READY=1`` ends the reload."""
        self.send(RELOADING=1)

    def stopping(self, status: str) -> None:
        """``STOPPING=1`` with a status line."""
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        """Release the socket (sending again reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
