"""The QMP client against a monitor that misbehaves: every failure is a bounded QmpError."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable

import pytest

from dsamig.live.qmp import EVENTS_KEPT, MAX_LINE_BYTES, QmpClient, QmpError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
                    "capabilities": []}}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def send(writer: asyncio.StreamWriter, message: object) -> None:
    writer.write(json.dumps(message).encode() + b"\n")


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greet and accept qmp_capabilities, as QEMU does."""
    send(writer, GREETING)
    request = json.loads(await reader.readline())
    assert request["execute"] == "qmp_capabilities"
    send(writer, {"return": {}, "id": request["id"]})


async def next_request(reader: asyncio.StreamReader) -> dict:
    return json.loads(await reader.readline())


@pytest.fixture
async def monitor():
    """``start(handler) -> socket path``: a fake monitor on a real Unix socket."""
    servers = []
    directory = tempfile.mkdtemp(prefix="dsq-")

    async def start(handler: Handler) -> str:
        path = os.path.join(directory, f"m{len(servers)}")

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
                await writer.drain()
                await reader.read()  # hold the connection until the client goes
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        servers.append(await asyncio.start_unix_server(serve, path))
        return path

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)


async def test_a_silent_monitor_times_out(monitor) -> None:
    async def silent(reader, writer) -> None:
        await reader.read()

    path = await monitor(silent)
    async with asyncio.timeout(5):
        with pytest.raises(QmpError, match=r"no greeting within 0\.2 s"):
            await QmpClient.connect(path, timeout_s=0.2)


async def test_not_a_greeting(monitor) -> None:
    async def wrong(reader, writer) -> None:
        send(writer, {"hello": 1})

    with pytest.raises(QmpError, match="expected a QMP greeting"):
        await QmpClient.connect(await monitor(wrong), timeout_s=5)


async def test_not_json(monitor) -> None:
    async def garbage(reader, writer) -> None:
        writer.write(b"\x00\xffnot json\n")

    with pytest.raises(QmpError, match="not JSON"):
        await QmpClient.connect(await monitor(garbage), timeout_s=5)


async def test_a_reply_that_never_comes_closes_the_connection(monitor) -> None:
    async def mute(reader, writer) -> None:
        await negotiate(reader, writer)
        await next_request(reader)  # and never answer

    async with await QmpClient.connect(await monitor(mute), timeout_s=5) as qmp:
        with pytest.raises(QmpError, match=r"QMP stop on .*: no reply within 0\.2 s"):
            await qmp.execute("stop", timeout_s=0.2)
        with pytest.raises(QmpError, match="the connection is closed"):
            await qmp.execute("cont")


async def test_an_overlong_reply_is_refused(monitor) -> None:
    async def flood(reader, writer) -> None:
        await negotiate(reader, writer)
        await next_request(reader)
        writer.write(b'{"return": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n')

    async with await QmpClient.connect(await monitor(flood), timeout_s=5) as qmp:
        with pytest.raises(QmpError, match="a reply longer than"):
            await qmp.execute("query-status")


async def test_a_reply_to_another_command(monitor) -> None:
    async def confused(reader, writer) -> None:
        await negotiate(reader, writer)
        await next_request(reader)
        send(writer, {"return": {}, "id": "someone-else"})

    async with await QmpClient.connect(await monitor(confused), timeout_s=5) as qmp:
        with pytest.raises(QmpError, match="a reply to another command"):
            await qmp.execute("stop")


async def test_error_replies_carry_class_and_description(monitor) -> None:
    async def refuse(reader, writer) -> None:
        await negotiate(reader, writer)
        request = await next_request(reader)
        send(writer, {"error": {"class": "GenericError", "desc": "cannot stop now"},
                      "id": request["id"]})

    async with await QmpClient.connect(await monitor(refuse), timeout_s=5) as qmp:
        with pytest.raises(QmpError, match=r"QMP stop on .*: cannot stop now") as err:
            await qmp.execute("stop")
        assert err.value.error_class == "GenericError"


async def test_stop_is_proven_by_query_status(monitor) -> None:
    """A monitor that accepts stop but keeps running: the pause is not believed."""
    async def liar(reader, writer) -> None:
        await negotiate(reader, writer)
        while True:
            request = await next_request(reader)
            answer = ({"status": "running", "running": True}
                      if request["execute"] == "query-status" else {})
            send(writer, {"return": answer, "id": request["id"]})

    async with await QmpClient.connect(await monitor(liar), timeout_s=0.3) as qmp:
        with pytest.raises(QmpError, match=r"the guest is not stopped after 0\.3 s "
                                           r"\(status 'running'\)"):
            await qmp.stop()


async def test_events_between_replies_are_kept_bounded(monitor) -> None:
    async def chatty(reader, writer) -> None:
        await negotiate(reader, writer)
        request = await next_request(reader)
        for i in range(EVENTS_KEPT + 10):
            send(writer, {"event": "STOP", "data": {"n": i}})
        send(writer, {"return": {"status": "paused", "running": False}, "id": request["id"]})

    async with await QmpClient.connect(await monitor(chatty), timeout_s=5) as qmp:
        assert (await qmp.query_status())["running"] is False
        events = qmp.take_events()
        assert len(events) == EVENTS_KEPT and events[-1]["data"]["n"] == EVENTS_KEPT + 9
        assert qmp.take_events() == []


async def test_cancel_in_mid_exchange_closes_the_connection(monitor) -> None:
    async def slow(reader, writer) -> None:
        await negotiate(reader, writer)
        await next_request(reader)

    async with await QmpClient.connect(await monitor(slow), timeout_s=5) as qmp:
        task = asyncio.create_task(qmp.execute("stop"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(QmpError, match="the connection is closed"):
            await qmp.execute("cont")


async def test_no_socket(tmp_path) -> None:
    with pytest.raises(QmpError, match="cannot connect"):
        await QmpClient.connect(str(tmp_path / "none"), timeout_s=1)
