"""The control protocol's parsing, and the server's socket handling, in process."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from dsamig.control import ControlClient, ControlError
from dsamig.control.protocol import CommandError, ErrorClass, parse_request
from dsamig.control.server import ControlServer, expect_keys
from dsamig.errors import NetworkError
from tests.integration.daemon_helpers import short_dir


async def until(predicate: Callable[[], Any], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` on the loop until it holds; fail after ``timeout_s``."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout_s)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b'"text"', "JSON object"),
        (b'{"execute": "x", "arguments": []}', "must be a JSON object"),
        (b'{"execute": "x", "extra": 1}', "unknown key 'extra'"),
        (b'{"arguments": {}}', "command name"),
        (b'{"execute": "x", "arguments": {"v": Infinity}}', "not JSON"),
        (b"[" * 50000 + b"]" * 50000, "not JSON"),  # too deep: not a crash
    ],
)
def test_bad_requests(line: bytes, words: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_request(line)
    assert info.value.error_class is ErrorClass.GENERIC and words in info.value.desc


def test_good_request_echoes_its_id() -> None:
    request = parse_request(b'{"execute": "go", "arguments": {"a": 1}, "id": [1, "x"]}')
    assert (request.execute, request.arguments) == ("go", {"a": 1})
    assert request.reply({"return": {}}) == {"return": {}, "id": [1, "x"]}
    assert parse_request(b'{"execute": "go"}').reply({"return": 1}) == {"return": 1}


@pytest.fixture
async def server() -> AsyncIterator[ControlServer]:
    async def echo(arguments: dict[str, Any]) -> Any:
        expect_keys(arguments, optional=("value",))
        return arguments.get("value")

    async def broken(arguments: dict[str, Any]) -> Any:
        raise KeyError("oops")

    with short_dir() as directory:
        path = os.path.join(directory, "ctl.sock")
        srv = ControlServer(path, {"echo": echo, "broken": broken}, {"role": "test"},
                            max_clients=2)
        old = os.umask(0)  # the socket must not be world-writable even so
        try:
            await srv.start()
        finally:
            os.umask(old)
        try:
            yield srv
        finally:
            await srv.close()


async def test_socket_mode_and_removal(server: ControlServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    await server.close()
    assert not os.path.exists(server.path)


async def test_commands_errors_and_events(server: ControlServer) -> None:
    async with await ControlClient.connect(server.path) as client:
        assert client.role == "test"
        assert await client.execute("echo", {"value": [1, 2]}) == [1, 2]
        with pytest.raises(ControlError) as info:
            await client.execute("echo", {"other": 1})
        assert info.value.error_class == "InvalidArgument"
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            await client.execute("nope")
        with capture_logs() as logs, pytest.raises(ControlError) as info:
            await client.execute("broken")
        assert info.value.error_class == "InternalError" and "KeyError" in info.value.desc
        assert any(e["event"] == "control command failed" and e["command"] == "broken"
                   for e in logs)
        commands = [c["name"] for c in await client.execute("query-commands")]
        assert commands == ["broken", "echo", "query-commands", "subscribe", "unsubscribe"]

        server.broadcast("JOB_STATUS_CHANGE", {"id": "a"})  # not subscribed: not sent
        assert await client.execute("subscribe", {"events": ["SHUTDOWN"]}) == {
            "events": ["SHUTDOWN"]}
        server.broadcast("JOB_STATUS_CHANGE", {"id": "b"})
        server.broadcast("SHUTDOWN", {"role": "test"})
        event = await client.next_event(5)
        assert event["event"] == "SHUTDOWN" and event["data"] == {"role": "test"}
        with pytest.raises(ControlError, match="events must be a list"):
            await client.execute("subscribe", {"events": ["BOGUS"]})
        assert await client.execute("unsubscribe") == {"events": []}


async def test_a_request_followed_by_a_hang_up_still_runs(server: ControlServer) -> None:
    calls: list[dict[str, Any]] = []

    async def record(arguments: dict[str, Any]) -> None:
        calls.append(arguments)

    server.commands["record"] = record

    def hit_and_run() -> None:  # reads the greeting, never the answer
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(server.path)
            sock.makefile("rb").readline()
            sock.sendall(b'{"execute": "record", "arguments": {"n": 1}}\n'
                         b'{"execute": "record", "arguments": {"n": 2}}\n{"execute": "rec')

    await asyncio.to_thread(hit_and_run)
    await until(lambda: calls and not server.connections)
    assert calls == [{"n": 1}, {"n": 2}]  # whole lines ran, the unfinished one did not
    assert not server.connections


async def test_too_many_clients(server: ControlServer) -> None:
    first = await ControlClient.connect(server.path)
    second = await ControlClient.connect(server.path)
    try:
        with pytest.raises(ControlError, match="too many control clients"):
            await ControlClient.connect(server.path)
    finally:
        await first.close()
        await second.close()
    await until(lambda: not server.connections)  # the server saw both go
    async with await ControlClient.connect(server.path) as again:
        assert await again.execute("echo", {"value": 1}) == 1


async def test_a_client_that_never_reads_is_dropped(server: ControlServer) -> None:
    _reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(b'{"execute": "subscribe"}\n')
    await writer.drain()
    await until(lambda: len(server.connections) == 1 and next(iter(server.connections)).events)
    payload = {"blob": "x" * 60000}
    for _ in range(400):  # 24 MB of events that nobody reads
        server.broadcast("SHUTDOWN", payload)
        if not server.connections:
            break
        await asyncio.sleep(0)
    assert not server.connections
    writer.close()


async def test_stale_live_and_foreign_socket_paths() -> None:
    with short_dir() as directory:
        path = os.path.join(directory, "ctl.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays, nobody listens: a crashed daemon's
        first = ControlServer(path, {}, {"role": "a"})
        await first.start()
        try:
            with pytest.raises(NetworkError, match="in use by another running daemon"):
                await ControlServer(path, {}, {"role": "b"}).start()
        finally:
            await first.close()
        regular = os.path.join(directory, "file")
        with open(regular, "w") as f:
            f.write("data")
        with pytest.raises(NetworkError, match="exists and is not a socket"):
            await ControlServer(regular, {}, {}).start()
        with pytest.raises(NetworkError, match="longer than 107 bytes"):
            await ControlServer(os.path.join(directory, "x" * 120), {}, {}).start()
        with pytest.raises(NetworkError, match=r"directory .* does not exist"):
            await ControlServer(os.path.join(directory, "no", "ctl.sock"), {}, {}).start()
        with pytest.raises(NetworkError, match="no daemon is listening"):
            await ControlClient.connect(path)


async def test_control_socket_group_and_mode(tmp_path) -> None:
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    path = str(tmp_path / "c.sock")
    server = ControlServer(path, {}, {"role": "test"}, group=group)
    await server.start()
    try:
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getgid()
    finally:
        await server.close()
    bad = ControlServer(str(tmp_path / "d.sock"), {}, {"role": "test"}, group="no-such-grp-x")
    with pytest.raises(NetworkError, match="no such group"):
        await bad.start()
    assert not os.path.exists(tmp_path / "d.sock")
