"""The checks a daemon makes before it binds anything, one function each.

Start-up runs them first, and ``dsamig receiver|sender --config FILE
--check`` runs the very same list (:meth:`Daemon.checks`), so a config that
passes ``--check`` gets past them at start-up too, and one that fails either
fails both with the same message and exit code.  Each check raises the
:class:`~dsamig.errors.DsamigError` start-up would raise, or returns warnings
for the operator.
"""

from __future__ import annotations

import grp
import os
import resource
import socket
import stat
from collections.abc import Callable

from dsamig.control.server import MAX_SOCKET_PATH
from dsamig.errors import ConfigError, NetworkError, SinkError, SourceError
from dsamig.security import SecurityConfig, is_loopback_host

#: A check: raises what start-up would raise, or returns warnings.
Check = Callable[[], list[str]]


def show_address(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def open_storage_dir(path: str) -> int:
    """A descriptor of the receiver's storage directory (SinkError if unusable).

    The configured path itself must not be a symbolic link, and the daemon's
    user must be able to create files in it.
    """
    try:
        # O_NOFOLLOW: the configured directory itself, not wherever a link points.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            why = "is a symbolic link; configure the directory it points to"
        elif isinstance(exc, FileNotFoundError):
            why = "does not exist"
        elif isinstance(exc, NotADirectoryError):
            why = "is not a directory"
        else:
            why = f"cannot be opened: {exc.strerror}"
        raise SinkError(f"storage_dir {path!r} {why}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        os.close(fd)
        raise SinkError(f"storage_dir {path!r} is not writable by this user")
    return fd


def check_storage_dir(path: str) -> list[str]:
    """``storage_dir`` exists, is a directory and not a link, and is writable."""
    os.close(open_storage_dir(path))
    return []


def check_source_dirs(dirs: tuple[str, ...]) -> list[str]:
    """Every ``source_dirs`` entry is an existing directory the daemon can open."""
    for directory in dirs:
        try:
            os.close(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except FileNotFoundError:
            raise SourceError(f"source_dirs: {directory!r} does not exist") from None
        except NotADirectoryError:
            raise SourceError(f"source_dirs: {directory!r} is not a directory") from None
        except OSError as exc:
            raise SourceError(
                f"source_dirs: {directory!r} cannot be opened: {exc.strerror}"
            ) from None
    return []


def check_address_free(host: str, port: int, purpose: str = "") -> list[str]:
    """Nothing else listens on ``host:port`` and the address is this host's.

    ``purpose`` words the message as the listener's own would (``" for
    metrics"``).  Port 0 (any free port) is always free.
    """
    if port == 0:
        return []
    where = f"cannot listen{purpose} on {host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NetworkError(f"{where}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            # As the listeners themselves bind: a port left in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise NetworkError(f"{where}: {exc.strerror or exc}") from None
    return []


def check_control_socket(path: str, group: str | None) -> list[str]:
    """The control socket can be created: short enough, its directory exists
    and is writable, nothing but a stale socket is in the way, the group exists."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise NetworkError(
            f"control socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes"
        )
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise NetworkError(f"control socket directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise NetworkError(f"cannot create control socket {path!r}: its directory "
                           f"{directory!r} is not writable by this user")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise NetworkError(f"{path!r} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: left by a daemon that did not stop cleanly; start-up replaces it
        except OSError as exc:
            raise NetworkError(
                f"control socket {path!r} exists and cannot be checked: {exc.strerror or exc}"
            ) from None
        else:
            raise NetworkError(f"control socket {path!r} is in use by another running daemon")
        finally:
            probe.close()
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise NetworkError(f"cannot give control socket {path!r} to group {group!r}: "
                               "no such group") from None
    return []


def check_security(security: SecurityConfig | None, role: str) -> list[str]:
    """Certificates, keys, CA and pre-shared key load; a key file others can
    read is refused (the daemons are strict where the one-shot commands warn)."""
    if security is None:
        return []
    return security.check(role, strict=True)


def check_exposure(listen: tuple[str, int], security: SecurityConfig | None,
                   allow_unauthenticated: bool, config_path: str | None) -> list[str]:
    """A receiver reachable from other hosts must authenticate its senders.

    Authenticating means a pre-shared key, or TLS with ``tls_ca`` (client
    certificates).  ``security: {allow_unauthenticated: true}`` turns the
    refusal into a warning.
    """
    host, port = listen
    if (security is not None and security.authenticates) or is_loopback_host(host):
        return []
    shown = show_address(host, port)
    if allow_unauthenticated:
        return [f"listening on {shown} without authenticating senders "
                "(security.allow_unauthenticated: true): anyone who can reach it can write "
                "images into storage_dir"]
    prefix = f"{config_path}: " if config_path else ""
    raise ConfigError(
        f"{prefix}listen: {shown} is not a loopback address and the receiver does not "
        "authenticate senders, so anyone who can reach it could write images into "
        "storage_dir; configure security: psk_file, or tls_cert/tls_key with tls_ca "
        "(senders then need certificates), listen on 127.0.0.1, or accept the risk with "
        "security: {allow_unauthenticated: true}"
    )


def check_descriptors(needed: int) -> list[str]:
    """Raise the soft RLIMIT_NOFILE to ``needed``; ConfigError if the hard limit
    (systemd's LimitNOFILE=) is lower: the configured limits could then run the
    daemon out of descriptors, where they must refuse peers instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return []
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"the receiver's limits need up to {needed} file descriptors (max_channels + "
            f"max_unauthenticated + 2 x max_jobs + 128), but this process may open only "
            f"{hard}: raise LimitNOFILE= (or ulimit -n) or lower those limits"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return []


def run_checks(checks: list[Check]) -> list[str]:
    """Run ``checks`` in order; their warnings (the first failure raises)."""
    warnings: list[str] = []
    for check in checks:
        warnings += check()
    return warnings


__all__ = [
    "Check",
    "check_address_free",
    "check_control_socket",
    "check_exposure",
    "check_security",
    "check_source_dirs",
    "check_storage_dir",
    "open_storage_dir",
    "run_checks",
    "show_address",
]
