"""The metrics text: Prometheus conventions, counters that agree, bounded per-job series."""

from __future__ import annotations

import re

from dsamig.daemon.metrics import (
    MAX_JOB_SERIES,
    Figures,
    JobSeries,
    Snapshot,
    Totals,
    engine_metric,
    render,
)
from dsamig.proto import JobCounters
from dsamig.stats import JobStats


def families(text: str) -> dict[str, str]:
    """Metric name -> type, from the # TYPE lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def snapshot(figures: Figures | None = None, jobs: list[JobSeries] | None = None,
             **kwargs: object) -> Snapshot:
    return Snapshot(role="sender", version="0.1.0", start_time_s=1_700_000_000.5,
                    jobs_by_state={"queued": 2, "active": 1}, finished={"completed": 3},
                    figures=figures or Figures(), jobs=jobs or [], **kwargs)  # type: ignore[arg-type]


def test_prometheus_naming() -> None:
    figures = Figures()
    stats = JobStats(role="sender")
    stats.engine = {"backend": "cpu", "pages": 10, "zero-pages": 4, "worker-cpu-s": 0.25,
                    "threads": 2, "completion-thread-cpu-s": 0.5}
    figures.add(stats)
    text = render(snapshot(figures, bandwidth_limit=1e6, extra_gauges={"channels_in_use": 4}))
    kinds = families(text)
    assert kinds["process_start_time_seconds"] == "gauge"
    assert samples(text)["process_start_time_seconds"] == 1_700_000_000.5
    assert "dsamig_uptime_seconds" not in kinds
    # Counters end in _total; seconds counters in _seconds_total.
    for name, kind in kinds.items():
        assert (kind == "counter") == name.endswith("_total"), name
        assert not re.search(r"_s(_total)?$", name), name
    assert "dsamig_engine_worker_cpu_seconds_total" in kinds
    assert "dsamig_engine_completion_thread_cpu_seconds_total" in kinds
    assert "dsamig_engine_threads_total" not in kinds  # a setting, not a counter
    # No gauge that only repeats rate() of a counter, no copy of a labelled metric.
    assert not [name for name in kinds if "rate" in name]
    assert "dsamig_queued_jobs" not in kinds and samples(text)['dsamig_jobs{state="queued"}'] == 2


def test_engine_zero_pages_help_says_how_it_differs() -> None:
    figures = Figures()
    stats = JobStats(role="sender")
    stats.engine = {"backend": "dsa", "zero-pages": 7}
    figures.add(stats)
    text = render(snapshot(figures))
    help_line = next(line for line in text.splitlines()
                     if line.startswith("# HELP dsamig_engine_zero_pages_total"))
    assert "dsamig_zero_pages_total" in help_line and "holes" in help_line
    assert engine_metric("cpu-fallback-pages") == "engine_cpu_fallback_pages_total"


def test_pages_reused_on_resume_are_not_counted_again() -> None:
    """A resumed job's figures describe the whole image; the counters only what moved."""
    first = JobStats(role="sender", total=8 * 4096, counters=JobCounters(
        zero_pages=1, normal_pages=3, normal_bytes=3 * 4096, done_bytes=4 * 4096, sessions=1))
    # The receiver held the first run's 4 pages: counted in the figures, not sent again.
    resumed = JobStats(role="sender", total=8 * 4096, counters=JobCounters(
        zero_pages=2, normal_pages=6, normal_bytes=3 * 4096, done_bytes=8 * 4096,
        reused_zero_pages=1, reused_normal_pages=3, reused_bytes=4 * 4096, sessions=3))
    totals = Totals()
    totals.job_finished("failed", first)
    totals.job_finished("completed", resumed)
    f = totals.figures
    assert (f.zero_pages, f.normal_pages) == (2, 6)  # the image's pages, each once
    assert f.normal_bytes == 6 * 4096 and f.image_bytes == 8 * 4096
    assert f.reconnects == 2
    assert resumed.to_dict()["reused"] == {"bytes": 4 * 4096, "zero-pages": 1,
                                           "normal-pages": 3}


def test_per_job_series_are_labelled_and_bounded() -> None:
    jobs = [JobSeries(name=f"vm-{i}", peer="10.0.0.2:7780", image_bytes=i, transferred=2 * i,
                      remaining=100 - i, channels=4, reconnects=i % 2,
                      bandwidth_limit=1e6 if i == 0 else None)
            for i in range(MAX_JOB_SERIES + 10)]
    text = render(snapshot(jobs=jobs))
    values = samples(text)
    assert values['dsamig_job_transferred_bytes_total{job_name="vm-3",peer="10.0.0.2:7780"}'] == 6
    assert values['dsamig_job_remaining_bytes{job_name="vm-3",peer="10.0.0.2:7780"}'] == 97
    assert values['dsamig_job_bandwidth_limit_bytes_per_second'
                  '{job_name="vm-0",peer="10.0.0.2:7780"}'] == 1e6
    limited = [k for k in values if k.startswith("dsamig_job_bandwidth_limit")]
    assert len(limited) == 1  # unlimited jobs have no limit sample
    per_job = [k for k in values if k.startswith("dsamig_job_channels{")]
    assert len(per_job) == MAX_JOB_SERIES
    assert f'job_name="vm-{MAX_JOB_SERIES}"' not in text
    # Idle, the families are still declared, so dashboards find them.
    assert "dsamig_job_channels" in families(render(snapshot()))


def test_label_values_are_escaped() -> None:
    jobs = [JobSeries(name='a"b\\c', peer="p", image_bytes=1, transferred=1, remaining=0,
                      channels=1)]
    assert 'job_name="a\\"b\\\\c"' in render(snapshot(jobs=jobs))


def test_a_live_job_has_round_dirty_rate_and_expected_downtime_gauges() -> None:
    jobs = [JobSeries(name="vm", peer="p", image_bytes=1, transferred=1, remaining=0,
                      channels=4, live_round=3, dirty_pages_rate=1250.0,
                      expected_downtime_s=0.12),
            JobSeries(name="img", peer="p", image_bytes=1, transferred=1, remaining=0,
                      channels=4)]
    values = samples(render(snapshot(jobs=jobs)))
    assert values['dsamig_job_live_round{job_name="vm",peer="p"}'] == 3
    assert values['dsamig_job_dirty_pages_per_second{job_name="vm",peer="p"}'] == 1250
    assert values['dsamig_job_expected_downtime_seconds{job_name="vm",peer="p"}'] == 0.12
    # A job that is not live has no such samples.
    assert not [k for k in values if 'job_name="img"' in k and
                ("live_round" in k or "dirty_pages" in k or "expected_downtime" in k)]
