"""The control API's client, used by ``dsamig start/status/stop/jobs`` and tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from dsamig.control.protocol import MAX_REPLY_LINE, ErrorClass, encode_line
from dsamig.errors import DsamigError, NetworkError
from dsamig.runtime import bounded
from dsamig.settings import EXIT_TRANSFER, EXIT_USAGE


class ControlError(DsamigError):
    """The daemon answered a command with an error reply."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc
        # The caller asked for something wrong, unless the daemon could not serve.
        self.exit_code = (
            EXIT_TRANSFER
            if error_class in (ErrorClass.UNAVAILABLE, ErrorClass.INTERNAL)
            else EXIT_USAGE
        )


class ControlClient:
    """One connection to a daemon's control socket.

    Replies are matched to requests in order; event lines (after
    ``subscribe``) are queued for :meth:`next_event`.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: dict[str, Any],
        path: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = greeting
        self.path = path
        self._pending: list[asyncio.Future[dict[str, Any]]] = []
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._next_id = 0
        self._lost: DsamigError | None = None
        self._reader_task = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, path: str, timeout_s: float = 5.0) -> ControlClient:
        """Connect and read the greeting; NetworkError when there is no daemon."""
        try:
            reader, writer = await bounded(
                asyncio.open_unix_connection(path, limit=MAX_REPLY_LINE), timeout_s
            )
        except TimeoutError:
            raise NetworkError(f"control socket {path!r}: no answer in {timeout_s:g} s") from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise NetworkError(
                f"cannot connect to control socket {path!r}: no daemon is listening there"
            ) from None
        except PermissionError:
            raise NetworkError(
                f"cannot connect to control socket {path!r}: permission denied "
                "(is this user in the daemon's group?)"
            ) from None
        except OSError as exc:
            raise NetworkError(
                f"cannot connect to control socket {path!r}: {exc.strerror or exc}"
            ) from None
        try:
            line = await bounded(reader.readline(), timeout_s)
            greeting = json.loads(line)
        except (TimeoutError, ValueError, ConnectionError):
            greeting = None
        if not isinstance(greeting, dict) or "dsamig" not in greeting:
            writer.close()
            if isinstance(greeting, dict) and "error" in greeting:  # e.g. too many clients
                error = greeting["error"]
                raise ControlError(str(error.get("class")), str(error.get("desc")))
            raise NetworkError(f"control socket {path!r} did not greet like a dsamig daemon")
        return cls(reader, writer, greeting["dsamig"], path)

    @property
    def role(self) -> str:
        """The daemon's role from its greeting: ``sender`` or ``receiver``."""
        return str(self.greeting.get("role", "?"))

    async def _read(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "event" in message:
                    self._events.put_nowait(message)
                elif self._pending:
                    future = self._pending.pop(0)
                    if not future.done():
                        future.set_result(message)
        except (ValueError, ConnectionError) as exc:
            self._lost = NetworkError(f"control connection to {self.path!r} broke: {exc}")
        finally:
            if self._lost is None:
                self._lost = NetworkError(f"the daemon at {self.path!r} closed the connection")
            for future in self._pending:
                if not future.done():
                    future.set_exception(self._lost)
            self._pending.clear()
            self._events.put_nowait(None)

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout_s: float = 30.0
    ) -> Any:
        """Run ``command``; its ``return`` value, or ControlError with the daemon's words."""
        if self._lost is not None:
            raise self._lost
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        try:
            self.writer.write(encode_line(request))
            await self.writer.drain()
            reply = await bounded(future, timeout_s)
        except TimeoutError:
            raise NetworkError(f"{command}: no answer from the daemon in {timeout_s:g} s") from None
        except ConnectionError as exc:
            raise NetworkError(f"control connection to {self.path!r} broke: {exc}") from None
        if "error" in reply:
            error = reply["error"]
            raise ControlError(str(error.get("class")), str(error.get("desc")))
        return reply.get("return")

    async def next_event(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The next event line; NetworkError once the daemon has gone."""
        event = await bounded(self._events.get(), timeout_s)
        if event is None:
            self._events.put_nowait(None)  # every later call fails the same way
            assert self._lost is not None
            raise self._lost
        return event

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        self.writer.close()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._reader_task
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
