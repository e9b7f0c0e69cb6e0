"""Live transfers end to end: a writer keeps dirtying the image while it moves.

The writer is a real process (tests/live_writer.py) over a MAP_SHARED file;
``--pause-cmd``/``--resume-cmd`` stop and continue it with signals. The
destination must be byte-identical to the image as it was frozen, whatever
the writer did during the rounds, on every data path.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from dsamig.errors import DsamigError, TransferError
from dsamig.native import impl
from dsamig.pages import PageSink, PageSource
from dsamig.transport.pacing import TokenBucket
from dsamig.transport.receiver import ReceiverJob, ReceiverServer
from dsamig.transport.sender import LiveOptions, Sender, SendOptions
from tests.conftest import read_bytes
from tests.integration.helpers import Receiver, transfer_in_process
from tests.live_writer import LiveWriter

MiB = 1024 * 1024
PAGE = 4096

DATA_PATHS = [pytest.param(False, id="loop")]
if hasattr(impl, "SendPump"):
    DATA_PATHS.append(pytest.param(True, id="native"))


def signal_control(writer: LiveWriter, **overrides) -> LiveOptions:
    """Pause and resume ``writer`` with signals; the pause returns once it stopped."""
    pid = writer.pid
    pause = (f"kill -STOP {pid} && "
             f"while ! grep -q '^State:.*T' /proc/{pid}/status; do :; done")
    return LiveOptions(pause_cmd=pause, resume_cmd=f"kill -CONT {pid}", **overrides)


def make_image(path, pages: int, seed: int) -> None:
    rng = __import__("random").Random(seed)
    path.write_bytes(b"".join(bytes(PAGE) if i % 4 == 0 else rng.randbytes(PAGE)
                              for i in range(pages)))


@pytest.mark.parametrize("native", DATA_PATHS)
async def test_the_destination_is_the_frozen_image(tmp_path, native: bool) -> None:
    image = tmp_path / "image"
    make_image(image, 2048, seed=1)
    output = str(tmp_path / "out.img")
    with LiveWriter(str(image), str(tmp_path / "count"), seed=7, rate=4000) as writer:
        writer.wait_writes(20)
        sent, received = await transfer_in_process(
            str(image), output, channels=3, native=native, receiver={"native": native},
            live=signal_control(writer, max_downtime_s=0.05, max_rounds=8))
        # The writer stays paused after the commit: the guest lives on at the
        # destination, and what it left behind is the copy.
        assert writer.state() == "T"
        frozen = read_bytes(str(image))
        writes = writer.writes()
    assert read_bytes(output) == frozen
    assert writes >= 20
    figures = sent.to_dict()
    rounds = figures["rounds"]
    assert [r["round"] for r in rounds] == list(range(len(rounds)))
    assert 2 <= len(rounds) <= 9  # round 0, the final round at 8 the latest
    assert figures["dirty-sync-count"] == len(rounds)
    assert figures["downtime"] >= 0
    # Round 0 sent every normal page as it found it: 1536 at the start, and
    # each write turns at most one page from zero to data or back.
    assert abs(rounds[0]["pages"] - 1536) <= writes
    assert received.status == "completed"


async def test_a_quiet_writer_finishes_after_round_zero(tmp_path) -> None:
    """No writes during the job: the final round finds nothing and sends
    nothing more than the image once."""
    image = tmp_path / "image"
    make_image(image, 1024, seed=2)
    output = str(tmp_path / "out.img")
    # A writer that is there to be paused, but writes nothing for hours.
    with LiveWriter(str(image), str(tmp_path / "count"), seed=3, rate=1e-4) as writer:
        sent, _ = await transfer_in_process(str(image), output, channels=2,
                                            live=signal_control(writer))
        frozen = read_bytes(str(image))
    assert read_bytes(output) == frozen
    normal = sum(1 for i in range(1024) if frozen[i * PAGE : (i + 1) * PAGE] != bytes(PAGE))
    assert sent.counters.normal_pages == normal
    rounds = sent.to_dict()["rounds"]
    assert [(r["round"], r["pages"]) for r in rounds] == [(0, normal), (1, 0)]


async def test_a_writer_faster_than_the_link_stops_at_max_rounds(tmp_path) -> None:
    image = tmp_path / "image"
    make_image(image, 2048, seed=4)
    output = str(tmp_path / "out.img")
    with LiveWriter(str(image), str(tmp_path / "count"), seed=5, rate=0) as writer:
        writer.wait_writes(100)
        sent, _ = await transfer_in_process(
            str(image), output, channels=2, pacer=TokenBucket(16 * MiB),
            live=signal_control(writer, max_downtime_s=0.001, max_rounds=3))
        frozen = read_bytes(str(image))
    assert read_bytes(output) == frozen
    rounds = sent.to_dict()["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # the final round: 3
    assert all(r["pages"] > 0 for r in rounds)


async def test_a_failure_after_the_pause_resumes_the_writer(tmp_path) -> None:
    image = tmp_path / "image"
    make_image(image, 1024, seed=6)
    output = str(tmp_path / "out.img")
    with LiveWriter(str(image), str(tmp_path / "count"), seed=8, rate=2000) as writer:
        writer.wait_writes(10)

        async def break_when_paused(server: ReceiverServer) -> None:
            # The writer stopped: the final round is under way. Kill the job.
            while writer.state() != "T":
                await asyncio.sleep(0.001)
            for job in list(server.jobs.values()):
                job.fail(TransferError("the test breaks the job during the final round"))

        with pytest.raises(DsamigError):
            await transfer_in_process(
                str(image), output, break_when_paused, channels=2, retry_for_s=0,
                live=signal_control(writer, max_downtime_s=5))
        writer.wait_state(stopped=False)
        before = writer.writes()
        writer.wait_writes(before + 5)  # it runs again
    assert not os.path.exists(output)


async def wait_for_round(server: ReceiverServer, number: int) -> list:
    """Wait (bounded) until a job received round ``number``; return its channels."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for job in server.jobs.values():
            if job.core.round >= number and job.channels:
                return list(job.channels.values())
        await asyncio.sleep(0.002)
    raise AssertionError(f"the job never reached round {number}")


async def test_channels_cut_during_a_round_heal(tmp_path) -> None:
    """Every channel reset in the middle of a pre-copy round: the sender
    reconnects, the receiver reports what it holds, packets it holds in an
    older version go again whole, and the copy is still the frozen image."""
    image = tmp_path / "image"
    make_image(image, 4096, seed=9)
    output = str(tmp_path / "out.img")
    with LiveWriter(str(image), str(tmp_path / "count"), seed=10, rate=0) as writer:
        writer.wait_writes(50)

        async def cut(server: ReceiverServer) -> None:
            for channel in await wait_for_round(server, 2):
                channel.transport.abort()

        sent, _ = await transfer_in_process(
            str(image), output, cut, channels=3, pacer=TokenBucket(32 * MiB),
            live=signal_control(writer, max_downtime_s=0.001, max_rounds=5))
        frozen = read_bytes(str(image))
    assert read_bytes(output) == frozen
    figures = sent.to_dict()
    assert figures["sessions"] >= 2
    assert 3 <= figures["rounds"][-1]["round"] <= 5  # cut in round 2, which went on


async def test_a_cancelled_live_job_resumes_the_writer_and_keeps_nothing(tmp_path) -> None:
    image = tmp_path / "image"
    make_image(image, 2048, seed=11)
    output = str(tmp_path / "out.img")
    with LiveWriter(str(image), str(tmp_path / "count"), seed=12, rate=0) as writer:
        writer.wait_writes(50)
        finished: asyncio.Future[ReceiverJob] = asyncio.get_running_loop().create_future()
        server = ReceiverServer(
            "127.0.0.1", 0, lambda hello: PageSink(output, hello.manifest.image_size),
            on_job_finished=lambda job: finished.done() or finished.set_result(job))
        _, port = await server.start()
        source = PageSource(str(image))
        try:
            sender = Sender(source, SendOptions(
                host="127.0.0.1", port=port, channels=2, pacer=TokenBucket(16 * MiB),
                live=signal_control(writer, max_downtime_s=0.001, max_rounds=50)))
            run = asyncio.ensure_future(sender.run())
            await wait_for_round(server, 1)
            sender.cancel("the operator changed their mind")
            with pytest.raises(asyncio.CancelledError):
                await run
            job = await asyncio.wait_for(finished, 20)
        finally:
            source.close()
            await server.close()
        # Cancelled in a pre-copy round: the writer was never paused.
        assert writer.state() != "T"
        writer.wait_writes(writer.writes() + 5)
    assert job.stats.status == "cancelled"
    assert not os.path.exists(output)
    assert not os.path.exists(output + ".partial")


async def test_a_receiver_killed_during_a_round_then_resumed(tmp_path) -> None:
    """The receiver process dies mid-round (SIGKILL: no goodbye, a checkpoint
    as old as its last write). A new one resumes the job: packets whose
    record no longer matches the image go again, and the copy is exact."""
    image = tmp_path / "image"
    make_image(image, 4096, seed=13)
    output = str(tmp_path / "out.img")
    with LiveWriter(str(image), str(tmp_path / "count"), seed=14, rate=0) as writer:
        writer.wait_writes(50)
        live = signal_control(writer, max_downtime_s=0.001, max_rounds=1000)
        receiver = Receiver.start(output)
        source = PageSource(str(image))
        try:
            first = Sender(source, SendOptions(
                host="127.0.0.1", port=receiver.port, channels=2, retry_for_s=0,
                pacer=TokenBucket(32 * MiB), live=live))
            run = asyncio.ensure_future(first.run())
            deadline = time.monotonic() + 20
            while first.stats.extra.get("round", 0) < 2:
                assert time.monotonic() < deadline and not run.done(), "no round 2"
                await asyncio.sleep(0.002)
            receiver.kill()
            with pytest.raises(DsamigError):
                await run
            assert writer.state() != "T"  # never paused
            assert os.path.exists(output + ".partial")
            receiver = Receiver.start(output, "--once")
            second = Sender(source, SendOptions(
                host="127.0.0.1", port=receiver.port, channels=2, resume=True,
                job_id=first.options.job_id,
                live=signal_control(writer, max_downtime_s=0.05, max_rounds=4)))
            sent = await asyncio.wait_for(second.run(), 60)
            code, _, err = receiver.finish()
        finally:
            receiver.kill()
            source.close()
        frozen = read_bytes(str(image))
    assert code == 0, err
    assert read_bytes(output) == frozen
    assert sent.counters.resumed_packets > 0 or sent.counters.reused_bytes > 0
