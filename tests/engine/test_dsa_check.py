"""``dsamig dsa check``: NOOP, COMPVAL and BATCH on each WQ, verified against
the CPU, with latency and throughput; on software WQs and the /dev/null
stand-in, and as the command an operator runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsamig.engine.dsa_check import format_report, run_check
from tests.engine.dsa_helpers import emulated, requires_native
from tests.engine.test_dsa_discovery import make_tree

pytestmark = requires_native

NO_BATCH = 0b1111101  # NOOP, DRAIN, MEMMOVE, MEMFILL, COMPARE, COMPVAL


@pytest.fixture
def make_core():
    from dsamig.native import native

    cores = []

    def make(wqs, **kwargs):
        c = native.DsaEngineCore(wqs, start=False, **kwargs)
        cores.append(c)
        return c

    yield make
    for c in cores:
        c.close()


def test_check_on_a_good_wq(make_core) -> None:
    c = make_core(emulated(1))
    found = c.check(0, noops=16, pages=40)
    assert found["error"] == ""
    assert found["noop"]["ok"] and found["noop"]["count"] == 16
    assert 0 < found["noop"]["min-us"] <= found["noop"]["median-us"] <= found["noop"]["max-us"]
    assert found["compval"] == {"ok": True, "pages": 40, "mismatches": 0,
                                "median-us": found["compval"]["median-us"]}
    assert found["batch"]["ok"] is True and found["batch"]["pages"] == 40
    assert found["batch"]["mismatches"] == 0 and found["batch"]["us"] > 0
    # 16 NOOPs, 40 lone COMPVALs, one BATCH of 40, after the probe's 4.
    assert c.wq_stats()[0]["device"]["executed"] == 4 + 16 + 40 + 1 + 40


def test_check_without_batches(make_core) -> None:
    c = make_core(emulated(1, op_config=NO_BATCH))
    found = c.check(0, pages=12)
    assert found["error"] == "" and found["compval"]["ok"]
    assert found["batch"]["ok"] is None  # not tried: the probe gave this WQ lone descriptors


def test_check_finds_wrong_answers(make_core) -> None:
    """Every COMPVAL fails with a hardware error: the check says so, page by
    page, rather than trusting the device."""
    c = make_core(emulated(1, faults={"hw-error": 1.0}))
    found = c.check(0, pages=12)
    assert found["noop"]["ok"]  # a NOOP touches no data: no injected error
    assert not found["compval"]["ok"] and found["compval"]["mismatches"] == 12
    assert found["error"].startswith("COMPVAL on test page 0: status 0x20")
    assert found["batch"]["ok"] is False and found["batch"]["mismatches"] == 12


def test_check_refuses_a_running_engine_and_a_bad_index(make_core) -> None:
    c = make_core(emulated(1))
    with pytest.raises(ValueError, match="no work queue 3"):
        c.check(3)
    c.start()
    with pytest.raises(RuntimeError, match="stop the engine"):
        c.check(0)


def test_check_on_a_wq_left_out(make_core) -> None:
    c = make_core([{"faults": {"hang": 1.0}}, {}], timeout_s=0.05)
    found = c.check(0)
    assert found["error"].startswith("not in service: failed its probe: ")
    assert c.check(1)["error"] == ""


def test_run_check_on_software_wqs() -> None:
    report = run_check(emulate=2, throughput_bytes=8 << 20)
    assert report["ok"] and report["message"] == "2 of 2 work queue(s) passed"
    for wq in report["wqs"]:
        assert wq["ok"] and wq["error"] == "" and wq["method"] == "enqcmd"
        speed = wq["throughput"]
        assert speed["bytes"] == 8 << 20 and speed["mismatches"] == 0
        assert speed["gb-per-s"] > 0 and speed["cpu-fallback-pages"] == 0
        assert speed["descriptors"] == 2048 + 16  # members and BATCH descriptors
    text = format_report(report)
    assert "emulated:1 (shared, enqcmd): ok" in text
    assert "BATCH of 64 COMPVALs: all agree with the CPU" in text
    assert "throughput: 8 MiB in" in text


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_run_check_on_the_stand_in() -> None:
    report = run_check(["/dev/null"], timeout_s=0.05)
    assert not report["ok"]
    [wq] = report["wqs"]
    assert "a NOOP submitted with write() did not complete in 0.05 s" in wq["error"]
    assert "cannot map the portal" in wq["error"]
    assert any("not listed under" in note for note in wq["notes"])
    assert "/dev/null (shared): FAILED" in format_report(report)


def test_run_check_with_nothing_usable_says_why(tmp_path) -> None:
    sysfs, dev = make_tree(tmp_path, {"wq0.0": {"state": "disabled"}}, nodes={"wq0.0": "char"})
    report = run_check(sysfs_root=sysfs, dev_root=dev)
    assert not report["ok"] and report["wqs"] == []
    assert report["message"].startswith("nothing to check: no usable work queue")
    assert "disabled" in report["message"]


def test_run_check_on_a_path_that_is_not_a_device(tmp_path) -> None:
    regular = tmp_path / "wq9.9"
    regular.write_bytes(b"")
    report = run_check([str(regular)])
    [wq] = report["wqs"]
    assert not wq["ok"] and wq["error"] == f"{regular} is not a character device"


def test_dsa_check_command() -> None:
    here = subprocess.run([sys.executable, "-m", "dsamig", "dsa", "check", "--json"],
                          capture_output=True, text=True, timeout=60)
    data = json.loads(here.stdout)
    if not os.path.exists("/sys/bus/dsa/devices"):
        # Nothing to check is not a pass: the exit code says so, the message why.
        assert here.returncode == 1 and not data["ok"] and data["wqs"] == []
        assert "no DSA devices" in data["message"]
    emulated_run = subprocess.run(
        [sys.executable, "-m", "dsamig", "dsa", "check", "--emulate", "1", "--size", "4MiB"],
        capture_output=True, text=True, timeout=60)
    assert emulated_run.returncode == 0, emulated_run.stderr
    assert "1 of 1 work queue(s) passed" in emulated_run.stdout
    assert "throughput: 4 MiB in" in emulated_run.stdout
    bad = subprocess.run([sys.executable, "-m", "dsamig", "dsa", "check", "--emulate", "99"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--emulate must be 0..16" in bad.stderr
