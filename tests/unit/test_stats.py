"""Job statistics: each thread's CPU counted once, however its end and the
job's finish interleave."""

from __future__ import annotations

import pytest

from dsamig import stats as stats_module
from dsamig.stats import JobStats


def test_a_thread_that_ends_before_the_finish_counts_from_its_own_figure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    job = JobStats(role="receiver", threads_start={"dsamig-recv": 1.0})
    job.add_thread_cpu("dsamig-recv-0", 0.5)  # ended: /proc no longer shows it
    monkeypatch.setattr(stats_module, "thread_cpu_seconds", lambda: {"dsamig-recv": 1.25})
    job.finish("completed")
    assert job.threads == {"dsamig-recv": 0.25, "dsamig-recv-0": 0.5}


def test_a_thread_still_running_at_the_finish_adds_only_what_came_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc showed 0.4 s of the thread when the job finished; it ends with
    0.5 s in all: 0.5 s, not 0.9 s."""
    job = JobStats(role="receiver", threads_start={})
    monkeypatch.setattr(stats_module, "thread_cpu_seconds",
                        lambda: {"dsamig-recv": 0.2, "dsamig-recv-0": 0.4, "dsamig-recv-1": 0.3})
    job.finish("completed")
    job.add_thread_cpu("dsamig-recv-0", 0.5)
    job.add_thread_cpu("dsamig-recv-1", 0.3)
    assert job.threads == {"dsamig-recv": 0.2, "dsamig-recv-0": 0.5, "dsamig-recv-1": 0.3}
    # A later thread of the same name (a new session's) counts whole.
    job.add_thread_cpu("dsamig-recv-0", 0.25)
    assert job.threads["dsamig-recv-0"] == 0.75
