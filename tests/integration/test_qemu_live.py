"""A live transfer of a running QEMU guest's RAM, end to end, with the real VMM.

The source QEMU (TCG) runs the harness's guest with its RAM in a shared
memory-backend file; the guest rewrites its pages and counter all the time.
``dsamig receive --once`` and ``dsamig send --live --qmp`` (both real
processes) move that file while the guest runs, stop the guest over QMP for
the final round, and commit.  Then QEMU migrates only the device state
(``x-ignore-shared``) into a destination QEMU started on the *received*
file, and the guest must go on there exactly where it stopped: the serial
ticks continue without a gap and without ``BAD``, and the counter in the
destination's memory file moves past its value at the pause.
"""

from __future__ import annotations

import json
import mmap
import struct
import time

import pytest

from tests.conftest import read_bytes
from tests.integration.helpers import Receiver, dsamig
from tests.qemu_helpers import (
    COUNTER_ADDRESS,
    MEM_SIZE,
    TIMEOUT_S,
    QemuVm,
    assert_ticks_continue,
    guest_kernel,
    make_memory_file,
    migrate_device_state,
    require_qemu,
)

PAGE = 4096


@pytest.fixture(scope="module")
def kernel():
    require_qemu()
    with guest_kernel() as path:
        yield path


def counter_in(path: str) -> int:
    """The guest's count as its memory file holds it now."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as ram:
        return int(struct.unpack_from("<I", ram, COUNTER_ADDRESS)[0])


async def test_live_send_of_a_running_guest_then_device_state_migration(kernel, tmp_path
                                                                         ) -> None:
    received = str(tmp_path / "dest.mem")
    with QemuVm(str(tmp_path), "source", make_memory_file(str(tmp_path / "source.mem")),
                kernel=kernel) as source:
        source.wait_ticks(1)
        started_at = counter_in(source.mem_path)
        receiver = Receiver.start(received, "--once")
        try:
            sent = dsamig("send", source.mem_path, "--to", f"127.0.0.1:{receiver.port}",
                          "--channels", "2", "--live", "--qmp", source.qmp_other, "--json")
            code, _, err = receiver.finish()
        finally:
            receiver.kill()
        assert sent.returncode == 0, sent.stderr
        assert code == 0, err
        async with await source.connect() as qmp:
            # Without --resume-writer the guest stays stopped: it lives on at
            # the destination, and nothing writes its memory file any more.
            assert (await qmp.query_status())["status"] == "paused"
        frozen = read_bytes(source.mem_path)
        assert read_bytes(received) == frozen
        paused_at = counter_in(received)
        assert paused_at > started_at  # the guest counted while its RAM moved

        stats = json.loads(sent.stdout)
        assert stats["status"] == "completed"
        rounds = stats["rounds"]
        assert [r["round"] for r in rounds] == list(range(len(rounds)))
        assert len(rounds) >= 2  # round 0, then at least the final round
        assert stats["dirty-sync-count"] == len(rounds)
        assert stats["downtime"] >= 0 and stats["expected-downtime"] >= 0
        # Round 0 found the guest's code, counter and pages (the rest of its
        # 32 MiB is zero); the rounds after it sent what the guest rewrote
        # meanwhile, the counter's page at least.
        assert 0 < rounds[0]["pages"] < MEM_SIZE // PAGE
        assert sum(r["pages"] for r in rounds[1:]) >= 1

        with QemuVm(str(tmp_path), "dest", received, incoming=True) as dest:
            info = await migrate_device_state(source, dest)
            # Only device state and ROMs went through QEMU: not the guest's RAM.
            assert info["ram"]["transferred"] < MEM_SIZE // 8
            async with await dest.connect() as qmp:
                assert (await qmp.query_status())["status"] == "paused"  # as the source was
                assert (await qmp.cont())["status"] == "running"
            assert_ticks_continue(source, dest)
            deadline = time.monotonic() + TIMEOUT_S
            while counter_in(received) <= paused_at:
                assert time.monotonic() < deadline, "the destination guest does not count"
                time.sleep(0.01)
            async with await dest.connect() as qmp:
                assert (await qmp.query_status())["status"] == "running"
