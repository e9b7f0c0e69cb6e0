"""The sd_notify client: path and abstract sockets, the watchdog variables, no-op mode."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from dsamig.daemon.sdnotify import Notifier


def datagram_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def fields(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))


def test_path_socket(tmp_path) -> None:
    path = str(tmp_path / "notify")
    with datagram_socket(path) as sock:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
        notifier.ready("2 jobs\nrunning")
        assert fields(sock) == {"READY": "1", "STATUS": "2 jobs running"}
        notifier.watchdog()
        assert fields(sock) == {"WATCHDOG": "1"}
        notifier.stopping("bye")
        assert fields(sock) == {"STOPPING": "1", "STATUS": "bye"}
        notifier.reloading()
        assert fields(sock) == {"RELOADING": "1"}
        notifier.close()


def test_abstract_socket() -> None:
    name = f"dsamig-test-{uuid.uuid4().hex}"
    with datagram_socket("\0" + name) as sock:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send(STATUS="hello")
        assert fields(sock) == {"STATUS": "hello"}
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.send(READY=1) is False
    assert notifier.watchdog_interval_s is None


def test_a_missing_manager_is_not_an_error(tmp_path) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    try:
        assert notifier.send(READY=1) is False  # ignored, as sd_notify(3) advises
    finally:
        notifier.close()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}, 0.2),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_period(env: dict[str, str], interval: float | None) -> None:
    assert Notifier.from_environment(env).watchdog_interval_s == interval
