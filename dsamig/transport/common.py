"""Pieces shared by the sending and receiving sides of a channel.

``Timeouts`` and ``DEFAULT_PORT`` live in ``dsamig.settings``; they are
re-exported here for the channel modules.
"""

from __future__ import annotations

import asyncio
import socket

from dsamig.errors import ConfigError, NetworkError
from dsamig.runtime import bounded
from dsamig.settings import DEFAULT_PORT, Timeouts

# TCP keepalive on data connections: a peer whose host died (no FIN, no RST)
# is noticed in about KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


def tune_socket(sock: socket.socket | None) -> None:
    """No Nagle (small control frames must not wait), and keepalive probes."""
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``HOST`` into ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(default_port)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"address {text!r} has no host (expected HOST:PORT)")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"address {text!r}: port {port} out of range 0..65535")
    return host, port


class Drain:
    """Write flow control for a Protocol: ``await wait()`` while the transport is paused."""

    def __init__(self) -> None:
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    def fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._waiter = None

    @property
    def paused(self) -> bool:
        return self._paused

    async def wait(self, timeout_s: float, what: str) -> None:
        if not self._paused:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        try:
            await bounded(asyncio.shield(self._waiter), timeout_s)
        except TimeoutError:
            raise NetworkError(f"{what}: peer stopped reading for {timeout_s:g} s") from None


__all__ = [
    "DEFAULT_PORT",
    "Drain",
    "Timeouts",
    "parse_address",
    "tune_socket",
]
