"""A WQ's health on the software device: the probe at configure time,
quarantine and re-admission, and a busy WQ that does not stall the others.

Every test checks the bitmaps against the CPU oracle too: whatever happens
to a WQ, no page may be misreported.
"""

from __future__ import annotations

import select
import time

import pytest

from tests.engine.dsa_helpers import (
    PAGE,
    assert_oracle,
    crafted_pages,
    device_total,
    emulated,
    requires_native,
    run_core,
    settled,
    workload,
)

pytestmark = requires_native

ALL_OPS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6)
NO_BATCH = ALL_OPS & ~(1 << 1)


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


def pages_of(buffers) -> int:
    return sum(-(-len(b) // PAGE) for b in buffers)


# ---- the probe at configure time ---------------------------------------------------


@pytest.mark.parametrize(("mode", "method"), [("shared", "enqcmd"), ("dedicated", "movdir64b")])
def test_probe_proves_the_portal_and_batches(make_core, mode: str, method: str) -> None:
    c = make_core(emulated(1, mode=mode, size=16))
    [wq] = c.wq_stats()
    assert (wq["method"], wq["state"], wq["max-batch"], wq["batch-note"]) == (
        method, "in-service", 128, "")
    assert wq["probe-us"] > 0
    # One NOOP, then a BATCH of two NOOPs: four descriptors executed.
    assert wq["device"]["executed"] == 4 and wq["device"]["batches"] == 1
    buffers = workload(2)
    assert_oracle(run_core(c, buffers), buffers)
    assert c.stats()["batches"] > 0


def test_a_wq_that_refuses_batch_gets_lone_descriptors(make_core) -> None:
    c = make_core(emulated(1, op_config=NO_BATCH))
    [wq] = c.wq_stats()
    assert wq["state"] == "in-service" and wq["max-batch"] == 1
    assert "refused a BATCH of two NOOPs (status 0x10)" in wq["batch-note"]
    buffers = workload(2)
    assert_oracle(run_core(c, buffers), buffers)
    stats = c.stats()
    assert stats["batches"] == 0 and stats["descriptors"] == pages_of(buffers)
    assert stats["errors"] == stats["cpu-fallback-pages"] == stats["quarantines"] == 0


def test_without_the_probe_a_refused_batch_takes_the_wq_out(make_core) -> None:
    """What the probe prevents: BATCH descriptors the WQ rejects are right by
    construction, so the WQ is out for good and the CPU does the work."""
    c = make_core(emulated(1, op_config=NO_BATCH), probe=False)
    data = crafted_pages(300, seed=3)
    assert_oracle(run_core(c, [data]), [data])
    [wq] = c.wq_stats()
    assert wq["state"] == "out" and "status 0x10 (rejected)" in wq["reason"]
    assert c.stats()["cpu-fallback-pages"] == 300


def test_a_wq_that_fails_its_probe_is_left_out_with_the_reason(make_core) -> None:
    c = make_core([{"faults": {"hang": 1.0}}, {}], timeout_s=0.1)
    bad, good = c.wq_stats()
    assert (bad["state"], bad["healthy"]) == ("out", False)
    assert bad["reason"] == ("failed its probe: a NOOP submitted with ENQCMD did not complete "
                             "in 0.1 s")
    assert bad["probe-timeouts"] == 1
    assert good["state"] == "in-service"
    buffers = workload(3)
    assert_oracle(run_core(c, buffers), buffers)
    bad, good = c.wq_stats()
    assert bad["jobs"] == 0 and good["jobs"] == 3
    assert c.stats()["cpu-fallback-pages"] == 0


def test_when_every_wq_fails_its_probe_configure_says_why_for_each(make_core) -> None:
    from dsamig.native import native

    c = native.DsaEngineCore()
    try:
        with pytest.raises(OSError) as info:
            c.configure([{"faults": {"hang": 1.0}}, {"kernel_mmap": "eperm",
                                                     "kernel_write": False}],
                        timeout_s=0.1)
        text = str(info.value)
        assert "emulated:0: a NOOP submitted with ENQCMD did not complete in 0.1 s" in text
        assert "emulated:1: write() failed with EINVAL: this kernel has no write() method" in text
        assert not c.is_configured
    finally:
        c.close()


# ---- the kernel around the WQ ----------------------------------------------------------


def test_a_refused_mapping_falls_back_to_write(make_core) -> None:
    c = make_core(emulated(1, kernel_mmap="eperm"))
    [wq] = c.wq_stats()
    assert wq["method"] == "write" and wq["state"] == "in-service"
    assert "refused to map the portal (EPERM" in wq["portal-note"]
    assert "CAP_SYS_RAWIO" in wq["portal-note"]
    assert wq["max-batch"] == 128 and "write() takes no BATCH" in wq["batch-note"]
    buffers = workload(2)
    assert_oracle(run_core(c, buffers), buffers)
    assert c.stats()["batches"] == 0


def test_an_old_kernel_has_no_write_but_maps_the_portal(make_core) -> None:
    """Before the INTEL-SA-01084 fix any user may map the portal, and write()
    does not exist: the portal is used."""
    c = make_core(emulated(1, kernel_write=False))
    [wq] = c.wq_stats()
    assert wq["method"] == "enqcmd" and wq["portal-note"] == ""
    buffers = workload(1)
    assert_oracle(run_core(c, buffers), buffers)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"kernel_mmap": "eperm", "kernel_write": False},
         ["EINVAL", "no write() method", "INTEL-SA-01084", "6.1.91", "EPERM"]),
        ({"submit": "write", "kernel_write": False},
         ["EINVAL", "no write() method", "write() requested"]),
        ({"kernel_mmap": "eperm", "foreign_mm": True},
         ["EPERM", "address space is not the one that opened the WQ"]),
    ],
    ids=["old-kernel-no-portal", "old-kernel-write-asked", "foreign-mm"],
)
def test_a_method_that_cannot_work_is_reported(make_core, spec, words) -> None:
    with pytest.raises(OSError) as info:
        make_core(emulated(1, **spec))
    for word in words:
        assert word in str(info.value)


# ---- quarantine and re-admission -----------------------------------------------------


def test_rare_hardware_errors_keep_most_pages_on_the_device(make_core) -> None:
    """The acceptance figure: hardware errors on one descriptor in 500 on
    two software WQs leave fewer than half of the pages to the CPU."""
    c = make_core(emulated(2, faults={"hw-error": 1 / 500, "seed": 11}))
    buffers = workload(24)
    assert_oracle(run_core(c, buffers), buffers)
    wqs = settled(c)
    stats = c.stats()
    injected = device_total(c, "hw-errors-injected")
    pages = pages_of(buffers)
    assert injected >= 10 and stats["errors"] == injected
    assert stats["cpu-fallback-pages"] < pages / 2
    # Each error costs its own page; the rest of its batch and the work
    # queued behind it stay on the device.
    assert stats["cpu-fallback-pages"] == injected
    assert stats["quarantines"] >= 1 and stats["readmissions"] == stats["quarantines"]
    assert stats["wqs-out"] == 0 and all(wq["state"] == "in-service" for wq in wqs)


def test_quarantine_counts_and_probes_are_per_wq(make_core) -> None:
    c = make_core([{"faults": {"hw-error": 1 / 300, "seed": 5}}, {}])
    buffers = workload(12)
    assert_oracle(run_core(c, buffers), buffers)
    faulty, clean = settled(c)
    assert faulty["quarantines"] >= 1 and faulty["readmissions"] == faulty["quarantines"]
    assert clean["quarantines"] == clean["readmissions"] == 0
    assert c.stats()["quarantines"] == faulty["quarantines"]
    # The probe of each re-admission is a NOOP the device executed.
    assert faulty["device"]["hw-errors-injected"] == faulty["errors"]


def test_a_timeout_quarantines_and_a_probe_readmits(make_core) -> None:
    """One submission in ten never completes: a timeout is transient."""
    c = make_core(emulated(2, faults={"hang": 0.1, "seed": 21}), timeout_s=0.1,
                  probe=False)
    buffers = workload(6)
    assert_oracle(run_core(c, buffers), buffers)
    wqs = settled(c)
    stats = c.stats()
    assert stats["timeouts"] >= 1 and stats["quarantines"] >= 1
    assert stats["readmissions"] >= 1
    assert any("did not complete in 0.1 s" in wq["reason"] for wq in wqs)
    assert device_total(c, "hangs-injected") == stats["timeouts"] + stats["probe-timeouts"]


# ---- one busy WQ does not stall the others --------------------------------------------


def test_a_full_wq_does_not_stall_the_others(make_core) -> None:
    """WQ 0 answers "full" to every ENQCMD for a long retry budget; WQ 1 is
    free.  While the completion thread waits to ask WQ 0 again, it goes on
    with WQ 1: the batch given to WQ 1 comes back first, and once WQ 0's
    budget is spent its batch moves to WQ 1 instead of the CPU."""
    c = make_core([{"faults": {"wq-full": 1.0}}, {}], probe=False, submit_attempts=2000)
    first, second = crafted_pages(1024, seed=1), crafted_pages(1024, seed=2)
    start = time.monotonic()
    tokens = [c.submit(first, PAGE, 128), c.submit(second, PAGE, 128)]  # round-robin: WQ 0, 1
    order: list[int] = []
    results = {}
    while len(results) < 2:
        assert time.monotonic() - start < 30, "batches never came back"
        select.select([c.fileno()], [], [], 0.5)
        for item in c.collect():
            results[item[0]] = item
            order.append(item[0])
    assert order == [tokens[1], tokens[0]]
    assert_oracle([results[t] for t in tokens], [first, second])
    stats = c.stats()
    full, free = c.wq_stats()
    assert stats["retry-exhausted"] == 1 and full["retry-exhausted"] == 1
    assert full["submit-retries"] >= 2000 and full["jobs"] == 1
    assert stats["cpu-fallback-pages"] == 0  # WQ 0's batch went to WQ 1
    assert free["descriptors"] == 2 * (1024 + 8)  # both batches: members and BATCHes
