"""Pre-shared-key authentication of a channel: the MACs of docs/protocol.md.

Both peers hold the same key ``K``. Each side sends a CHALLENGE with a fresh
32-byte nonce; the receiver's also proves that it holds ``K``, and the
sender's HELLO carries a MAC that binds the key to both nonces and to every
field of that HELLO (job, channel, manifest, name). Nonces are fresh on
every connection, so neither proof can be replayed on another one; the two
proofs carry different labels, so neither can be reflected as the other.

Pure functions, no I/O: the state machines in :mod:`dsamig.proto.state` call
them, and the shells only supply nonces and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Final

from dsamig.proto.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from dsamig.proto.frames import AUTH_MAC_SIZE, AUTH_NONCE_SIZE, Hello, encode

#: Shortest key accepted: 256 bits, the size of the HMAC-SHA256 output.
MIN_PSK_SIZE: Final = 32

_RECEIVER_LABEL: Final = b"dsamig-v1 receiver\x00"
_SENDER_LABEL: Final = b"dsamig-v1 sender\x00"


def _mac(key: bytes, *parts: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def receiver_proof(key: bytes, sender_nonce: bytes, receiver_nonce: bytes) -> bytes:
    """The receiver's CHALLENGE proof: HMAC(K, label ‖ sender nonce ‖ receiver nonce)."""
    return _mac(key, _RECEIVER_LABEL, sender_nonce, receiver_nonce)


def hello_mac(key: bytes, receiver_nonce: bytes, sender_nonce: bytes, hello: Hello) -> bytes:
    """The HELLO auth block: HMAC(K, label ‖ receiver nonce ‖ sender nonce ‖ HELLO).

    The HELLO is the whole encoded frame (header and body) with its
    AUTH_MAC_SIZE auth bytes set to zero, so the MAC covers every field,
    ``auth_length`` included. Raises LocalProtocolError if ``hello`` cannot
    be encoded.
    """
    unsigned = encode(dataclasses.replace(hello, auth=bytes(AUTH_MAC_SIZE)))
    return _mac(key, _SENDER_LABEL, receiver_nonce, sender_nonce, unsigned)


def check_receiver_proof(
    key: bytes, sender_nonce: bytes, receiver_nonce: bytes, proof: bytes
) -> None:
    """Raise RemoteProtocolError (AUTH) unless ``proof`` is the receiver's proof."""
    if not hmac.compare_digest(proof, receiver_proof(key, sender_nonce, receiver_nonce)):
        raise RemoteProtocolError(
            "authentication failed: the receiver does not hold this sender's pre-shared key "
            "(its CHALLENGE proof does not match)",
            ErrorCode.AUTH,
        )


def check_hello(key: bytes, receiver_nonce: bytes, sender_nonce: bytes, hello: Hello) -> None:
    """Raise RemoteProtocolError (AUTH) unless ``hello.auth`` is its correct MAC."""
    if len(hello.auth) != AUTH_MAC_SIZE:
        raise RemoteProtocolError(
            f"authentication failed: HELLO auth block of {len(hello.auth)} bytes, "
            f"expected {AUTH_MAC_SIZE} (HMAC-SHA256)",
            ErrorCode.AUTH,
        )
    try:
        expected = hello_mac(key, receiver_nonce, sender_nonce, hello)
    except LocalProtocolError:
        # The decoder accepted it, so this cannot happen for a v1 HELLO; a
        # HELLO we cannot re-encode is one we cannot authenticate.
        expected = b""
    if not hmac.compare_digest(hello.auth, expected):
        raise RemoteProtocolError(
            f"authentication failed: HELLO on channel {hello.channel_index} is not signed "
            "with this receiver's pre-shared key",
            ErrorCode.AUTH,
        )


def check_nonce(nonce: bytes) -> None:
    """Raise LocalProtocolError for a nonce of the wrong size (a caller bug)."""
    if len(nonce) != AUTH_NONCE_SIZE:
        raise LocalProtocolError(f"nonce of {len(nonce)} bytes, expected {AUTH_NONCE_SIZE}")


__all__ = [
    "MIN_PSK_SIZE",
    "check_hello",
    "check_nonce",
    "check_receiver_proof",
    "hello_mac",
    "receiver_proof",
]
