"""The real-WQ code paths without DSA hardware: /dev/null as a stand-in.

/dev/null is a character device, as a WQ's node is: open_real_wq opens and
checks it like a WQ, the kernel refuses to map it (ENODEV), so the engine
falls back to write(), which succeeds, and nothing ever completes.  That
drives the real open, the write() submission, the probe, timeouts,
quarantine and "stays out" on any machine.
"""

from __future__ import annotations

import os

import pytest

from tests.engine.dsa_helpers import (
    assert_oracle,
    crafted_pages,
    requires_native,
    run_core,
    settled,
)

pytestmark = [
    requires_native,
    pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null"),
]

NULL = {"path": "/dev/null", "mode": "shared", "size": 8, "threshold": 8,
        "max_batch_size": 32, "max_transfer_size": 2 << 20}


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


def test_the_probe_finds_that_nothing_completes(make_core) -> None:
    with pytest.raises(OSError) as info:
        make_core([NULL], timeout_s=0.05)
    assert "/dev/null: a NOOP submitted with write() did not complete in 0.05 s" in str(info.value)


def test_a_stand_in_that_fails_its_probe_is_left_out_beside_a_good_wq(make_core) -> None:
    c = make_core([NULL, {}], timeout_s=0.05)
    null, good = c.wq_stats()
    assert null["method"] == "write" and null["state"] == "out"
    # The kernel refused the mapping, so write() was tried: and proven useless.
    assert null["portal-note"].startswith("the kernel cannot map the portal: ")
    assert null["reason"] == ("failed its probe: a NOOP submitted with write() did not "
                              f"complete in 0.05 s ({null['portal-note']})")
    assert null["probe-timeouts"] == 1
    assert good["state"] == "in-service"
    data = crafted_pages(700, seed=2)
    assert_oracle(run_core(c, [data]), [data])
    null, good = c.wq_stats()
    assert null["jobs"] == 0 and good["jobs"] == 1


def test_write_submissions_time_out_then_quarantine_then_out(make_core) -> None:
    """Without the probe the engine trusts write(): every descriptor it hands
    over is accepted and never completes.  The timeouts send the pages to the
    CPU and the WQ to quarantine; its NOOP probes time out too, so it ends
    out, and the memory the "device" might still write is held to the end."""
    c = make_core([NULL], timeout_s=0.05, probe=False, max_strikes=3)
    [wq] = c.wq_stats()
    assert wq["method"] == "write" and wq["max-batch"] == 32
    assert "write() takes no BATCH" in wq["batch-note"]
    data = crafted_pages(100, seed=3)
    assert_oracle(run_core(c, [data], timeout_s=10), [data])
    [wq] = settled(c)
    stats = c.stats()
    # Lone descriptors, as many in flight as the WQ's credits; the rest of
    # the batch went to the CPU once its WQ was out of service.
    assert stats["batches"] == 0
    assert stats["timeouts"] == wq["descriptors"] == wq["credits"] == 8
    assert stats["cpu-fallback-pages"] == 100
    assert stats["held"] == 1
    assert wq["state"] == "out" and "a NOOP probe did not complete in 0.05 s" in wq["reason"]
    assert stats["quarantines"] == 1 and stats["readmissions"] == 0
    assert stats["probe-timeouts"] == 2
    # Out: later batches go straight to the CPU.
    more = crafted_pages(50, seed=4)
    assert_oracle(run_core(c, [more]), [more])
    assert c.stats()["timeouts"] == 8


def test_write_requested_on_a_real_node(make_core) -> None:
    c = make_core([{**NULL, "submit": "write"}], timeout_s=0.05, probe=False)
    [wq] = c.wq_stats()
    assert wq["method"] == "write" and wq["portal-note"] == "write() requested"


def test_a_node_that_is_not_a_character_device_is_refused(make_core, tmp_path) -> None:
    regular = tmp_path / "wq0.0"
    regular.write_bytes(b"")
    with pytest.raises(OSError, match="not a DSA work queue"):
        make_core([{**NULL, "path": str(regular)}])
