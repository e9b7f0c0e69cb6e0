"""A small QMP client: QEMU's JSON machine protocol on a Unix socket.

Only what a live transfer needs: negotiate capabilities, stop and continue the
guest and prove it with ``query-status``, and drive a device-state migration
(``migrate-set-capabilities``, ``migrate``, ``migrate-incoming``,
``query-migrate``).  Every wait is bounded by the client's ``timeout_s`` or
by the caller's; a reply line is bounded in size; events that arrive between
replies are kept, the newest ``EVENTS_KEPT`` of them.

Connect for the operation and close afterwards: a QMP monitor serves one
client at a time, and an operator may need it between our operations.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from dsamig.errors import DsamigError

#: Longest reply line accepted (``query-migrate`` is a few hundred bytes).
MAX_LINE_BYTES = 1 << 20
#: Events kept for inspection (``client.events``).
EVENTS_KEPT = 256
#: Migration states after which ``query-migrate`` changes no more.
MIGRATION_DONE = ("completed", "failed", "cancelled")


class QmpError(DsamigError):
    """A QMP exchange failed: no monitor, a timeout, a broken reply or an error reply.

    ``error_class`` is QEMU's class (``GenericError``, ``CommandNotFound``...)
    for an error reply, else ``None``.
    """

    def __init__(self, message: str, error_class: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class


class QmpClient:
    """One connection to a QMP monitor, after capabilities negotiation.

    Use :meth:`connect` (or ``async with await QmpClient.connect(...)``);
    commands run one at a time.
    """

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.greeting: dict[str, Any] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._next_id = 0

    @classmethod
    async def connect(cls, path: str, *, timeout_s: float = 5.0) -> QmpClient:
        """Connect to the monitor at ``path``, read its greeting, enter command mode."""
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
        except TimeoutError:
            raise QmpError(f"QMP socket {path}: no connection within {timeout_s:g} s") from None
        except OSError as exc:
            raise QmpError(f"QMP socket {path}: cannot connect: {exc.strerror or exc}") from None
        client = cls(path, reader, writer, timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                greeting = await client._read_message()
                if "QMP" not in greeting:
                    raise QmpError(f"QMP socket {path}: expected a QMP greeting, got "
                                   f"{_short(greeting)}")
                client.greeting = greeting["QMP"]
            await client.execute("qmp_capabilities")
        except TimeoutError:
            await client.close()
            raise QmpError(f"QMP socket {path}: no greeting within {timeout_s:g} s") from None
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> QmpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (idempotent, bounded)."""
        if self._writer.is_closing():
            return
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await self._writer.wait_closed()

    async def _read_message(self) -> dict[str, Any]:
        try:
            line = await self._reader.readline()
        except (asyncio.LimitOverrunError, ValueError):
            raise QmpError(f"QMP socket {self.path}: a reply longer than "
                           f"{MAX_LINE_BYTES} bytes") from None
        except OSError as exc:
            raise QmpError(f"QMP socket {self.path}: {exc.strerror or exc}") from None
        if not line:
            raise QmpError(f"QMP socket {self.path}: the monitor closed the connection")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpError(f"QMP socket {self.path}: not JSON: {_short(line)}") from None
        if not isinstance(message, dict):
            raise QmpError(f"QMP socket {self.path}: not a JSON object: {_short(message)}")
        return message

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout_s: float | None = None) -> Any:
        """Run ``command`` and return its ``return`` value.

        An ``error`` reply raises :class:`QmpError` with QEMU's class and
        description; no reply within ``timeout_s`` (the client's by default)
        raises :class:`QmpError` too, and the connection is closed, since a
        late reply would be taken for the next command's.
        """
        bound = self.timeout_s if timeout_s is None else timeout_s
        async with self._lock:
            if self._writer.is_closing():
                raise QmpError(f"QMP {command} on {self.path}: the connection is closed "
                               f"(an earlier command failed, timed out or was cancelled)")
            self._next_id += 1
            ident = f"dsamig-{self._next_id}"
            request: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                request["arguments"] = arguments
            try:
                async with asyncio.timeout(bound):
                    self._writer.write(json.dumps(request).encode() + b"\n")
                    await self._writer.drain()
                    while True:
                        message = await self._read_message()
                        if "event" in message:
                            self.events.append(message)
                            continue
                        if message.get("id") != ident:
                            raise QmpError(f"QMP socket {self.path}: a reply to another "
                                           f"command: {_short(message)}")
                        break
            except TimeoutError:
                self._writer.close()
                raise QmpError(f"QMP {command} on {self.path}: no reply within "
                               f"{bound:g} s") from None
            except OSError as exc:
                self._writer.close()
                raise QmpError(f"QMP {command} on {self.path}: "
                               f"{exc.strerror or exc}") from None
            except BaseException:
                # Cancelled or broken in mid-exchange: a late reply would be
                # taken for the next command's, so this connection is done.
                self._writer.close()
                raise
        if "error" in message:
            error = message["error"] if isinstance(message["error"], dict) else {}
            raise QmpError(f"QMP {command} on {self.path}: "
                           f"{error.get('desc', 'failed')}", error.get("class"))
        if "return" not in message:
            raise QmpError(f"QMP {command} on {self.path}: a reply without a return value: "
                           f"{_short(message)}")
        return message["return"]

    async def query_status(self) -> dict[str, Any]:
        """``query-status``: ``{"status": "running" | "paused" | ..., "running": bool}``."""
        status = await self.execute("query-status")
        if not isinstance(status, dict) or not isinstance(status.get("running"), bool):
            raise QmpError(f"QMP query-status on {self.path}: unexpected reply {_short(status)}")
        return status

    async def wait_status(self, running: bool, *, timeout_s: float | None = None,
                          poll_s: float = 0.02) -> dict[str, Any]:
        """Poll ``query-status`` until the guest is (not) running; bounded."""
        bound = self.timeout_s if timeout_s is None else timeout_s
        want = "running" if running else "stopped"
        status: dict[str, Any] = {}
        try:
            async with asyncio.timeout(bound):
                while True:
                    status = await self.query_status()
                    if status["running"] == running:
                        return status
                    await asyncio.sleep(poll_s)
        except TimeoutError:
            raise QmpError(f"QMP on {self.path}: the guest is not {want} after {bound:g} s "
                           f"(status {status.get('status', 'unknown')!r})") from None

    async def stop(self) -> dict[str, Any]:
        """Pause the guest's vCPUs and check that ``query-status`` says so."""
        await self.execute("stop")
        return await self.wait_status(False)

    async def cont(self) -> dict[str, Any]:
        """Resume the guest's vCPUs and check that ``query-status`` says so."""
        await self.execute("cont")
        return await self.wait_status(True)

    async def migrate_set_capabilities(self, capabilities: dict[str, bool]) -> None:
        """Set migration capabilities, e.g. ``{"x-ignore-shared": True}``."""
        await self.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": name, "state": state} for name, state in capabilities.items()]})

    async def migrate(self, uri: str) -> None:
        """Start an outgoing migration to ``uri`` (``unix:PATH``, ``tcp:HOST:PORT``...)."""
        await self.execute("migrate", {"uri": uri})

    async def migrate_incoming(self, uri: str) -> None:
        """Listen for an incoming migration on ``uri`` (QEMU started with ``-incoming defer``)."""
        await self.execute("migrate-incoming", {"uri": uri})

    async def query_migrate(self) -> dict[str, Any]:
        """``query-migrate``: the state and figures of the current or last migration."""
        info = await self.execute("query-migrate")
        if not isinstance(info, dict):
            raise QmpError(f"QMP query-migrate on {self.path}: unexpected reply {_short(info)}")
        return info

    async def wait_migration(self, *, timeout_s: float, poll_s: float = 0.02,
                             done: Iterable[str] = MIGRATION_DONE) -> dict[str, Any]:
        """Poll ``query-migrate`` until the migration ends; return its last figures.

        A ``failed`` or ``cancelled`` migration raises :class:`QmpError` with
        QEMU's ``error-desc``; so does one still going after ``timeout_s``.
        """
        states = tuple(done)
        info: dict[str, Any] = {}
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    info = await self.query_migrate()
                    if info.get("status") in states:
                        break
                    await asyncio.sleep(poll_s)
        except TimeoutError:
            raise QmpError(f"QMP on {self.path}: migration still {info.get('status')!r} after "
                           f"{timeout_s:g} s") from None
        if info["status"] != "completed":
            raise QmpError(f"QMP on {self.path}: migration {info['status']}: "
                           f"{info.get('error-desc', 'no reason given')}")
        return info

    def take_events(self, match: Callable[[dict[str, Any]], bool] | None = None
                    ) -> list[dict[str, Any]]:
        """Remove and return the kept events (those ``match`` accepts, when given)."""
        taken = [e for e in self.events if match is None or match(e)]
        kept = [e for e in self.events if e not in taken]
        self.events.clear()
        self.events.extend(kept)
        return taken


def _short(value: object, limit: int = 200) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else repr(value)
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["EVENTS_KEPT", "MAX_LINE_BYTES", "MIGRATION_DONE", "QmpClient", "QmpError"]
