"""Disk full on the receiver: a clear ENOSPC error for that job, and the receiver goes on.

The destination lives on a small tmpfs mounted for the test, so the disk
really fills up: the receiver gets ENOSPC from ``pwrite`` (never a SIGBUS,
since it does not write through a mapping), fails that job with ERROR IO,
and serves the next one once space is free.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess

import pytest

from dsamig.checksum import crc32c
from dsamig.native import impl
from dsamig.proto import encode_packet_header
from dsamig.settings import EXIT_TRANSFER
from tests.conftest import read_bytes, requires_extension
from tests.fault.test_bad_input import assert_one_line_error
from tests.integration.helpers import Receiver, dsamig

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs, unmounted afterwards (skipped where mounting is not allowed)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): "
                    f"{result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


def fill(directory, nbytes: int) -> str:
    path = os.path.join(directory, "filler")
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
    return path


def test_disk_full_fails_the_job_not_the_receiver(small_fs, image_factory) -> None:
    big, _, _ = image_factory(6 * MiB, seed=1, zero_every=0)
    small, _, _ = image_factory(5 * MiB, seed=2, zero_every=4)
    output = str(small_fs / "dest.img")
    filler = fill(small_fs, 4 * MiB)
    receiver = Receiver.start(output)  # no --once: it must serve the next job
    try:
        failed = dsamig("send", big, "--to", f"127.0.0.1:{receiver.port}", "--channels", "2")
        assert failed.returncode == EXIT_TRANSFER
        assert_one_line_error(failed.stderr, "(IO)", "no space left on device writing",
                              "dest.img.partial")
        assert receiver.proc.poll() is None, "the receiver died"
        assert not os.path.exists(output)
        # Kept for a resume: the full size, sparse, never under the final name.
        partial = output + ".partial"
        assert not os.path.exists(partial) or os.path.getsize(partial) == 6 * MiB

        os.unlink(filler)
        done = dsamig("send", small, "--to", f"127.0.0.1:{receiver.port}", "--channels", "2")
        assert done.returncode == 0, done.stderr
        assert read_bytes(output) == read_bytes(small)
        assert not os.path.exists(partial)
        assert receiver.proc.poll() is None
    finally:
        receiver.kill()


def test_disk_full_partial_resumes_once_space_is_freed(small_fs, image_factory) -> None:
    image, _, _ = image_factory(6 * MiB, seed=3, zero_every=0)
    output = str(small_fs / "dest.img")
    filler = fill(small_fs, 4 * MiB)
    receiver = Receiver.start(output)
    try:
        failed = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "1")
        assert failed.returncode == EXIT_TRANSFER
        assert "no space left on device" in failed.stderr
        os.unlink(filler)
        resumed = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "1",
                         "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert read_bytes(output) == read_bytes(image)
        assert not os.path.exists(output + ".partial")
    finally:
        receiver.kill()


def fill_up(directory) -> None:
    """Write into ``directory`` until its file system is full."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(MiB))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def events_until_stopped(pump, timeout_s: float = 10.0) -> list[tuple]:
    """The pump's events up to its last ("stopped"), waiting at most
    ``timeout_s`` for each."""
    events = pump.collect()
    while not events or events[-1][0] != "stopped":
        readable, _, _ = select.select([pump.fileno()], [], [], timeout_s)
        assert readable, "the receiving thread said nothing: stuck on the job's write lock?"
        events += pump.collect()
    return events


@requires_extension
def test_a_full_disk_on_one_channel_leaves_no_other_waiting_to_write(small_fs) -> None:
    """A job's receiving threads write one packet at a time (the job's write
    lock). ENOSPC in the middle of one's writes must release the lock: every
    channel that writes next gets its own ENOSPC and ends, none waits."""
    page, pages, channels = 4096, 128, 3
    size = channels * pages * page
    payload = os.urandom(pages * page)
    fd = os.open(small_fs / "dest.img", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)  # sparse: no blocks yet
    fill_up(small_fs)
    shared = impl.RecvJobShared(bytearray(channels), size, channels, page, pages, False, fd,
                                "pwrite")
    pairs = [socket.socketpair() for _ in range(channels)]
    pumps = [impl.RecvPump(shared, os.dup(ours.fileno()), index, b"", pages * page)
             for index, (ours, _) in enumerate(pairs)]
    try:
        for pump in pumps:
            pump.start()
        for n, (pump, (_, peer)) in enumerate(zip(pumps, pairs, strict=True)):
            peer.sendall(encode_packet_header(n, n * pages, pages, len(payload),
                                              crc32c(payload), bytes(pages // 8)) + payload)
            # The error, then the end, with the packet claimed and never stored.
            assert events_until_stopped(pump) == [("error", errno.ENOSPC, True, n),
                                                  ("stopped", n)]
    finally:
        for pump in pumps:
            pump.close(5.0)
        shared.close()
        for pair in pairs:
            for end in pair:
                end.close()
