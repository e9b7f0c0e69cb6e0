"""How a job is shown: the rate smoother, the progress line, the summary table."""

from __future__ import annotations

import io
import math

import pytest

from dsamig.control.commands import job_progress_line, jobs_table
from dsamig.proto.live import LivePolicy, RoundFigures
from dsamig.report import (
    ProgressBar,
    RateMeter,
    live_line,
    progress_line,
    reconnect_note,
    summary_table,
)
from dsamig.stats import ChannelStats, JobStats
from dsamig.units import parse_rate, rate_unit

MiB = 1 << 20


def test_the_rate_meter_measures_the_first_interval_then_smooths() -> None:
    meter = RateMeter(smoothing_s=1.0)
    assert meter.update(0, now=10.0) == 0.0
    assert meter.last_change == 10.0
    assert meter.update(100, now=11.0) == 100.0  # the first interval counts as it is
    assert meter.last_change == 11.0
    # Nothing moved for a second: the rate falls by 1 - e^-1 of the way to 0.
    assert meter.update(100, now=12.0) == pytest.approx(100 * math.exp(-1))
    assert meter.last_change == 11.0  # data last moved at 11
    assert meter.update(100, now=12.0) == pytest.approx(100 * math.exp(-1))  # no time: no news


@pytest.mark.parametrize("step_s", [0.05, 0.25, 1.0])
def test_the_rate_meter_does_not_depend_on_how_often_it_is_asked(step_s: float) -> None:
    """A steady 1 MiB/s reads as 1 MiB/s whether the progress bar (5 Hz),
    start --wait (4 Hz) or the daemon's tick looks."""
    meter = RateMeter()
    now = 0.0
    while now <= 10.0:
        meter.update(int(now * MiB), now)
        now += step_s
    assert meter.rate == pytest.approx(MiB, rel=1e-6)


def test_the_rate_meter_converges_on_a_new_rate_in_its_smoothing_time() -> None:
    meter = RateMeter(smoothing_s=1.0)
    counter, now = 0, 0.0
    for rate in (1000, 3000):
        for _ in range(40):  # 4 s at each rate, sampled every 0.1 s
            meter.update(counter, now)
            counter += rate // 10
            now += 0.1
    meter.update(counter, now)
    assert meter.rate == pytest.approx(3000, rel=0.03)


def test_progress_line() -> None:
    line = progress_line(MiB, 2 * MiB, MiB / 2, note="1 reconnect")
    assert line == ("[###############               ] 1.0 MiB / 2.0 MiB  512.0 KiB/s  "
                    "ETA 2.0 s  1 reconnect")
    cap = parse_rate("800Mbit")
    capped = progress_line(0, 2 * MiB, 0, unit=rate_unit(cap), cap=cap)
    assert capped.endswith("0 bit/s (cap 800.0 Mbit/s)  ETA -")
    assert "ETA 0.0 s" in progress_line(2 * MiB, 2 * MiB, 0)


def test_reconnects_show_in_the_progress_bar() -> None:
    stats = JobStats(role="sender", total=4 * MiB)
    ticks = iter([0.0, 1.0, 2.0])
    bar = ProgressBar(stats, io.StringIO(), clock=lambda: next(ticks))
    stats.status = "active"
    stats.channels = [ChannelStats(0)]
    stats.counters.sessions = 1
    assert "reconnect" not in bar.line()
    stats.counters.done_bytes = MiB
    stats.counters.sessions = 2
    assert bar.line().rstrip().endswith("1.0 MiB/s  ETA 3.0 s  1 reconnect")
    stats.channels = []  # the session broke: its channels are gone until the next
    assert bar.line().rstrip().endswith("reconnecting (1 so far)")


def test_reconnect_note() -> None:
    assert reconnect_note({"sessions": 1}) == ""
    assert reconnect_note({"sessions": 3}) == "2 reconnects"
    assert reconnect_note({"sessions": 1, "reconnecting": True}) == "reconnecting"


def test_a_finished_jobs_summary() -> None:
    stats = JobStats(role="sender", total=8 * 4096)
    stats.counters.zero_pages, stats.counters.normal_pages = 3, 5
    stats.counters.done_bytes = 8 * 4096
    stats.counters.sessions = 2
    stats.counters.retransmitted_bytes = 4096
    stats.finish("completed")
    table = summary_table(stats)
    lines = table.splitlines()
    assert lines[0] == "dsamig sender"
    rows = dict(line.strip().split("  ", 1) for line in lines[1:])
    rows = {key: value.strip() for key, value in rows.items()}
    assert rows["status"] == "completed"
    assert rows["zero pages"] == "3 (not sent)"
    assert rows["sessions"] == "2 (1 reconnect), 4.0 KiB sent again"
    assert "remaining" not in rows  # a finished job has nothing to go


def test_a_running_daemon_jobs_summary() -> None:
    """What `dsamig status JOB` shows of a job that runs: what virsh domjobinfo would."""
    job = {
        "id": "0f4b2c9e-0000-4000-8000-000000000001", "name": "vm-1", "role": "sender",
        "status": "active", "peer": "dest:7780", "total": 4 * MiB, "remaining": 3 * MiB,
        "total-time": 2000, "setup-time": 5.0, "transferred": MiB, "mbps": 4.2,
        "duplicate": 0, "normal": 256, "normal-bytes": MiB, "pages-per-second": 128,
        "channels": 0, "channel-stats": [], "sessions": 2, "retransmitted-bytes": 0,
        "engine": {"backend": "cpu", "simd": "avx2", "threads": 2},
        "wire-bytes-per-second": MiB, "image-bytes-per-second": MiB // 2,
        "last-data-s": 0.3, "bandwidth-limit": 2 * MiB, "max-bandwidth": 4 * MiB,
        "channels-connected": 0, "channels-wanted": 4, "reconnecting": True,
    }
    rows = {line.strip().split("  ", 1)[0]: line.strip().split("  ", 1)[1].strip()
            for line in summary_table(job).splitlines()[1:]}
    assert rows["job"] == "vm-1 (0f4b2c9e-0000-4000-8000-000000000001)"
    assert rows["remaining"] == "3.0 MiB  ETA 6.0 s"
    assert rows["rates now"] == "wire 1.0 MiB/s, image 512.0 KiB/s"
    assert rows["bandwidth"].startswith("2.0 MiB/s (a share of the sender's max_bandwidth")
    assert rows["channels"] == "0 of 4 connected, reconnecting (1 so far)"
    assert rows["sessions"] == "2 (1 reconnect), 0 B sent again"
    assert rows["last data"] == "0.3 s ago"
    assert rows["engine"] == "cpu, avx2, 2 thread(s)"


def test_a_queued_job_says_why() -> None:
    job = {"id": "x", "name": "vm-2", "role": "sender", "status": "queued", "total": MiB,
           "remaining": MiB, "queue-reason": "max_jobs 4 jobs are running"}
    status = next(line for line in summary_table(job).splitlines() if "status" in line)
    assert status.split("  ", 2)[-1].strip() == "queued — max_jobs 4 jobs are running"


def live_job(status: str) -> dict[str, object]:
    """A live job's JSON form as the sender's stats give it after two rounds."""
    policy = LivePolicy(max_downtime_s=0.3, max_rounds=30)
    policy.round_sent(RoundFigures(0, 1000, 0.0, 1000, 4096 * 1000, 1.0))
    policy.decide(1, 500, 500 * 4096, scan_s=0.1, since_last_scan_s=2.0)
    job: dict[str, object] = {"id": "0" * 36, "name": "vm", "status": status,
                              "total": 8 << 20, "remaining": 1 << 20, "round": 1,
                              **policy.to_dict()}
    return job


def test_a_running_live_job_shows_its_round_dirty_rate_and_expected_downtime() -> None:
    job = live_job("active")
    # 500 pages found in the 2 s since the last scan; 0.1 s scan + 500 pages
    # at round 0's 4 096 000 B/s + the commit allowance.
    assert live_line(job, finished=False) == (
        f"round 1, 250 dirty pages/s, expected downtime {job['expected-downtime']} ms")
    assert "round 1, 250 dirty pages/s" in summary_table(job)
    table = jobs_table([job]).splitlines()
    assert table[0].endswith("NOTE")
    assert table[1].endswith("round 1, 250 dirty pages/s, expected downtime "
                             f"{job['expected-downtime']} ms")
    assert "round 1" in job_progress_line(job)


def test_a_finished_live_job_shows_its_rounds_and_downtime() -> None:
    job = {**live_job("completed"), "downtime": 87}
    assert live_line(job, finished=True) == "1 round, downtime 87 ms"
    assert jobs_table([job]).splitlines()[1].endswith("1 round, downtime 87 ms")


def test_a_job_that_is_not_live_has_no_live_row_and_a_failed_one_shows_its_error() -> None:
    job = {"id": "1" * 36, "name": "img", "status": "failed", "total": 4096,
           "remaining": 4096, "error-desc": "the receiver refused the job"}
    assert live_line(job, finished=True) == ""
    assert "live" not in summary_table(job)
    assert jobs_table([job]).splitlines()[1].endswith("the receiver refused the job")
