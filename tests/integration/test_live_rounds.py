"""The live building blocks together, without the network: pre-copy rounds over a
real writer with the content dirty source, the final round with the writer
paused by --pause-cmd, and a destination byte-identical to the frozen image."""

from __future__ import annotations

import mmap
import os

from dsamig.live.dirty import ContentDirtySource
from dsamig.live.pause import PausedWriter, ShellWriterControl
from tests.live_writer import LiveWriter

PAGE = 4096
PACKET_PAGES = 16


def send_round(source: ContentDirtySource, image: mmap.mmap, dest_fd: int, *,
               everything: bool) -> int:
    """One round as the send core will run it: copy_out through a bounce buffer,
    write what was copied (the receiver's side, here a pwrite).  Returns pages."""
    view = memoryview(image)
    bounce = bytearray(PACKET_PAGES * PAGE)
    sent = 0
    if everything:
        ranges = [(first, min(PACKET_PAGES, source.page_count - first))
                  for first in range(0, source.page_count, PACKET_PAGES)]
    else:
        ranges = [run for packet in list(source.dirty_packets(image)) for run in packet.runs()]
    for first, count in ranges:
        start, end = first * PAGE, min((first + count) * PAGE, len(image))
        source.copy_out(bounce, view[start:end], first)
        os.pwrite(dest_fd, bounce[: end - start], start)
        sent += count
    view.release()
    return sent


async def test_precopy_rounds_then_paused_final_round_match_the_frozen_image(tmp_path) -> None:
    pages = 512
    path = tmp_path / "image"
    path.write_bytes(b"".join(bytes(PAGE) if i % 3 == 0 else os.urandom(PAGE)
                              for i in range(pages)))
    dest = tmp_path / "dest"
    source = ContentDirtySource(pages * PAGE, PAGE, PACKET_PAGES)
    with LiveWriter(str(path), str(tmp_path / "count"), seed=4, rate=3000) as writer, \
            open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as image:
        fd = os.open(dest, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, pages * PAGE)
            writer.wait_writes(10)
            rounds = [send_round(source, image, fd, everything=True)]
            for _ in range(3):
                writer.wait_writes(writer.writes() + 20)  # each round has work to find
                rounds.append(send_round(source, image, fd, everything=False))
            pause = (f"kill -STOP {writer.pid} && "
                     f"while ! grep -q '^State:.*T' /proc/{writer.pid}/status; do :; done")
            control = ShellWriterControl(pause, f"kill -CONT {writer.pid}")
            async with PausedWriter(control) as paused:
                final = send_round(source, image, fd, everything=False)
                assert list(source.dirty_packets(image)) == []
            assert paused.downtime_s > 0
            assert writer.state() == "T"  # kept paused: the image now lives at dest
            frozen = path.read_bytes()
        finally:
            os.close(fd)
    assert dest.read_bytes() == frozen
    assert rounds[0] == pages and all(rounds[1:]) and final >= 0
