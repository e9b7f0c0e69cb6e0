"""Every case of QEMU's tests/unit/test-dsa.c, on the software DSA device.

QEMU's suite skips itself without a configured /dev/dsa/wq4.0; these run the
same engine code a real work queue would get, through the emulated portal.
The mapping: init/start/stop/cleanup are DsaEngineCore's configure/start/
stop/cleanup; a "task" is a batch submitted with submit() and collected.
"""

from __future__ import annotations

import mmap
import os

import pytest

from dsamig.dsa_config import DsaConfig
from dsamig.engine.select import create_engine
from dsamig.errors import EngineError
from tests.engine.dsa_helpers import (
    PAGE,
    assert_oracle,
    crafted_pages,
    emulated,
    requires_native,
    run_core,
)

pytestmark = requires_native

BATCH = 128  # QEMU's batch_size
MAX_BUFFER = 64 * 1024


@pytest.fixture
def core():
    from dsamig.native import native

    cores = []

    def make(wqs=None, **kwargs):
        c = native.DsaEngineCore(wqs, **kwargs)
        cores.append(c)
        return c

    yield make
    for c in cores:
        c.close()


def one_task(c, pages: int = 4) -> None:
    data = crafted_pages(pages, seed=pages)
    assert_oracle(run_core(c, [data]), [data])


def test_multiple_engines(core) -> None:
    """/dsa/multiple_engines: two WQs, tasks land on different ones."""
    c = core(emulated(2, max_batch_size=BATCH))
    buffers = [crafted_pages(BATCH, seed=s) for s in (1, 2)]
    assert_oracle(run_core(c, buffers), buffers)
    assert [wq["jobs"] for wq in c.wq_stats()] == [1, 1]
    assert all(wq["descriptors"] > 0 for wq in c.wq_stats())


def test_batch(core) -> None:
    """/dsa/async/batch: pages 0-9 zero, 10-19 all 0xff, the rest anything."""
    c = core(emulated(1, max_batch_size=BATCH))
    data = bytearray(os.urandom(BATCH * PAGE))
    data[: 10 * PAGE] = bytes(10 * PAGE)
    data[10 * PAGE : 20 * PAGE] = b"\xff" * (10 * PAGE)
    assert_oracle(run_core(c, [data]), [data])
    stats = c.stats()
    assert (stats["batches"], stats["descriptors"]) == (1, BATCH + 1)


@pytest.mark.parametrize("length", [16 << k for k in range(13)])  # 16 B .. 64 KiB
def test_various_buffer_sizes(core, length: int) -> None:
    """/dsa/async/various_buffer_sizes: 128 buffers of each length per batch."""
    c = core(emulated(1, max_batch_size=BATCH))
    data = bytearray(BATCH * length)
    for i in range(0, BATCH, 3):
        data[i * length + (i * 7) % length] = 1
    assert_oracle(run_core(c, [data], page_size=length), [data], page_size=length)


def test_pages_larger_than_the_transfer_limit(core) -> None:
    """A page over max_transfer_size is split into several descriptors."""
    c = core(emulated(1, max_batch_size=BATCH, max_transfer_size=4096))
    length = MAX_BUFFER
    data = bytearray(32 * length + 5000)
    for i in range(0, 32, 2):
        data[i * length + length - 1] = 1  # only in the last piece of the page
    assert_oracle(run_core(c, [data], page_size=length), [data], page_size=length)
    assert c.stats()["descriptors"] > 32 * (length // 4096)


def test_null_buffer(core) -> None:
    """/dsa/async/null_buf: a clear error, not a crash."""
    c = core(emulated(1))
    with pytest.raises(TypeError):
        c.submit(None, PAGE, BATCH)


def test_zero_length(core) -> None:
    """/dsa/async/zero_len: a page length of 0 is refused."""
    c = core(emulated(1))
    with pytest.raises(ValueError):
        c.submit(bytearray(PAGE), 0, BATCH)


def test_zero_count(core) -> None:
    """/dsa/async/zero_count: nothing to check returns at once, DSA untouched."""
    c = core(emulated(1))
    with pytest.raises(ValueError):
        c.submit(b"", PAGE, BATCH)
    assert c.stats()["descriptors"] == 0
    assert c.in_flight == 0


def test_oversized_batch(core) -> None:
    """/dsa/async/oversized_batch: 129 pages with a 128 limit become a
    BATCH of 128 and a lone descriptor, never a batch the WQ would refuse."""
    c = core(emulated(1, max_batch_size=BATCH))
    data = crafted_pages(BATCH + 1, seed=9)
    assert_oracle(run_core(c, [data]), [data])
    stats = c.stats()
    assert (stats["batches"], stats["descriptors"], stats["errors"]) == (1, BATCH + 2, 0)
    assert c.wq_stats()[0]["device"]["invalid"] == 0


@pytest.mark.parametrize("fill", [0, 1])
def test_single_page(core, fill: int) -> None:
    """/dsa/async/single_zero and single_nonzero: one page, one lone descriptor."""
    c = core(emulated(1))
    data = bytes([fill]) * PAGE
    [(_, bitmap, zero, status, _)] = run_core(c, [data])
    assert (bitmap, zero, status) == ((b"\x01", 1, 0) if fill == 0 else (b"\x00", 0, 0))
    stats = c.stats()
    assert (stats["batches"], stats["descriptors"]) == (0, 1)


def test_null_task(core) -> None:
    """/dsa/async/null_task: using an engine that is not set up is an error."""
    c = core()
    with pytest.raises(RuntimeError):
        c.submit(bytes(PAGE), PAGE, BATCH)


@pytest.mark.parametrize("mapping", ["shared-anonymous", "private-anonymous"])
def test_page_fault(core, mapping: str) -> None:
    """/dsa/async/page_fault: untouched memory.  Without prefaulting the
    device faults on it and the CPU finishes; with prefaulting it does not."""
    flags = mmap.MAP_SHARED if mapping == "shared-anonymous" else mmap.MAP_PRIVATE
    for prefault in (False, True):
        c = core(emulated(1, max_batch_size=BATCH), prefault=prefault)
        region = mmap.mmap(-1, BATCH * PAGE * 2, flags=flags | mmap.MAP_ANONYMOUS)
        try:
            view = memoryview(region)
            results = run_core(c, [view[: BATCH * PAGE], view[BATCH * PAGE :]])
            assert [r[1] for r in results] == [b"\xff" * 16] * 2
            stats = c.stats()
            device = c.wq_stats()[0]["device"]
            if prefault:
                assert stats["page-faults"] == device["faults-absent"] == 0
            else:
                assert stats["page-faults"] == device["faults-absent"] > 0
                assert stats["cpu-fallback-pages"] > 0
            del view
        finally:
            c.close()
            region.close()


def test_double_start_stop(core) -> None:
    """/dsa/double_start_stop."""
    c = core(emulated(1), start=False)
    c.start()
    c.start()
    assert c.is_running
    one_task(c)
    c.stop()
    c.stop()
    assert not c.is_running
    with pytest.raises(RuntimeError):
        c.submit(bytes(PAGE), PAGE, BATCH)
    c.start()
    assert c.is_running
    one_task(c)


def test_is_running(core) -> None:
    """/dsa/is_running."""
    c = core(emulated(1), start=False)
    assert c.is_configured and not c.is_running
    c.start()
    assert c.is_running
    c.stop()
    assert not c.is_running


def test_configure_twice(core) -> None:
    """/dsa/configure_dsa_twice: the second configuration replaces the first."""
    c = core(emulated(2), start=False)
    c.configure(emulated(2))
    c.start()
    one_task(c)
    assert len(c.wq_stats()) == 2


def test_configure_bad_path(core, tmp_path) -> None:
    """/dsa/configure_dsa_bad_path: a clean failure that names the path."""
    c = core()
    with pytest.raises(OSError, match="/not/a/real/path"):
        c.configure([{"path": "/not/a/real/path"}])
    regular = tmp_path / "wq0.0"
    regular.write_bytes(b"")
    with pytest.raises(OSError, match="not a DSA work queue"):
        c.configure([{"path": str(regular)}])
    # A bad WQ after a good one leaves nothing open or configured.
    with pytest.raises(OSError):
        c.configure([{"size": 8}, {"path": "/not/a/real/path"}])
    assert not c.is_configured


async def test_engine_dsa_with_a_bad_path_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match="/not/a/real/path"):
        create_engine("dsa", dsa=DsaConfig(wqs=["/not/a/real/path"]))


def test_cleanup_before_configure(core) -> None:
    """/dsa/cleanup_before_configure."""
    c = core()
    c.cleanup()
    c.configure(emulated(1))
    c.start()
    one_task(c)


def test_configure_num_devices(core) -> None:
    """/dsa/configure_dsa_num_devices: one WQ, start, task, stop, cleanup."""
    c = core(emulated(1), start=False)
    c.start()
    one_task(c)
    c.stop()
    c.cleanup()
    assert not c.is_configured
    with pytest.raises(ValueError):
        c.configure([])


def test_cleanup_twice_and_reinit(core) -> None:
    """/dsa/cleanup_twice, then re-init after cleanup."""
    c = core(emulated(1))
    one_task(c)
    c.cleanup()
    c.cleanup()
    assert not c.is_running and not c.is_configured
    c.configure(emulated(2))
    c.start()
    one_task(c, pages=300)
