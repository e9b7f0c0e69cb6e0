"""A real QEMU (TCG): the QMP client, pausing a guest, and the x-ignore-shared recipe.

The recipe dsamig automates: the guest's RAM is a ``memory-backend-file``
with ``share=on``; the file is moved to the destination host while the guest
is paused (here a plain copy, or pre-copy rounds of the building blocks);
QEMU then migrates only the device state with ``x-ignore-shared`` into a
destination QEMU started with ``-incoming`` on the moved file.
"""

from __future__ import annotations

import mmap
import os
import shutil

import pytest

from dsamig.live.dirty import ContentDirtySource
from dsamig.live.pause import PausedWriter, QmpWriterControl
from dsamig.live.qmp import QmpError
from tests.qemu_helpers import (
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


@pytest.fixture
def source(kernel, tmp_path):
    with QemuVm(str(tmp_path), "source", make_memory_file(str(tmp_path / "source.mem")),
                kernel=kernel) as vm:
        vm.wait_ticks(2)
        yield vm


async def test_qmp_client_stop_cont_and_errors(source) -> None:
    async with await source.connect() as qmp:
        assert qmp.greeting["version"]["qemu"]["major"] >= 7
        assert (await qmp.query_status())["status"] == "running"
        assert (await qmp.stop())["status"] == "paused"
        paused_at = len(source.ticks())
        assert (await qmp.cont())["status"] == "running"
        assert [e["event"] for e in qmp.take_events()] == ["STOP", "RESUME"]
        with pytest.raises(QmpError, match="no-such-command") as err:
            await qmp.execute("no-such-command")
        assert err.value.error_class == "CommandNotFound"
        # A migration to nowhere starts, fails, and wait_migration says why.
        await qmp.migrate("unix:/nonexistent/dsamig-migrate")
        with pytest.raises(QmpError, match=r"migration failed: Failed to connect to "
                                           r"'/nonexistent/dsamig-migrate'"):
            await qmp.wait_migration(timeout_s=TIMEOUT_S)
        assert (await qmp.query_status())["running"]
    source.wait_ticks(paused_at + 1)  # the guest runs on after cont


async def test_qmp_writer_control_resumes_the_guest_after_a_failure(source) -> None:
    control = QmpWriterControl(source.qmp_other, timeout_s=TIMEOUT_S)
    with pytest.raises(RuntimeError, match="final round failed"):
        async with PausedWriter(control):
            async with await source.connect() as qmp:
                assert (await qmp.query_status())["status"] == "paused"
            raise RuntimeError("final round failed")
    async with await source.connect() as qmp:
        assert (await qmp.query_status())["status"] == "running"
    source.wait_ticks(len(source.ticks()) + 1)


async def test_a_guest_paused_by_its_operator_stays_paused(kernel, tmp_path) -> None:
    with QemuVm(str(tmp_path), "prelaunch", make_memory_file(str(tmp_path / "p.mem")),
                kernel=kernel, paused=True) as vm:
        control = QmpWriterControl(vm.qmp_other, timeout_s=TIMEOUT_S)
        with pytest.raises(RuntimeError):
            async with PausedWriter(control):
                raise RuntimeError("failed")
        assert control.was_running is False
        async with await vm.connect() as qmp:
            assert (await qmp.query_status())["status"] == "prelaunch"


async def test_no_monitor_is_a_clear_error(tmp_path) -> None:
    control = QmpWriterControl(str(tmp_path / "absent.qmp"), timeout_s=1)
    with pytest.raises(QmpError, match=r"absent\.qmp: cannot connect"):
        async with PausedWriter(control):
            pytest.fail("paused without a monitor")


async def test_file_copy_then_device_state_migration_runs_the_guest(source, tmp_path) -> None:
    """The recipe by hand: pause, copy the memory file, migrate the device state."""
    control = QmpWriterControl(source.qmp_other, timeout_s=TIMEOUT_S)
    async with PausedWriter(control):
        shutil.copyfile(source.mem_path, tmp_path / "dest.mem")
    with QemuVm(str(tmp_path), "dest", str(tmp_path / "dest.mem"), incoming=True) as dest:
        info = await migrate_device_state(source, dest)
        # Only device state and ROMs travel: far less than the guest's RAM.
        assert info["ram"]["transferred"] < MEM_SIZE // 8
        async with await dest.connect() as qmp:
            assert (await qmp.query_status())["status"] == "paused"  # as the source was
            assert (await qmp.cont())["status"] == "running"
        assert_ticks_continue(source, dest)


async def test_a_copy_taken_while_the_guest_runs_is_caught(source, tmp_path) -> None:
    """The check above can fail: memory older than the paused vCPUs shows up as BAD."""
    shutil.copyfile(source.mem_path, tmp_path / "dest.mem")
    source.wait_ticks(len(source.ticks()) + 1)  # the guest moved on after the copy
    async with PausedWriter(QmpWriterControl(source.qmp_other, timeout_s=TIMEOUT_S)):
        pass
    with QemuVm(str(tmp_path), "dest", str(tmp_path / "dest.mem"), incoming=True) as dest:
        await migrate_device_state(source, dest)
        async with await dest.connect() as qmp:
            await qmp.cont()
        with pytest.raises(AssertionError, match="BAD"):
            assert_ticks_continue(source, dest)


async def test_precopy_rounds_while_the_guest_runs(source, tmp_path) -> None:
    """The recipe dsamig will automate: rounds of changed pages while the guest
    runs, the last one with the guest stopped over QMP, then the device state."""
    dest_mem = make_memory_file(str(tmp_path / "dest.mem"))
    dirty = ContentDirtySource(MEM_SIZE, PAGE, 128)
    bounce = bytearray(128 * PAGE)
    sent = []

    def round_(image: mmap.mmap, fd: int, everything: bool) -> None:
        view = memoryview(image)
        ranges = ([(p, 128) for p in range(0, dirty.page_count, 128)] if everything else
                  [r for packet in list(dirty.dirty_packets(image)) for r in packet.runs()])
        for first, count in ranges:
            src = view[first * PAGE:(first + count) * PAGE]
            dirty.copy_out(bounce, src, first)
            os.pwrite(fd, bounce[: len(src)], first * PAGE)
        view.release()
        sent.append(sum(count for _, count in ranges))

    fd = os.open(dest_mem, os.O_RDWR)
    try:
        with open(source.mem_path, "rb") as f, \
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as image:
            round_(image, fd, everything=True)
            source.wait_ticks(len(source.ticks()) + 1)  # the guest wrote meanwhile
            round_(image, fd, everything=False)
            async with PausedWriter(QmpWriterControl(source.qmp_other, timeout_s=TIMEOUT_S)):
                round_(image, fd, everything=False)
                assert list(dirty.dirty_packets(image)) == []
    finally:
        os.close(fd)
    assert sent[0] == MEM_SIZE // PAGE and sent[1] > 0
    with QemuVm(str(tmp_path), "dest", dest_mem, incoming=True) as dest:
        await migrate_device_state(source, dest)
        async with await dest.connect() as qmp:
            await qmp.cont()
        assert_ticks_continue(source, dest)
