"""Every fault the software DSA device can inject, end to end through the engine.

Whatever goes wrong on the device, the bitmaps must equal the CPU oracle's,
and the engine's counters must say what the device says it injected.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import time

import pytest

from dsamig.dsa_config import DsaConfig, FaultSpec
from dsamig.engine.select import create_engine
from tests.engine.dsa_helpers import (
    PAGE,
    assert_oracle,
    crafted_pages,
    device_total,
    emulated,
    oracle,
    requires_native,
    run_core,
    settled,
    workload,
)

pytestmark = requires_native


@pytest.fixture
def make_core():
    from dsamig.native import native

    cores = []

    def make(wqs, **kwargs):
        c = native.DsaEngineCore(wqs, **kwargs)
        cores.append(c)
        return c

    yield make
    for c in cores:
        c.close()


def test_page_faults(make_core) -> None:
    c = make_core(emulated(2, faults={"page-fault": 0.1, "seed": 1}))
    buffers = workload()
    assert_oracle(run_core(c, buffers), buffers)
    stats = c.stats()
    injected = device_total(c, "faults-injected")
    assert injected > 100
    assert stats["page-faults"] == injected
    assert device_total(c, "faults-absent") == 0  # prefaulted
    # A fault with a difference before it needs no CPU; one without does.
    assert 0 < stats["cpu-fallback-pages"] <= injected
    assert stats["batch-failures"] > 0 and stats["errors"] == stats["timeouts"] == 0
    assert all(wq["healthy"] for wq in c.wq_stats())


def test_batch_failures(make_core) -> None:
    c = make_core(emulated(2, faults={"batch-fail": 0.3, "seed": 2}))
    buffers = workload()
    assert_oracle(run_core(c, buffers), buffers)
    stats = c.stats()
    injected = device_total(c, "batch-fails-injected")
    assert injected > 5
    # One member of each failed batch came back with an error: the CPU
    # checked exactly that page.  A WQ is not blamed for it.
    assert stats["batch-failures"] == stats["errors"] == stats["cpu-fallback-pages"] == injected
    assert all(wq["healthy"] for wq in c.wq_stats())


def test_descriptor_list_faults(make_core) -> None:
    c = make_core(emulated(2, faults={"list-fault": 0.3, "seed": 3}))
    buffers = workload()
    assert_oracle(run_core(c, buffers), buffers)
    stats = c.stats()
    injected = device_total(c, "list-faults-injected")
    assert injected > 5
    assert stats["page-faults"] == injected
    assert stats["cpu-fallback-pages"] > 0  # the members never attempted


def test_hardware_errors(make_core) -> None:
    c = make_core(emulated(2, faults={"hw-error": 0.02, "seed": 4}))
    buffers = workload()
    assert_oracle(run_core(c, buffers), buffers)
    stats = c.stats()
    injected = device_total(c, "hw-errors-injected")
    assert injected >= 2
    assert stats["errors"] == injected
    # A hardware error quarantines the WQ; a NOOP probe re-admits it.
    wqs = settled(c)
    assert 1 <= stats["quarantines"] <= injected
    assert sum(wq["quarantines"] for wq in wqs) == stats["quarantines"]
    assert stats["readmissions"] >= 1
    assert all("0x20 (hardware error)" in wq["reason"] for wq in wqs if wq["quarantines"])
    assert stats["cpu-fallback-pages"] >= injected
    assert stats["retry-exhausted"] == stats["submit-failures"] == 0


def test_a_queue_that_keeps_failing_stays_out(make_core) -> None:
    """Every COMPVAL fails with a hardware error, every NOOP probe succeeds:
    re-admitted each time, but no clean completion forgives a strike, so
    the WQ is out after max_strikes, with the reason."""
    c = make_core(emulated(1, faults={"hw-error": 1.0}), max_strikes=3)
    for data in workload(4):  # one at a time, so each meets the WQ re-admitted
        assert_oracle(run_core(c, [data]), [data])
        settled(c)
    [wq] = c.wq_stats()
    assert wq["state"] == "out" and not wq["healthy"]
    assert wq["reason"].startswith("out after 3 failures in a row, the last: ")
    assert "0x20 (hardware error)" in wq["reason"]
    stats = c.stats()
    assert stats["quarantines"] == stats["readmissions"] == 2 and stats["wqs-out"] == 1
    # Out for good: later batches go to the CPU without touching the device.
    executed = device_total(c, "executed")
    more = crafted_pages(300, seed=6)
    assert_oracle(run_core(c, [more]), [more])
    assert device_total(c, "executed") == executed


def test_hang_is_bounded_by_the_timeout(make_core) -> None:
    timeout_s = 0.2
    # Probed at configure, a WQ where nothing completes is left out at once.
    with pytest.raises(OSError, match=r"emulated:0: a NOOP submitted with ENQCMD did not "
                                      r"complete in 0\.2 s"):
        make_core(emulated(1, faults={"hang": 1.0}), timeout_s=timeout_s)
    c = make_core(emulated(1, faults={"hang": 1.0}), timeout_s=timeout_s, probe=False,
                  max_strikes=3)
    data = crafted_pages(256, seed=5)
    start = time.monotonic()
    assert_oracle(run_core(c, [data], timeout_s=10), [data])
    elapsed = time.monotonic() - start
    assert timeout_s <= elapsed < timeout_s + 1.0
    stats = c.stats()
    assert stats["timeouts"] == 2
    assert stats["cpu-fallback-pages"] == 256
    assert stats["held"] == 1  # its records stay untouchable until cleanup
    # Quarantined; its probes never complete either, so it ends out.
    [wq] = settled(c)
    assert wq["state"] == "out" and "a NOOP probe did not complete in 0.2 s" in wq["reason"]
    stats = c.stats()
    assert stats["quarantines"] == 1 and stats["readmissions"] == 0
    assert stats["probe-timeouts"] == stats["probe-failures"] == 2
    assert device_total(c, "hangs-injected") == stats["timeouts"] + stats["probe-timeouts"]
    # The WQ gets no more work; the job goes on, on the CPU.
    more = crafted_pages(300, seed=6)
    start = time.monotonic()
    assert_oracle(run_core(c, [more]), [more])
    assert time.monotonic() - start < timeout_s
    assert device_total(c, "hangs-injected") == 4


def test_some_hangs_among_many(make_core) -> None:
    c = make_core(emulated(2, faults={"hang": 0.05, "seed": 7}), timeout_s=0.2)
    buffers = workload(8)
    assert_oracle(run_core(c, buffers), buffers)
    settled(c)
    stats = c.stats()
    assert stats["timeouts"] >= 1
    # Every hang is a unit's timeout or a probe's, nothing else.
    assert device_total(c, "hangs-injected") == stats["timeouts"] + stats["probe-timeouts"]


def test_shared_queue_full_retries(make_core) -> None:
    c = make_core(emulated(2, faults={"wq-full": 0.3, "seed": 8}))
    buffers = workload()
    assert_oracle(run_core(c, buffers), buffers)
    stats = c.stats()
    refused = device_total(c, "refused")
    assert refused == device_total(c, "wq-full-injected") > 10
    assert stats["submit-retries"] == refused
    assert stats["cpu-fallback-pages"] == stats["submit-failures"] == 0


def test_submission_gives_up_after_bounded_retries(make_core) -> None:
    # A WQ that refuses everything fails its probe at configure.
    with pytest.raises(OSError, match="a NOOP was refused 4 times: the shared WQ stays full"):
        make_core(emulated(1, faults={"wq-full": 1.0}), submit_attempts=4)
    c = make_core(emulated(1, faults={"wq-full": 1.0}), submit_attempts=4, probe=False,
                  max_strikes=3)
    data = crafted_pages(512, seed=9)
    start = time.monotonic()
    assert_oracle(run_core(c, [data]), [data])
    assert time.monotonic() - start < 1.0
    stats = c.stats()
    # An exhausted retry budget is not a device error: counted apart.
    assert stats["retry-exhausted"] == 1 and stats["submit-failures"] == stats["errors"] == 0
    assert stats["cpu-fallback-pages"] == 512
    [wq] = settled(c)
    assert wq["retry-exhausted"] == 1 and wq["quarantines"] == 1
    # The probes are refused too: out after max_strikes, saying so.
    assert wq["state"] == "out" and "refused a NOOP probe" in wq["reason"]
    assert wq["probe-failures"] == 2
    # Every "full" answer is counted: the job's four and the two probes'.
    assert c.stats()["submit-retries"] == device_total(c, "refused") == 4 + 2


def test_dedicated_queue_drops_are_timeouts(make_core) -> None:
    """MOVDIR64B gives no answer: a dropped descriptor is only noticed by its
    record never arriving."""
    c = make_core(emulated(2, mode="dedicated", size=16, faults={"wq-full": 0.1, "seed": 10}),
                  timeout_s=0.2)
    buffers = workload(6)
    assert_oracle(run_core(c, buffers), buffers)
    dropped = device_total(c, "dropped")
    assert dropped >= 1
    assert c.stats()["timeouts"] == dropped
    assert c.stats()["submit-retries"] == 0


def test_write_submission_has_no_batches(make_core) -> None:
    c = make_core(emulated(1, submit="write", faults={"page-fault": 0.05, "seed": 11}))
    buffers = workload(2)
    assert_oracle(run_core(c, buffers), buffers)
    stats = c.stats()
    pages = sum(-(-len(b) // PAGE) for b in buffers)
    assert stats["batches"] == 0 and stats["descriptors"] == pages
    assert stats["page-faults"] == device_total(c, "faults-injected") > 0
    assert c.wq_stats()[0]["method"] == "write"


def test_dead_completion_thread(make_core) -> None:
    c = make_core(emulated(2))
    before = crafted_pages(700, seed=12)
    assert_oracle(run_core(c, [before]), [before])
    c.fail_completion_thread()
    after = [crafted_pages(500, seed=13), crafted_pages(33, seed=14)]
    assert_oracle(run_core(c, after), after)
    stats = c.stats()
    assert stats["wqs-out"] == 2
    assert all(wq["state"] == "out" and "completion thread" in wq["reason"]
               for wq in c.wq_stats())
    assert stats["cpu-fallback-pages"] == 533
    c.stop()  # joins the thread that already exited
    assert not c.is_running


def test_everything_at_once_is_reproducible(make_core) -> None:
    faults = {"page-fault": 0.05, "batch-fail": 0.15, "list-fault": 0.15, "wq-full": 0.2,
              "seed": 13}
    counters = []
    for _ in range(2):
        c = make_core(emulated(1, faults=faults, reorder=True))
        buffers = workload(6)
        assert_oracle(run_core(c, buffers), buffers)
        device = c.wq_stats()[0]["device"]
        counters.append({k: device[k] for k in ("faults-injected", "batch-fails-injected",
                                                "list-faults-injected", "wq-full-injected")})
        c.close()
    assert counters[0] == counters[1]
    assert all(v > 0 for v in counters[0].values())


def test_fault_spec_parsing() -> None:
    spec = FaultSpec.parse("page-fault=0.05,batch-fail=0.01,hw-error=0.01,hang=0.001,"
                           "wq-full=0.2,seed=7")
    assert spec == FaultSpec(page_fault=0.05, batch_fail=0.01, hw_error=0.01, hang=0.001,
                             wq_full=0.2, seed=7)
    assert FaultSpec.parse(str(spec)) == spec
    from dsamig.errors import ConfigError

    for bad, word in [("page-falt=0.1", "page-falt"), ("hang=2", "hang"), ("hang", "KEY=VALUE"),
                      ("seed=x", "seed"), ("hang=0.1,hang=0.2", "twice"),
                      ("wq-full=nan", "wq-full")]:
        with pytest.raises(ConfigError, match=word):
            FaultSpec.parse(bad)


async def test_through_the_asyncio_engine() -> None:
    config = DsaConfig(emulate=2, emulate_faults=FaultSpec.parse("page-fault=0.05,hang=0.02,"
                                                                 "seed=3"), timeout_s=0.2)
    engine, reason = create_engine("dsa", dsa=config)
    assert "2 software work queue" in reason
    try:
        buffers = workload(6)
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.submit(memoryview(b), PAGE, 128) for b in buffers)), 30
        )
        for data, result in zip(buffers, results, strict=True):
            assert (result.bitmaps, result.zero_pages) == oracle(data)
        settled(engine._core)
        stats = engine.stats()
        assert stats["backend"] == "dsa" and stats["submission"] == "emulated"
        assert stats["pages"] == sum(-(-len(b) // PAGE) for b in buffers)
        assert stats["engine-batches"] == len(buffers)
        for key in ("wqs", "descriptors", "batches", "submit-retries", "retry-exhausted",
                    "page-faults", "cpu-fallback-pages", "timeouts", "errors", "quarantines",
                    "readmissions", "probe-failures", "wqs-out", "held",
                    "completion-thread-cpu-s"):
            assert key in stats
        assert stats["page-faults"] == sum(w["device"]["faults-injected"] for w in stats["wqs"])
        hangs = sum(w["device"]["hangs-injected"] for w in stats["wqs"])
        assert hangs == stats["timeouts"] + stats["probe-timeouts"]
    finally:
        engine.close()


@pytest.mark.parametrize("prefault", [True, False])
def test_truncated_image_fails_the_batch_not_the_process(make_core, tmp_path,
                                                         prefault: bool) -> None:
    """A file shrunk under the sender: its pages raise SIGBUS when read.  The
    batch fails with EFAULT; the engine and the process go on."""
    path = tmp_path / "image"
    path.write_bytes(b"\x01" * (256 * PAGE))
    c = make_core(emulated(1), prefault=prefault)
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 256 * PAGE, flags=mmap.MAP_SHARED)
        os.truncate(path, 0)
        view = memoryview(m)
        try:
            [(_, _, zero, status, _)] = run_core(c, [view])
            assert status == errno.EFAULT and zero == 0
        finally:
            view.release()
            m.close()
    data = crafted_pages(300, seed=15)
    assert_oracle(run_core(c, [data]), [data])
