"""A fault-injecting TCP proxy for the fault tests.

Put it between a sender and a receiver and give each connection it accepts a
:class:`Fault`: pass bytes through, delay them, flip one byte at an offset,
cut the connection after N bytes, or stall (stop forwarding, keep the
sockets open) after N bytes.  Offsets count the bytes of one direction of
one connection: ``up`` is sender → receiver (preamble, frames, payloads),
``down`` is receiver → sender.  Connections are numbered in the order they
are accepted; a sender connects channel 0 first and alone, so connection 0
is channel 0 of the first session.

It works on plain non-blocking sockets rather than asyncio streams, so that
each direction fails on its own, as on a real path: when one side resets,
what it had already sent still reaches the other side, then the reset does
(a stream transport would drop both directions at the first send error).

:class:`FaultProxy` runs on the caller's event loop (in-process tests);
:class:`ThreadedProxy` runs one in a thread of its own, for tests that drive
the ``dsamig`` command line in subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]
CHUNK = 65536


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one connection (all offsets in bytes of ``direction``)."""

    direction: Direction = "up"
    delay_s: float = 0.0  # before forwarding each chunk read in ``direction``
    corrupt_at: int | None = None  # XOR the byte at this offset with ``corrupt_xor``
    corrupt_xor: int = 0x01
    also_corrupt: tuple[tuple[int, int], ...] = ()  # more (offset, xor) pairs
    cut_after: int | None = None  # forward this many bytes, then reset both sides
    stall_after: int | None = None  # forward this many bytes, then forward nothing more


PASS = Fault()


@dataclass
class ConnectionLog:
    """What happened on one proxied connection."""

    index: int
    fault: Fault
    up_bytes: int = 0
    down_bytes: int = 0
    corrupted: bool = False
    cut: bool = False
    stalled: bool = False
    error: str = ""  # why the proxy could not forward (its own connect failed)
    events: list[str] = field(default_factory=list)  # EOFs and resets, in order


Plan = Fault | Sequence[Fault] | Callable[[int], Fault]


def _fault_for(plan: Plan, index: int) -> Fault:
    if isinstance(plan, Fault):
        return plan
    if callable(plan):
        return plan(index)
    return plan[index] if index < len(plan) else PASS


async def _sent(sock: socket.socket, bound_s: float = 5.0) -> None:
    """Wait (bounded) until the peer has acknowledged every byte we queued on
    ``sock``: a reset discards what is still in our send buffer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    while loop.time() < deadline:
        try:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                    struct.pack("i", 0)))[0]
        except OSError:
            return  # the socket is gone already
        if queued == 0:
            return
        await asyncio.sleep(0.001)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed or aborting peer does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Link:
    """The two sockets of one proxied connection and what both directions share."""

    def __init__(self, client: socket.socket, target: socket.socket, log: ConnectionLog) -> None:
        self.client = client
        self.target = target
        self.log = log
        self.frozen = asyncio.Event()  # stalled: neither direction forwards again
        self.directions_done = 0
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        """Reset both sockets; the other direction stops waiting on them first."""
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        _reset(self.client)
        _reset(self.target)

    async def forever(self) -> None:
        """Hold the connection open, forwarding nothing, until the proxy closes."""
        await asyncio.Event().wait()


class FaultProxy:
    """Listens on 127.0.0.1 and forwards each connection to ``target`` with its Fault.

    ``plan`` is one Fault for every connection, a list (connections past its
    end pass through), or a function of the connection index.
    """

    def __init__(self, target_port: int, plan: Plan = PASS, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.plan = plan
        self.connections: list[ConnectionLog] = []
        self.port = 0
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: set[socket.socket] = set()

    async def start(self) -> int:
        """Listen; return the port to point the sender at."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept(listener))
        return self.port

    async def close(self) -> None:
        """Stop listening and drop every connection, stalled ones included."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for sock in list(self._sockets):
            sock.close()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(listener)
            client.setblocking(False)
            self._sockets.add(client)
            log = ConnectionLog(len(self.connections), _fault_for(self.plan, len(self.connections)))
            self.connections.append(log)
            self._spawn(self._serve(client, log))

    async def _serve(self, client: socket.socket, log: ConnectionLog) -> None:
        loop = asyncio.get_running_loop()
        target = socket.socket()
        target.setblocking(False)
        self._sockets.add(target)
        try:
            await loop.sock_connect(target, self.target)
        except OSError as exc:
            log.error = f"connect to {self.target}: {exc}"
            _reset(client)
            target.close()
            return
        link = _Link(client, target, log)
        link.tasks = [
            asyncio.ensure_future(self._forward(client, target, "up", link)),
            asyncio.ensure_future(self._forward(target, client, "down", link)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            for task in link.tasks:
                task.cancel()
        client.close()
        target.close()

    async def _forward(
        self, src: socket.socket, dst: socket.socket, direction: Direction, link: _Link
    ) -> None:
        try:
            await self._pump(src, dst, direction, link)
        finally:
            link.directions_done += 1

    async def _pump(
        self, src: socket.socket, dst: socket.socket, direction: Direction, link: _Link
    ) -> None:
        loop = asyncio.get_running_loop()
        log = link.log
        fault = log.fault
        faulty = fault.direction == direction
        offset = 0
        while True:
            try:
                data = await loop.sock_recv(src, CHUNK)
            except OSError as exc:
                # A reset: it reaches the other side too, after what that side
                # was already sent.
                log.events.append(f"{direction}: {exc!r}")
                link.reset()
                return
            if link.frozen.is_set():
                await link.forever()
            if not data:
                log.events.append(f"{direction}: EOF")
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                return
            if faulty and fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            if faulty:
                data, offset = self._apply(fault, log, data, offset)
            if direction == "up":
                log.up_bytes += len(data)
            else:
                log.down_bytes += len(data)
            try:
                await loop.sock_sendall(dst, data)
            except OSError as exc:
                # The far side is gone; the other direction still reads what
                # it sent before it went, then its reset.
                log.events.append(f"{direction}: send {exc!r}")
                if link.directions_done:
                    link.reset()
                return
            if log.cut:
                await _sent(dst)  # "reach the far side": not just our send buffer
                link.reset()
                return
            if log.stalled:
                link.frozen.set()
                await link.forever()

    @staticmethod
    def _apply(fault: Fault, log: ConnectionLog, data: bytes, offset: int) -> tuple[bytes, int]:
        """The part of a chunk to forward, after the fault; sets ``log.cut`` / ``stalled``."""
        start, end = offset, offset + len(data)
        flips = list(fault.also_corrupt)
        if fault.corrupt_at is not None:
            flips.append((fault.corrupt_at, fault.corrupt_xor))
        hits = [(at, xor) for at, xor in flips if start <= at < end]
        if hits:
            buf = bytearray(data)
            for at, xor in hits:
                buf[at - start] ^= xor
            data = bytes(buf)
            log.corrupted = True
        if fault.stall_after is not None and end >= fault.stall_after:
            log.stalled = True
            data = data[: max(0, fault.stall_after - start)]
        elif fault.cut_after is not None and end >= fault.cut_after:
            log.cut = True
            data = data[: max(0, fault.cut_after - start)]
        return data, end


class ThreadedProxy:
    """A FaultProxy on an event loop of its own thread (for subprocess tests).

    ``with ThreadedProxy(port, plan) as proxy:`` then point the sender at
    ``proxy.port``; ``proxy.connections`` says what happened.
    """

    def __init__(self, target_port: int, plan: Plan = PASS) -> None:
        self.proxy = FaultProxy(target_port, plan)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                         daemon=True)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def connections(self) -> list[ConnectionLog]:
        return self.proxy.connections

    def __enter__(self) -> ThreadedProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
