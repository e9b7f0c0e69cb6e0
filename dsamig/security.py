"""The operator's choices for the data path's security: TLS files and a pre-shared key.

:class:`SecurityConfig` holds the certificate, key and CA files, a server
name and a PSK file, checks them once before anything starts, and builds the
``ssl.SSLContext`` of each side.  Plain settings with their checks, apart from
the transport (``dsamig.transport.security`` runs the TLS listener), so that
the job schema and the CLI can hold them without loading the transport.  The
PSK handshake itself is part of the protocol (:mod:`dsamig.proto.auth`,
docs/protocol.md "Authentication").
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass, field

from dsamig.errors import ConfigError
from dsamig.proto.auth import MIN_PSK_SIZE

#: A key file larger than this is not a key (a misplaced path, an image).
MAX_PSK_FILE = 64 * 1024

# OpenSSL's X509_V_ERR_* codes of a certificate that does not name the peer.
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64

# OpenSSL reasons that deserve words an operator can act on.
_TLS_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        "the receiver requires a client certificate (--tls-cert, --tls-key)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer rejected our certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA that signed our certificate",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (is TLS configured on both sides?)",
    "HTTP_REQUEST": "the peer does not speak TLS (is TLS configured on both sides?)",
    "RECORD_LAYER_FAILURE": "the peer does not speak TLS (is TLS configured on both sides?)",
    "UNSUPPORTED_PROTOCOL": "the peer offers no TLS version this side accepts (1.3 minimum)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer requires a TLS version this side does not offer",
}


def describe_tls_error(exc: BaseException) -> str:
    """One line for a failed TLS handshake or a TLS alert, without OpenSSL noise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = f"certificate verify failed: {exc.verify_message}"
        if exc.verify_code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
            message += (" (the receiver's certificate must carry the name or IP address "
                        "the sender connects to in its subjectAltName, or give "
                        "--tls-server-name / security.tls_server_name with a name it carries)")
        return message
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        words = _TLS_REASONS.get(reason, reason.lower().replace("_", " "))
        return words or str(exc)
    if isinstance(exc, TimeoutError):
        return "no TLS handshake in time"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    # An abort without an alert (uvloop drops the pending alert when it closes):
    return str(exc) or "the peer hung up during the handshake (did it reject our certificate?)"


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    """Whether every address ``host`` (an address or a name) stands for is loopback.

    An empty host, a wildcard (``0.0.0.0``, ``::``) or a name that does not
    resolve is not loopback: it may be reachable from other hosts.
    """
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addresses = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


#: How to write a key file, said by every refusal of one.
PSK_RECIPE = ("write 32 random bytes (head -c 32 /dev/urandom > {path}) or 64 hex digits "
              "(openssl rand -hex 32 > {path}), then chmod 600 {path}")


def _is_text(data: bytes) -> bool:
    return all(0x20 <= b < 0x7F or b == 0x09 for b in data)


def parse_psk(raw: bytes, path: str) -> bytes:
    """The key a PSK file holds; ConfigError saying how to write one if it holds none.

    A file of hex digits (an even number, at least 64), with or without one
    trailing newline, holds the bytes they spell: ``openssl rand -hex 32``
    writes one.  Any other file holds its bytes exactly (at least 32):
    ``head -c 32 /dev/urandom`` writes one.  A text file ending in a newline
    that is not hex is refused: whether the newline belongs to the key is
    exactly what two hosts would disagree on.
    """
    recipe = PSK_RECIPE.format(path=path)
    body = raw[:-1] if raw.endswith(b"\n") else raw
    body = body[:-1] if body != raw and body.endswith(b"\r") else body
    if body and all(b in b"0123456789abcdefABCDEF" for b in body):
        if len(body) % 2:
            raise ConfigError(f"PSK file {path!r} holds an odd number of hex digits "
                              f"({len(body)}); {recipe}")
        key = bytes.fromhex(body.decode("ascii"))
        if len(key) < MIN_PSK_SIZE:
            raise ConfigError(
                f"PSK file {path!r} holds {len(body)} hex digits ({len(key)} bytes); a key "
                f"needs at least {MIN_PSK_SIZE} bytes ({2 * MIN_PSK_SIZE} hex digits): {recipe}"
            )
        return key
    if body != raw and _is_text(body):
        raise ConfigError(
            f"PSK file {path!r} is text ending in a newline but not hex digits, so it is "
            f"unclear whether the newline is part of the key; {recipe}"
        )
    if len(raw) < MIN_PSK_SIZE:
        raise ConfigError(
            f"PSK file {path!r} holds {len(raw)} bytes; a key needs at least "
            f"{MIN_PSK_SIZE}: {recipe}"
        )
    return raw


@dataclass
class SecurityConfig:
    """TLS and pre-shared-key settings of one side of the data path.

    TLS is on when a certificate or a CA is given.  A receiver needs
    ``tls_cert`` (and ``tls_key`` unless the certificate file holds the key);
    with ``tls_ca`` it also requires every sender to present a certificate
    signed by that CA.  A sender always verifies the receiver's certificate:
    its chain against ``tls_ca`` (the system's trust store without one), and
    its name: ``tls_server_name`` when given, else the host it connects to,
    which must appear as a DNS name or, for an IP address, as an IP address in
    the certificate's subjectAltName.  An IP address without ``tls_ca`` is
    refused: no public CA vouches for a private address.

    ``psk_file`` holds the pre-shared key (see :func:`parse_psk` for the two
    ways to write one).  The daemons refuse a key file that group or others
    may access; the one-shot commands warn.
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    psk_file: str | None = None
    _psk: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _psk_mode: int = field(default=0, init=False, repr=False, compare=False)
    _contexts: dict[str, ssl.SSLContext] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def tls(self) -> bool:
        """Whether the data path is wrapped in TLS."""
        return bool(self.tls_cert or self.tls_ca)

    @property
    def authenticates(self) -> bool:
        """Whether a receiver with these settings authenticates its senders at all.

        TLS without ``tls_ca`` encrypts but accepts any client; only a CA
        (client certificates) or a pre-shared key tells senders apart.
        """
        return bool(self.psk_file or (self.tls_cert and self.tls_ca))

    @property
    def psk(self) -> bytes | None:
        """The pre-shared key (read once), or None without ``psk_file``."""
        if self.psk_file is None:
            return None
        if self._psk is None:
            self._psk = self._read_psk()
        return self._psk

    def check(self, role: str, *, host: str | None = None, strict: bool = False) -> list[str]:
        """Load every file now; raise ConfigError naming the first problem.

        ``role`` is ``"sender"`` or ``"receiver"``; a sender's ``host`` (the
        receiver it will connect to) is checked against the TLS name rules.
        Returns warnings an operator should see (a key file others can
        read); with ``strict`` (the daemons) such a key file is refused.
        """
        warnings: list[str] = []
        if self.psk_file is not None:
            _ = self.psk  # read now, so that a bad file fails before any connection
            problems = self._psk_warnings()
            if problems and strict:
                raise ConfigError(f"{problems[0]} (the daemons refuse such a key)")
            warnings += problems
        if self.tls_key and not self.tls_cert:
            raise ConfigError("--tls-key (tls_key) needs --tls-cert (tls_cert)")
        if self.tls_server_name and role == "receiver":
            raise ConfigError("--tls-server-name is a sender option")
        if self.tls_server_name and not self.tls:
            raise ConfigError("--tls-server-name needs TLS (--tls-ca, --tls-cert)")
        if role == "receiver":
            if self.tls and not self.tls_cert:
                raise ConfigError("a TLS receiver needs --tls-cert (and --tls-key)")
            if self.tls_cert and not self.tls_ca:
                warnings.append(
                    "TLS without --tls-ca: senders are not asked for a certificate, so any "
                    "client may connect (add --tls-ca or --psk-file to authenticate them)"
                )
            self.server_context()
        else:
            if host is not None and self.tls:
                self.server_name_for(host)
            self.client_context()
        return warnings

    # -- TLS ---------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext | None:
        """The receiver's context: TLS 1.3, client certificates required with a CA."""
        if not self.tls:
            return None
        if "server" not in self._contexts:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            self._load_chain(context)
            if self.tls_ca:
                self._load_ca(context)
                context.verify_mode = ssl.CERT_REQUIRED
            self._contexts["server"] = context
        return self._contexts["server"]

    def client_context(self) -> ssl.SSLContext | None:
        """The sender's context: TLS 1.3, the receiver's chain and name verified."""
        if not self.tls:
            return None
        if "client" not in self._contexts:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            if self.tls_ca:
                self._load_ca(context)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if self.tls_cert:
                self._load_chain(context)
            self._contexts["client"] = context
        return self._contexts["client"]

    def server_name_for(self, host: str) -> str:
        """The identity the receiver at ``host`` must prove: a DNS name or an IP address.

        ``tls_server_name`` wins; otherwise ``host`` itself, which for an IP
        address is matched against the certificate's IP addresses (Python's
        ``ssl`` does so when the name is an address).  ConfigError for an IP
        address without ``tls_ca``.
        """
        if self.tls_server_name:
            return self.tls_server_name
        if _is_ip_address(host) and not self.tls_ca:
            raise ConfigError(
                f"TLS to the IP address {host} needs --tls-ca (security.tls_ca: the CA that "
                f"signed the receiver's certificate, which must carry IP:{host}) or "
                "--tls-server-name (security.tls_server_name: a DNS name in that certificate)"
            )
        return host

    def client_hostname(self, host: str) -> tuple[ssl.SSLContext, str] | None:
        """``(context, server_hostname)`` for connecting to ``host``, or None without TLS.

        The name is always checked (see :meth:`server_name_for`); a receiver
        addressed by IP must carry that address in its certificate.
        """
        base = self.client_context()
        if base is None:
            return None
        return base, self.server_name_for(host)

    def _load_chain(self, context: ssl.SSLContext) -> None:
        assert self.tls_cert is not None
        for what, path in (("certificate", self.tls_cert), ("key", self.tls_key)):
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"TLS {what} file {path!r} does not exist")
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except PermissionError as exc:
            name = exc.filename or self.tls_key or self.tls_cert
            raise ConfigError(f"TLS certificate or key {name!r} is not readable") from None
        except (ssl.SSLError, OSError) as exc:
            what = self.tls_cert + (f" / {self.tls_key}" if self.tls_key else "")
            raise ConfigError(f"cannot load TLS certificate and key {what!r}: "
                              f"{describe_tls_error(exc)}") from None

    def _load_ca(self, context: ssl.SSLContext) -> None:
        assert self.tls_ca is not None
        try:
            context.load_verify_locations(cafile=self.tls_ca)
        except FileNotFoundError:
            raise ConfigError(f"TLS CA file {self.tls_ca!r} does not exist") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load TLS CA {self.tls_ca!r}: "
                              f"{describe_tls_error(exc)}") from None

    # -- pre-shared key ------------------------------------------------------------

    def _read_psk(self) -> bytes:
        path = self.psk_file
        assert path is not None
        try:
            with open(path, "rb") as f:
                self._psk_mode = os.fstat(f.fileno()).st_mode
                raw = f.read(MAX_PSK_FILE + 1)
        except FileNotFoundError:
            raise ConfigError(f"PSK file {path!r} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read PSK file {path!r}: {exc.strerror}") from None
        if len(raw) > MAX_PSK_FILE:
            raise ConfigError(f"PSK file {path!r} is over {MAX_PSK_FILE} bytes: not a key file")
        return parse_psk(raw, path)

    def _psk_warnings(self) -> list[str]:
        assert self.psk_file is not None
        mode = self._psk_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            return [
                f"PSK file {self.psk_file!r} is accessible to group or others "
                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"
            ]
        return []


def psk_of(security: SecurityConfig | None) -> bytes | None:
    """The pre-shared key of ``security``, if any."""
    return security.psk if security is not None else None


__all__ = [
    "MAX_PSK_FILE",
    "PSK_RECIPE",
    "SecurityConfig",
    "describe_tls_error",
    "is_loopback_host",
    "parse_psk",
    "psk_of",
]
