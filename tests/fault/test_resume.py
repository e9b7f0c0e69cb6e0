"""Self-healing and resume: broken channels, killed daemons, a changed image.

Each test injects the failure, lets dsamig recover, and checks the exact bytes
of the destination, what the stats say was sent again, and what is left on
disk.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from dsamig.proto.receive_core import MIN_WINDOW_BYTES as WINDOW_BYTES
from dsamig.transport.receiver import ReceiverServer
from tests.conftest import read_bytes
from tests.integration.helpers import TIMEOUT_S, Receiver, last_json, transfer_in_process

MiB = 1024 * 1024


async def wait_for_packets(server: ReceiverServer, packets: int) -> list:
    """Wait until a job has ``packets`` done; return its channels (bounded)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for job in server.jobs.values():
            if job.tracker.received_packets >= packets and job.channels:
                return list(job.channels.values())
        await asyncio.sleep(0.002)
    raise AssertionError("transfer never got that far")


@pytest.mark.parametrize("which", ["one", "all"])
async def test_channel_reset_heals(tmp_path, image_factory, which: str) -> None:
    image, zero, normal = image_factory(48 * MiB, seed=11, zero_every=4)
    output = str(tmp_path / "out.img")

    async def cut(server: ReceiverServer) -> None:
        channels = await wait_for_packets(server, 20)
        for channel in channels[:1] if which == "one" else channels:
            assert channel.transport is not None
            channel.transport.abort()  # a reset, as a dying peer or middlebox sends

    sent, received = await transfer_in_process(
        image, output, cut, channels=4, packet_size=256 * 1024
    )
    assert read_bytes(output) == read_bytes(image)
    assert (received.counters.zero_pages, received.counters.normal_pages) == (zero, normal)
    assert (sent.counters.zero_pages, sent.counters.normal_pages) == (zero, normal)
    stats = sent.to_dict()
    assert stats["sessions"] >= 2
    # Only what was not yet acknowledged is sent again: at most a window per channel.
    assert stats["retransmitted-bytes"] <= 4 * WINDOW_BYTES
    assert not os.path.exists(output + ".partial")
    assert not os.path.exists(output + ".partial.progress")


async def test_corrupted_payload_is_resent(tmp_path, image_factory) -> None:
    """A payload that fails its CRC is never stored: the channel is dropped and
    the packet comes again. (The loop path, whose buffer this test can reach;
    tests/fault/test_fault_matrix.py corrupts payloads on the wire for both.)"""
    image, zero, normal = image_factory(16 * MiB, seed=12, zero_every=5)
    output = str(tmp_path / "out.img")
    flipped = []

    async def corrupt(server: ReceiverServer) -> None:
        channels = await wait_for_packets(server, 3)
        channel = channels[0]
        original = channel._packet_complete

        def flip_once() -> None:
            if not flipped and channel.current is not None and channel.current.payload_length:
                assert channel.payload is not None
                channel.payload[100] ^= 0x40  # one bit, as a bad NIC or cable would
                flipped.append(channel.current.packet_number)
            original()

        channel._packet_complete = flip_once  # type: ignore[method-assign]

    sent, received = await transfer_in_process(image, output, corrupt,
                                                receiver={"native": False}, channels=2)
    assert flipped, "no packet was corrupted"
    assert read_bytes(output) == read_bytes(image)
    assert (received.counters.zero_pages, received.counters.normal_pages) == (zero, normal)
    assert sent.to_dict()["sessions"] >= 2


def start_receiver(output: str, port: int = 0) -> Receiver:
    """``dsamig receive --once --json`` on ``port`` (0: any; a restarted
    receiver takes the port its predecessor reported)."""
    return Receiver.start(output, "--once", "--json", port=port)


def start_sender(image: str, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dsamig", "send", image, "--to", f"127.0.0.1:{port}",
         "--channels", "2", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def kill_mid_transfer(proc: subprocess.Popen[str], output: str) -> None:
    """SIGKILL ``proc`` once the receiver has checkpointed part of the job and
    stored more since (so that part of the image is held, part is not)."""
    wait_for_progress(output)
    wait_for_stored(output, stored(output) + MiB)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)  # reaps it and closes its pipes


def stored(output: str) -> int:
    """Bytes of data the partial file holds (its allocated blocks)."""
    try:
        return os.stat(output + ".partial").st_blocks * 512
    except FileNotFoundError:
        return 0


def wait_for_stored(output: str, at_least: int) -> None:
    """Wait until the partial file holds ``at_least`` bytes of data (bounded)."""
    deadline = time.monotonic() + 20
    while stored(output) < at_least:
        if time.monotonic() > deadline:
            raise AssertionError(f"the receiver never stored {at_least} bytes")
        time.sleep(0.02)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Wait for ``proc`` (bounded): exit code, stdout, stderr."""
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


def reap(*procs: subprocess.Popen[str]) -> None:
    """Kill whatever a failed test left running."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes its pipes


def wait_for_progress(output: str, min_bytes: int = 1) -> None:
    """Wait until the receiver has a checkpoint (bounded)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if os.path.getsize(output + ".partial.progress") >= min_bytes:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError("the receiver never wrote a checkpoint")


def test_receiver_killed_and_restarted(tmp_path, image_factory) -> None:
    image, zero, normal = image_factory(40 * MiB, seed=13, zero_every=3)
    output = str(tmp_path / "dest.img")
    receiver = start_receiver(output)
    sender = start_sender(image, receiver.port, "--max-bandwidth", "10MiB", "--retry-for", "30")
    try:
        kill_mid_transfer(receiver.proc, output)
        assert not os.path.exists(output)  # nothing that looks complete
        assert os.path.exists(output + ".partial")
        receiver = start_receiver(output, receiver.port)
        sent_code, out, err = finish(sender)
        code, rout, rerr = receiver.finish()
    finally:
        reap(sender)
        receiver.kill()
    assert sent_code == 0, err
    assert code == 0, rerr
    assert read_bytes(output) == read_bytes(image)
    sent, received = last_json(out), last_json(rout)
    assert sent["sessions"] >= 2
    assert received["resumed-packets"] > 0  # the restarted receiver kept what it had
    # Acknowledged data is durable: only the unacknowledged window is sent again.
    assert sent["retransmitted-bytes"] <= 2 * WINDOW_BYTES
    assert (received["duplicate"], received["normal"]) == (zero, normal)
    assert not os.path.exists(output + ".partial")


@pytest.mark.parametrize("change", [False, True], ids=["same-image", "changed-image"])
def test_sender_killed_and_resumed(tmp_path, image_factory, change: bool) -> None:
    image, zero, normal = image_factory(32 * MiB, seed=14, zero_every=3)
    output = str(tmp_path / "dest.img")
    receiver = start_receiver(output)
    first = start_sender(image, receiver.port, "--max-bandwidth", "8MiB")
    try:
        kill_mid_transfer(first, output)
        if change:
            with open(image, "r+b") as f:  # the guest ran on meanwhile
                f.seek(4096 * 7 + 11)
                f.write(b"changed")
        second = start_sender(image, receiver.port, "--resume")
        sent_code, out, err = finish(second)
        code, rout, rerr = receiver.finish()
    finally:
        reap(first)
        receiver.kill()
    assert sent_code == 0, err
    assert code == 0, rerr
    assert read_bytes(output) == read_bytes(image)
    sent, received = last_json(out), last_json(rout)
    image_bytes = os.path.getsize(image)
    if change:
        # Refused: the receiver's packet 0 no longer matches; everything is sent.
        assert "resumed-packets" not in received or received["resumed-packets"] == 0
        assert sent["normal-bytes"] == normal * 4096
        assert sent["transferred"] > normal * 4096
    else:
        assert received["resumed-packets"] > 0
        # What the receiver held was checked, not sent again.
        assert sent["transferred"] < image_bytes - zero * 4096
    assert not os.path.exists(output + ".partial")


# --- crash states, built deterministically ---------------------------------------------

PACKET = 128 * 4096  # the packet of the jobs these crashed partials belong to


def checkpoint_of(image: str, done: list[int]) -> bytes:
    """The checkpoint a receiver would have written holding ``done`` packets of
    ``image``: their real records, as if they had arrived and been made durable."""
    from dsamig.native import impl
    from dsamig.proto import Manifest, PacketHeader, PacketTracker

    data = read_bytes(image)
    manifest = Manifest(image_size=len(data))
    tracker = PacketTracker(manifest)
    for n in done:
        offset, span = manifest.range_bytes(n, 1)
        chunk = data[offset : offset + span]
        bitmap, _ = impl.zero_bitmap(chunk, 4096)
        _, length, crc = impl.packet_payload(memoryview(chunk), bitmap, 4096)
        header = PacketHeader(n, n * 128, manifest.pages_in_packet(n), length, crc, bitmap)
        tracker.check_packet(header)
        tracker.packet_done(header, crc)
    return tracker.snapshot().to_bytes()


def crashed_partial(image: str, output: str, done: list[int], garbage: list[int]) -> None:
    """A .partial as a receiver killed between writing and checkpointing leaves it:
    the image's bytes in ``done`` packets, other bytes in ``garbage`` packets."""
    data = read_bytes(image)
    with open(output + ".partial", "wb") as f:
        f.truncate(len(data))
        for n in done:
            f.seek(n * PACKET)
            f.write(data[n * PACKET : (n + 1) * PACKET])
        for n in garbage:
            f.seek(n * PACKET)
            f.write(bytes([0xA5]) * PACKET)


async def test_resume_clears_what_the_checkpoint_does_not_cover(tmp_path, image_factory) -> None:
    """Packets written but never checkpointed held old bytes; the resumed source
    is zero there, zero pages are never written, and the copy used to commit
    with the old bytes in it."""
    image, _zero, _normal = image_factory(8 * MiB, seed=21, zero_every=3)
    with open(image, "r+b") as f:  # packets 5 and 9 are all zero in the source now
        for n in (5, 9):
            f.seek(n * PACKET)
            f.write(bytes(PACKET))
    output = str(tmp_path / "out.img")
    done = [0, 1, 2, 3]
    crashed_partial(image, output, done, garbage=[5, 6, 9, 15])
    with open(output + ".partial.progress", "wb") as f:
        f.write(checkpoint_of(image, done))
    _sent, received = await transfer_in_process(image, output, channels=2, resume=True,
                                                packet_size=PACKET)
    assert read_bytes(output) == read_bytes(image)
    assert received.counters.resumed_packets == len(done)
    assert not os.path.exists(output + ".partial")


async def test_a_resume_with_another_packet_size_starts_over(tmp_path, image_factory) -> None:
    """A job checkpointed with 512 KiB packets, resumed with the snapshot default
    (2 MiB): the records cannot be compared, so nothing is reused, and the
    garbage the crash left is overwritten or cleared."""
    image, zero, normal = image_factory(8 * MiB, seed=24, zero_every=3)
    output = str(tmp_path / "out.img")
    done = [0, 1, 2, 3]
    crashed_partial(image, output, done, garbage=[5, 6, 9, 15])
    with open(output + ".partial.progress", "wb") as f:
        f.write(checkpoint_of(image, done))
    sent, received = await transfer_in_process(image, output, channels=2, resume=True)
    assert sent.counters.resumed_packets == received.counters.resumed_packets == 0
    assert (received.counters.zero_pages, received.counters.normal_pages) == (zero, normal)
    assert read_bytes(output) == read_bytes(image)
    assert not os.path.exists(output + ".partial")


async def test_a_partial_without_checkpoint_starts_empty(tmp_path, image_factory) -> None:
    image, zero, normal = image_factory(4 * MiB, seed=22, zero_every=2)
    output = str(tmp_path / "out.img")
    crashed_partial(image, output, done=[], garbage=list(range(8)))
    _sent, received = await transfer_in_process(image, output, channels=2, resume=True,
                                                packet_size=PACKET)
    assert read_bytes(output) == read_bytes(image)
    assert received.counters.resumed_packets == 0
    assert (received.counters.zero_pages, received.counters.normal_pages) == (zero, normal)


async def test_a_damaged_checkpoint_starts_empty(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(4 * MiB, seed=23, zero_every=2)
    output = str(tmp_path / "out.img")
    crashed_partial(image, output, done=[0, 1], garbage=[2, 3, 4])
    with open(output + ".partial.progress", "wb") as f:
        f.write(checkpoint_of(image, [0, 1])[:-3])
    await transfer_in_process(image, output, channels=2, resume=True, packet_size=PACKET)
    assert read_bytes(output) == read_bytes(image)
