"""Jobs as the daemons track them: the transition table, records, a registry.

The states are :class:`dsamig.settings.JobState`, the one enum of both the
transport's figures (``JobStats.status``) and the daemons' records.  Every
allowed change is one entry of :data:`TRANSITIONS`; a change not in the
table is a bug and raises :class:`InvalidTransition`.  A record follows its
job's stats (:meth:`JobRecord.follow`): each status change the transport
makes is pushed to the record at once, which walks the normal path
(queued → setup → active → completing → completed) one state at a time, so
a listener sees every state a job passed through even when it passed quickly.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from dsamig.settings import JobState
from dsamig.stats import JobStats

#: state -> the states it may change to.  A job may fail or be cancelled from
#: every unfinished state; it completes only after completing.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.SETUP, JobState.FAILED, JobState.CANCELLED}),
    JobState.SETUP: frozenset({JobState.ACTIVE, JobState.FAILED, JobState.CANCELLED}),
    JobState.ACTIVE: frozenset({JobState.COMPLETING, JobState.FAILED, JobState.CANCELLED}),
    JobState.COMPLETING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

#: The path of a job that goes well.
NORMAL_PATH = (
    JobState.QUEUED, JobState.SETUP, JobState.ACTIVE, JobState.COMPLETING, JobState.COMPLETED,
)


class InvalidTransition(RuntimeError):
    """A state change that :data:`TRANSITIONS` does not allow."""


StateListener = Callable[["JobRecord", JobState | None], None]


class JobRecord:
    """One job of a daemon: identity, state, error text and live stats.

    ``stats`` is the transport's own :class:`JobStats` once the job runs (so
    queries see live figures; :meth:`follow`) and stays with the record once
    it finished; before that (queued, refused) the daemon sets the state.
    ``on_change(record, previous)`` is called after every change, and once at
    creation with ``previous`` None.
    """

    def __init__(
        self,
        job_id: uuid.UUID,
        name: str,
        role: str,
        state: JobState,
        *,
        total: int = 0,
        channels: int = 0,
        peer: str = "",
        error: str | None = None,
        on_change: StateListener | None = None,
    ) -> None:
        self.id = job_id
        self.name = name
        self.role = role
        self.state = state
        self.error = error
        self.total = total
        self.channels = channels
        self.peer = peer
        self.stats: JobStats | None = None
        #: Why the daemon is cancelling the job: the error it ends with.
        self.cancel_reason: str | None = None
        self.created_at = time.time()
        self.finished_mono = time.monotonic() if state.finished else None
        self.on_change = on_change
        if on_change is not None:
            on_change(self, None)

    @property
    def finished(self) -> bool:
        """Whether the job has ended."""
        return self.state.finished

    def follow(self, stats: JobStats) -> None:
        """Take ``stats`` as the job's live figures and its state: every
        change of ``stats.status`` moves this record at once."""
        self.stats = stats
        stats.watch(self._status_changed)
        self._status_changed(stats, None)

    def _status_changed(self, stats: JobStats, previous: JobState | None) -> None:
        self.advance(stats.status, stats.error)

    def cancelling(self, reason: str) -> None:
        """The daemon is cancelling the job: it ends cancelled with ``reason``."""
        self.cancel_reason = reason

    def transition(self, new: JobState, error: str | None = None) -> None:
        """Change to ``new`` (which the table must allow); keep ``error`` on failure."""
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"job {self.id}: {self.state} -> {new} is not allowed")
        previous = self.state
        self.state = new
        if new == JobState.CANCELLED and self.cancel_reason is not None:
            error = self.cancel_reason
        if new in (JobState.FAILED, JobState.CANCELLED):
            self.error = error or self.error or new.value
        if new.finished:
            self.finished_mono = time.monotonic()
        if self.on_change is not None:
            self.on_change(self, previous)

    def advance(self, target: JobState, error: str | None = None) -> None:
        """Move to ``target``: along the normal path one step at a time, or
        straight to failed/cancelled.  Moving to the current state, or
        backwards along the normal path, does nothing; a finished job stays
        finished.
        """
        if self.finished or target == self.state:
            return
        if target in (JobState.FAILED, JobState.CANCELLED):
            self.transition(target, error)
            return
        here, there = NORMAL_PATH.index(self.state), NORMAL_PATH.index(target)
        for state in NORMAL_PATH[here + 1 : there + 1]:
            self.transition(state)

    def summary(self) -> dict[str, Any]:
        """The short form ``job-list`` and events give."""
        out: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "role": self.role,
            "status": self.state.value,
            "total": self.total,
            "remaining": self.total,
            "created": _iso(self.created_at),
        }
        if self.stats is not None:
            out["total"] = self.stats.total
            out["remaining"] = max(self.stats.total - self.stats.counters.done_bytes, 0)
        if self.error is not None:
            out["error-desc"] = self.error
        return out

    def to_dict(self) -> dict[str, Any]:
        """The full form ``query-job`` gives: the one-shot ``--json`` stats
        object with the daemon's state, error text and identity added."""
        stats = self.stats
        if stats is None:  # still queued or refused: the figures are all zero
            stats = JobStats(role=self.role, total=self.total, threads_start={})
            stats.status = self.state
            stats.finished = stats.started
            stats.cpu_end = stats.cpu_start
        out = stats.to_dict()
        out.pop("error-desc", None)
        out.update(self.summary())
        if self.peer:
            out["peer"] = self.peer
        return out


def _iso(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


class JobRegistry:
    """A daemon's jobs by id: running ones, and finished ones for ``retention_s``.

    At most ``max_finished`` finished jobs are kept however short the
    retention, so a flood of refused jobs cannot grow the daemon's memory.
    """

    def __init__(self, retention_s: float, max_finished: int = 1000) -> None:
        self.retention_s = retention_s
        self.max_finished = max_finished
        self._jobs: dict[uuid.UUID, JobRecord] = {}

    def add(self, record: JobRecord) -> None:
        """Track ``record`` (replacing one with the same id)."""
        self._jobs[record.id] = record
        self.purge()

    def __iter__(self) -> Iterator[JobRecord]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, ref: str) -> JobRecord | None:
        """A job by id, or by name (the newest of that name, unfinished first)."""
        try:
            found = self._jobs.get(uuid.UUID(ref))
            if found is not None:
                return found
        except ValueError:
            pass
        named = [r for r in self._jobs.values() if r.name == ref]
        if not named:
            return None
        return max(named, key=lambda r: (not r.finished, r.created_at))

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (every state listed)."""
        out = {state.value: 0 for state in JobState}
        for record in self._jobs.values():
            out[record.state.value] += 1
        return out

    def purge(self, now: float | None = None) -> list[JobRecord]:
        """Forget finished jobs older than the retention; return them."""
        now = time.monotonic() if now is None else now
        finished = sorted(
            (r for r in self._jobs.values() if r.finished_mono is not None),
            key=lambda r: r.finished_mono or 0.0,
        )
        kept = [r for r in finished if now - (r.finished_mono or now) <= self.retention_s]
        expired = [r for r in finished if now - (r.finished_mono or now) > self.retention_s]
        if len(kept) > self.max_finished:  # oldest first
            expired.extend(kept[: len(kept) - self.max_finished])
        for record in expired:
            self._jobs.pop(record.id, None)
        return expired
