"""The transport's side of security: the TLS listener and connection errors in words.

The operator's settings and their checks (certificates, keys, the pre-shared
key) are :class:`dsamig.security.SecurityConfig`; this module runs a TLS
listener that says why it refused each peer, and words a lost connection.
``SecurityConfig``, ``describe_tls_error`` and ``psk_of`` are re-exported for
the transport's channel modules.

Without TLS or a pre-shared key nothing here runs: the plain path has no TLS
layer and no extra round trip.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Protocol

from dsamig.security import SecurityConfig, describe_tls_error, psk_of


def describe_connection_error(
    exc: BaseException | None, *, handshaking: bool = False, tls: bool = False
) -> str:
    """Why a connection was lost, as ``": reason"`` (or ``""`` when nothing is known).

    A receiver that refuses our certificate or our key hangs up before it
    answers HELLO, often without a TLS alert reaching us; say so, since its
    log has the reason.
    """
    if isinstance(exc, ssl.SSLError):
        return f": TLS: {describe_tls_error(exc)}"
    if exc is not None and not (handshaking and isinstance(exc, ConnectionResetError)):
        return f": {exc}"
    if handshaking:
        why = "our TLS certificate or " if tls else "TLS, "
        return (f" before answering HELLO (does it require {why}a pre-shared key? "
                "its log says why)")
    return ""


class Gate(Protocol):
    """Bounds on connections not yet authenticated (the receiver's ConnectionGate)."""

    def enter(self, host: str) -> bool:
        """Count one more connection from ``host``; False when over a bound."""

    def leave(self, host: str) -> None:
        """One connection from ``host`` authenticated or closed."""

    def why(self, host: str) -> str:
        """Why ``enter`` refused ``host``."""


class TlsListener:
    """A TLS listening socket that says why it refused each peer it refused.

    ``loop.create_server(ssl=...)`` drops a failed handshake silently, but an
    operator must learn that a sender was turned away and why (no
    certificate, another CA).  So this listener accepts connections itself
    and upgrades each with ``loop.connect_accepted_socket(ssl=...)``, which
    reports the handshake's outcome.  The channel protocol is connected only
    once the peer's certificate is verified: no byte of an unauthenticated
    peer reaches it.  It offers what the receiver uses of
    ``asyncio.Server``: ``sockets``, ``close()`` and ``wait_closed()``.
    """

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        timeout_s: float,
        on_refused: Callable[[str, str], None],
        gate: Gate,
    ) -> None:
        self.sockets = (sock,)
        self._gate = gate
        self._sock = sock
        self._factory = factory
        self._context = context
        self._timeout_s = timeout_s
        self._on_refused = on_refused
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.ensure_future(self._accept())

    @classmethod
    def listen(
        cls,
        host: str,
        port: int,
        factory: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        timeout_s: float,
        on_refused: Callable[[str, str], None],
        gate: Gate,
    ) -> TlsListener:
        """Bind ``host:port`` (raises OSError) and start accepting."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
        sock.setblocking(False)
        return cls(sock, factory, context, timeout_s, on_refused, gate)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: try again shortly
                self._on_refused("?", f"accept failed: {exc.strerror or exc}")
                await asyncio.sleep(0.1)
                continue
            # A TLS handshake costs more than an idle connection: it counts
            # against the same bounds as a connection waiting for its HELLO.
            if not self._gate.enter(address[0]):
                conn.close()
                self._on_refused(f"{address[0]}:{address[1]}", self._gate.why(address[0]))
                continue
            task = asyncio.ensure_future(self._handshake(conn, address))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, address: tuple[str, int]) -> None:
        where = f"{address[0]}:{address[1]}"
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                self._factory, conn, ssl=self._context, ssl_handshake_timeout=self._timeout_s
            )
        except (OSError, TimeoutError) as exc:
            conn.close()
            self._on_refused(where, f"TLS handshake failed: {describe_tls_error(exc)}")
        finally:
            self._gate.leave(address[0])

    def close(self) -> None:
        """Stop accepting; handshakes still in progress are abandoned."""
        self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._handshakes, return_exceptions=True)


__all__ = [
    "Gate",
    "SecurityConfig",
    "TlsListener",
    "describe_connection_error",
    "describe_tls_error",
    "psk_of",
]
