"""Both data paths, in every combination: the same bytes, counts and figures.

The native path (a thread per channel on each side) is the default where the
extension loaded; the loop path serves TLS and the pure-Python twin. Each
combination moves the same image and must produce the same destination,
byte for byte, and the same page counts; the stats say which path ran.
"""

from __future__ import annotations

import json
import os

import pytest

from dsamig.native import impl
from tests.conftest import read_bytes
from tests.integration.helpers import Receiver, dsamig, transfer_in_process

MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(not hasattr(impl, "SendPump"),
                                reason="native pumps need the extension")

RECEIVERS = {
    "loop": {"native": False},
    "native-pwrite": {"native": True, "receive_path": "pwrite"},
    "native-mmap": {"native": True, "receive_path": "mmap"},
}


@pytest.mark.parametrize("sender_native", [True, False], ids=["send-native", "send-loop"])
@pytest.mark.parametrize("receiver", RECEIVERS)
async def test_every_combination_moves_the_same_bytes(
    tmp_path, image_factory, sender_native: bool, receiver: str
) -> None:
    image, zero, normal = image_factory(9 * MiB + 4095, seed=31, zero_every=3)
    output = str(tmp_path / "out.img")
    sent, received = await transfer_in_process(
        image, output, receiver=RECEIVERS[receiver], channels=3, native=sender_native)
    assert read_bytes(output) == read_bytes(image)
    for stats in (sent, received):
        assert (stats.counters.zero_pages, stats.counters.normal_pages) == (zero, normal)
    assert sent.to_dict()["data-path"] == ("native" if sender_native else "loop")
    assert received.to_dict()["data-path"] == ("loop" if receiver == "loop" else "native")
    if receiver != "loop":
        assert received.to_dict()["receive-path"] == RECEIVERS[receiver]["receive_path"]
    # Zero pages are never written, on either path: the copy stays sparse.
    assert os.stat(output).st_blocks * 512 <= normal * 4096 + 64 * 1024
    assert sent.transferred == received.transferred


async def test_channel_threads_show_in_the_cpu_figures(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(16 * MiB, seed=32, zero_every=4)
    output = str(tmp_path / "out.img")
    sent, received = await transfer_in_process(image, output, channels=2)
    assert {"dsamig-send-0", "dsamig-send-1"} <= set(sent.threads)
    assert {"dsamig-recv-0", "dsamig-recv-1"} <= set(received.threads)


def test_the_receive_commands_report_has_every_channel_thread(tmp_path, image_factory) -> None:
    """``receive --json`` reports once the job's channel threads have ended:
    each one's CPU time is there, though they end after the commit."""
    image, _, _ = image_factory(16 * MiB, seed=34, zero_every=4)
    output = str(tmp_path / "out.img")
    receiver = Receiver.start(output, "--once", "--json")
    try:
        sent = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "4")
        code, out, err = receiver.finish()
    finally:
        receiver.kill()
    assert sent.returncode == 0 and code == 0, (sent.stderr, err)
    report = json.loads(out.splitlines()[-1])
    assert report["data-path"] == "native"
    assert {f"dsamig-recv-{i}" for i in range(4)} <= set(report["thread-cpu-s"])
    assert read_bytes(output) == read_bytes(image)


async def test_a_resumed_job_on_the_native_path_sends_only_the_rest(
    tmp_path, image_factory
) -> None:
    """Packets the receiver holds are checked (VERIFY on the sending thread),
    not sent; the copy is exact."""
    from tests.fault.test_resume import PACKET, checkpoint_of, crashed_partial

    image, _, _ = image_factory(8 * MiB, seed=33, zero_every=5)
    output = str(tmp_path / "out.img")
    done = list(range(10))
    crashed_partial(image, output, done, garbage=[11, 12])
    with open(output + ".partial.progress", "wb") as f:
        f.write(checkpoint_of(image, done))
    sent, received = await transfer_in_process(image, output, channels=2, resume=True,
                                               packet_size=PACKET,
                                               receiver=RECEIVERS["native-mmap"])
    assert read_bytes(output) == read_bytes(image)
    assert received.counters.resumed_packets == len(done)
    assert sent.counters.reused_bytes == len(done) * PACKET
    assert sent.to_dict()["data-path"] == "native"
