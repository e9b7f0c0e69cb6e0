"""Job states, the transition table, records and the registry."""

from __future__ import annotations

import itertools
import time
import uuid

import pytest

from dsamig.jobs.model import (
    NORMAL_PATH,
    TRANSITIONS,
    InvalidTransition,
    JobRecord,
    JobRegistry,
)
from dsamig.settings import JobState
from dsamig.stats import JobStats


def record(state: JobState = JobState.QUEUED, name: str = "j", log=None) -> JobRecord:
    return JobRecord(uuid.uuid4(), name, "sender", state, total=100,
                     on_change=None if log is None else lambda r, p: log.append((p, r.state)))


def test_table_covers_every_state_and_finished_states_are_final() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for state in JobState:
        if state.finished:
            assert TRANSITIONS[state] == frozenset()
        else:
            assert {JobState.FAILED, JobState.CANCELLED} <= TRANSITIONS[state]
    assert JobState.COMPLETED in TRANSITIONS[JobState.COMPLETING]
    assert all(JobState.COMPLETED not in TRANSITIONS[s] for s in JobState
               if s is not JobState.COMPLETING)


@pytest.mark.parametrize("state", list(JobState))
@pytest.mark.parametrize("new", list(JobState))
def test_transition_follows_the_table(state: JobState, new: JobState) -> None:
    job = record(state)
    if new in TRANSITIONS[state]:
        job.transition(new, "why")
        assert job.state is new
    else:
        with pytest.raises(InvalidTransition):
            job.transition(new)
        assert job.state is state


def test_advance_walks_the_normal_path_and_reports_each_step() -> None:
    log: list[tuple[JobState | None, JobState]] = []
    job = record(log=log)
    job.advance(JobState.COMPLETING)
    job.advance(JobState.ACTIVE)  # backwards: nothing
    job.advance(JobState.COMPLETED)
    job.advance(JobState.FAILED, "too late")  # finished: nothing
    assert log == [(None, JobState.QUEUED), *itertools.pairwise(NORMAL_PATH)]
    assert job.error is None and job.finished_mono is not None


def test_failure_keeps_its_error_text() -> None:
    job = record(JobState.ACTIVE)
    job.advance(JobState.FAILED, "receiver failed the job (IO): disk full")
    assert job.summary()["error-desc"] == "receiver failed the job (IO): disk full"
    assert job.to_dict()["status"] == "failed"


def test_to_dict_has_the_one_shot_stats_and_the_daemon_state() -> None:
    queued = record().to_dict()
    assert queued["status"] == "queued" and queued["total"] == 100 and queued["normal"] == 0
    job = record(JobState.SETUP)
    job.stats = JobStats(role="sender", total=100)
    job.stats.counters.done_bytes = 40
    job.stats.status = "active"
    out = job.to_dict()
    assert out["status"] == "setup"  # the record's state, not the transport's
    assert out["remaining"] == 60 and "mbps" in out and out["id"] == str(job.id)


def test_a_record_follows_its_stats_without_polling() -> None:
    """Every status the transport sets reaches the record at once, the
    states it skipped included, and the end comes with its error."""
    log: list[tuple[JobState | None, JobState]] = []
    job = record(log=log)
    stats = JobStats(role="sender", total=100)
    job.follow(stats)
    assert job.state == JobState.SETUP and job.stats is stats
    stats.status = "completing"  # a plain string, as the transport writes it
    assert job.state == JobState.COMPLETING
    stats.counters.done_bytes = 100
    stats.finish("failed", "receiver failed the job (IO): disk full")
    assert job.state == JobState.FAILED
    assert job.error == "receiver failed the job (IO): disk full"
    assert [new for _, new in log] == [JobState.QUEUED, JobState.SETUP, JobState.ACTIVE,
                                       JobState.COMPLETING, JobState.FAILED]
    assert job.to_dict()["remaining"] == 0


def test_the_listeners_hear_of_the_end_with_final_figures() -> None:
    stats = JobStats(role="receiver", total=10)
    heard: list[tuple[JobState, JobState, float | None, str | None]] = []
    stats.watch(lambda s, previous: heard.append((previous, s.status, s.finished, s.error)))
    stats.status = JobState.SETUP  # no change: nobody is told
    stats.finish("cancelled", "cancelled by the receiver's operator")
    stats.finish("completed")  # a finished job stays finished
    assert heard == [(JobState.SETUP, JobState.CANCELLED, stats.finished,
                      "cancelled by the receiver's operator")]
    assert stats.finished is not None
    with pytest.raises(ValueError):
        stats.status = "paused"


def test_a_cancelled_job_ends_with_the_daemons_reason() -> None:
    job = record(JobState.ACTIVE)
    stats = JobStats(role="sender")
    job.follow(stats)
    job.cancelling("cancelled by the sender's operator")
    stats.finish("cancelled", "cancelled")  # what the transport knows
    assert job.state == JobState.CANCELLED
    assert job.error == "cancelled by the sender's operator"


def test_registry_lookup_by_id_and_name() -> None:
    registry = JobRegistry(retention_s=60)
    old = record(JobState.COMPLETED, name="vm")
    new = record(JobState.ACTIVE, name="vm")
    registry.add(old)
    registry.add(new)
    assert registry.get(str(old.id)) is old
    assert registry.get("vm") is new  # the unfinished one first
    assert registry.get("other") is None and registry.get(str(uuid.uuid4())) is None
    assert registry.counts()["completed"] == 1 and registry.counts()["queued"] == 0


def test_registry_forgets_finished_jobs_after_retention_and_beyond_its_cap() -> None:
    registry = JobRegistry(retention_s=10, max_finished=3)
    running = record(JobState.ACTIVE)
    registry.add(running)
    base = time.monotonic()
    for i in range(5):
        job = record(JobState.COMPLETED, name=f"f{i}")
        job.finished_mono = base + i
        registry.add(job)
    registry.purge(now=base + 4)
    assert {j.name for j in registry} == {"j", "f2", "f3", "f4"}  # capped at three finished
    registry.purge(now=base + 13.5)
    assert {j.name for j in registry} == {"j", "f4"}
    registry.purge(now=base + 10_000)
    assert list(registry) == [running]  # running jobs are never forgotten
