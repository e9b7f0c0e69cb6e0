"""The control API's server: a Unix socket speaking :mod:`dsamig.control.protocol`.

A bad request (garbage, an over-long line, an unknown command, bad
arguments) gets an error reply and the connection goes on; a handler that
raises unexpectedly gets an ``InternalError`` reply and is logged; a client
that disconnects mid-request or stops reading its events is dropped without
affecting anything else.  The socket file is created with mode 0660 (never
wider, whatever the umask), a stale one left by a crashed daemon is replaced,
a live one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from dsamig.control.protocol import (
    EVENTS,
    MAX_REQUEST_LINE,
    PROTOCOL_VERSION,
    CommandError,
    ErrorClass,
    Request,
    encode_line,
    error_reply,
    event_message,
    parse_request,
    request_id_of,
    with_id,
)
from dsamig.errors import DsamigError, NetworkError
from dsamig.logs import get_logger
from dsamig.runtime import bounded

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

SOCKET_MODE = 0o660
#: sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
#: A client whose unread output grows past this is too slow: it is dropped.
MAX_BACKLOG = 4 * 1024 * 1024
REPLY_DRAIN_S = 10.0


class ControlConnection:
    """One client: its writer and the events it subscribed to."""

    def __init__(self, writer: asyncio.StreamWriter, server: ControlServer) -> None:
        self.writer = writer
        self.server = server
        self.events: frozenset[str] = frozenset()

    @property
    def closed(self) -> bool:
        """Whether the connection is closing or closed."""
        return self.writer.is_closing()

    def send(self, message: dict[str, Any]) -> None:
        """Queue one line; drop the client if it stopped reading."""
        if self.closed:
            return
        self.writer.write(encode_line(message))
        if self.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.server.log.warning("control client too slow, dropped")
            # abort, not close: close would wait for the client to read the backlog.
            self.writer.transport.abort()

    async def flush(self) -> None:
        """Wait (bounded) until the client took what we sent; drop it if it does not."""
        if self.closed:
            return
        try:
            await bounded(self.writer.drain(), REPLY_DRAIN_S)
        except TimeoutError:
            self.writer.transport.abort()
        except ConnectionError:
            # The client is gone; the complete lines already read from it are
            # still executed (a job-start followed by a hang-up starts the job).
            pass


class ControlServer:
    """Serves ``commands`` (name → ``async handler(arguments)``) on ``path``.

    ``subscribe``, ``unsubscribe`` and ``query-commands`` are built in;
    :meth:`broadcast` sends an event to the clients that subscribed to it.
    """

    def __init__(
        self,
        path: str,
        commands: dict[str, Handler],
        greeting: dict[str, Any],
        *,
        max_clients: int = 64,
        group: str | None = None,
    ) -> None:
        self.path = path
        self.group = group
        self.commands: dict[str, Handler] = {
            "query-commands": self._query_commands,
            **commands,
        }
        self.greeting = greeting
        self.max_clients = max_clients
        self.connections: set[ControlConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def log(self) -> Any:
        return get_logger(component="control")  # at each use: the level may change

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket (mode 0660) and start serving."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise NetworkError(
                f"control socket path {self.path!r} is longer than {MAX_SOCKET_PATH} bytes"
            )
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # The umask decides the mode bind() creates the file with: make it
        # 0660 from the start, so there is no moment the socket is wider.
        old_umask = os.umask(0o777 & ~SOCKET_MODE)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise NetworkError(
                f"cannot create control socket {self.path!r}: {exc.strerror or exc}"
            ) from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        if self.group is not None:
            # Mode 0660: the daemon's user and this group, nobody else.
            try:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            except (KeyError, OSError) as exc:
                sock.close()
                os.unlink(self.path)
                reason = "no such group" if isinstance(exc, KeyError) else exc.strerror
                raise NetworkError(
                    f"cannot give control socket {self.path!r} to group {self.group!r}: {reason}"
                ) from None
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    def _clear_stale(self) -> None:
        directory = os.path.dirname(self.path) or "."
        if not os.path.isdir(directory):
            raise NetworkError(f"control socket directory {directory!r} does not exist")
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise NetworkError(f"{self.path!r} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(2.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: left behind by a daemon that did not stop cleanly.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as exc:
            raise NetworkError(
                f"control socket {self.path!r} exists and cannot be checked: {exc.strerror or exc}"
            ) from None
        finally:
            probe.close()
        raise NetworkError(f"control socket {self.path!r} is in use by another running daemon")

    async def close(self) -> None:
        """Stop listening, drop every client, remove the socket file if it is ours."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await bounded(self._server.wait_closed(), 2.0)
            self._server = None
        if self._inode is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
            self._inode = None

    # --- events ---------------------------------------------------------------

    def broadcast(self, name: str, data: dict[str, Any]) -> None:
        """Send event ``name`` to every client subscribed to it."""
        message = event_message(name, data)
        for conn in list(self.connections):
            if name in conn.events:
                conn.send(message)

    # --- connections ------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = ControlConnection(writer, self)
        try:
            if len(self.connections) >= self.max_clients:
                conn.send(error_reply(ErrorClass.UNAVAILABLE,
                                      f"too many control clients ({self.max_clients})"))
                await conn.flush()
                return
            self.connections.add(conn)
            conn.send({"dsamig": {**self.greeting, "protocol": PROTOCOL_VERSION,
                                  "commands": sorted({*self.commands, "subscribe",
                                                      "unsubscribe"})}})
            await conn.flush()
            await self._read_requests(reader, conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing of ours depends on it
        except asyncio.CancelledError:
            # close() tears the connection down.  Ending normally rather than
            # cancelled keeps asyncio's stream callback from logging an error.
            pass
        finally:
            self.connections.discard(conn)
            self._tasks.discard(task)
            writer.close()

    async def _read_requests(self, reader: asyncio.StreamReader, conn: ControlConnection) -> None:
        buffer = bytearray()
        discarding = False  # inside an over-long line: drop bytes up to its newline
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return  # an unterminated last line is never executed
            buffer += chunk
            while True:
                newline = buffer.find(b"\n")
                if newline < 0:
                    break
                line = bytes(buffer[:newline])
                del buffer[: newline + 1]
                if discarding:
                    discarding = False
                    continue
                if line.strip():
                    conn.send(await self._handle(line, conn))
                    await conn.flush()
            if len(buffer) > MAX_REQUEST_LINE:
                if not discarding:
                    conn.send(error_reply(
                        ErrorClass.GENERIC, f"request line longer than {MAX_REQUEST_LINE} bytes"
                    ))
                    await conn.flush()
                discarding = True
                buffer.clear()

    async def _handle(self, line: bytes, conn: ControlConnection) -> dict[str, Any]:
        try:
            request = parse_request(line)
        except CommandError as exc:
            return with_id(error_reply(exc.error_class, exc.desc), request_id_of(exc))
        try:
            return request.reply({"return": await self._execute(request, conn)})
        except CommandError as exc:
            return request.reply(error_reply(exc.error_class, exc.desc))
        except DsamigError as exc:
            return request.reply(error_reply(ErrorClass.INVALID_ARGUMENT, str(exc)))
        except Exception as exc:  # a bug must cost one reply, not the daemon
            self.log.exception("control command failed", command=request.execute)
            return request.reply(error_reply(ErrorClass.INTERNAL,
                                             f"{request.execute}: {type(exc).__name__}: {exc}"))

    async def _execute(self, request: Request, conn: ControlConnection) -> Any:
        name = request.execute
        if name in ("subscribe", "unsubscribe"):
            return self._subscribe(request.arguments, conn, name == "subscribe")
        handler = self.commands.get(name)
        if handler is None:
            raise CommandError(ErrorClass.COMMAND_NOT_FOUND, f"unknown command {name!r}")
        return await handler(request.arguments)

    def _subscribe(self, arguments: dict[str, Any], conn: ControlConnection,
                   on: bool) -> dict[str, Any]:
        expect_keys(arguments, optional=("events",))
        names = arguments.get("events", list(EVENTS))
        if not isinstance(names, list) or not all(n in EVENTS for n in names):
            raise CommandError(ErrorClass.INVALID_ARGUMENT,
                               f"events must be a list of {', '.join(EVENTS)}")
        conn.events = conn.events | set(names) if on else conn.events - set(names)
        return {"events": sorted(conn.events)}

    async def _query_commands(self, arguments: dict[str, Any]) -> list[dict[str, str]]:
        expect_keys(arguments)
        return [{"name": name} for name in sorted({*self.commands, "subscribe", "unsubscribe"})]


def expect_keys(
    arguments: dict[str, Any], required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> None:
    """Refuse unknown and missing arguments with an InvalidArgument error."""
    allowed = (*required, *optional)
    for key in arguments:
        if key not in allowed:
            listed = ", ".join(allowed) or "none"
            raise CommandError(ErrorClass.INVALID_ARGUMENT,
                               f"unknown argument {key!r} (allowed: {listed})")
    for key in required:
        if key not in arguments:
            raise CommandError(ErrorClass.INVALID_ARGUMENT, f"missing argument {key!r}")
