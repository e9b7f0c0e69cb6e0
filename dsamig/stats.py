"""Job statistics with QEMU ``query-migrate`` names, plus per-thread CPU time."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dsamig.proto.counters import JobCounters
from dsamig.settings import DEFAULT_PAGE_SIZE, JobState


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by thread name.

    Read from ``/proc/self/task``; dsamig names its threads (``dsamig-send``,
    ``dsamig-cpu-0``, ...) so these figures match what ``top -H`` shows.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue  # the thread ended meanwhile
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[11], fields[12] are utime and stime (stat fields 14 and 15)
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        out[name] = round(out.get(name, 0.0) + seconds, 3)
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it starts
    afresh at exec, so a parent's size does not leak into ours)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ChannelCounts(Protocol):
    """What a channel's state machine counts (``dsamig.proto.ChannelState``)."""

    packets: int
    payload_bytes: int


@dataclass
class ChannelStats:
    """Figures of one TCP channel: the bytes its transport moved, and the
    packets its state machine counted (kept there, once)."""

    index: int
    counts: ChannelCounts | None = None
    transferred: int = 0  # bytes on the wire, headers included

    @property
    def packets(self) -> int:
        """Packets this channel carried (a ZERO_RANGE counts each packet)."""
        return self.counts.packets if self.counts is not None else 0

    @property
    def payload_bytes(self) -> int:
        """Payload bytes of the PACKETs this channel carried."""
        return self.counts.payload_bytes if self.counts is not None else 0

    def to_dict(self) -> dict[str, int]:
        return {
            "index": self.index,
            "transferred": self.transferred,
            "packets": self.packets,
            "payload-bytes": self.payload_bytes,
        }


#: Told of every status change of a job's stats: ``(stats, previous status)``.
StatusListener = Callable[["JobStats", JobState], None]


@dataclass
class JobStats:
    """Figures of one job, on either side.  ``to_dict`` gives the ``--json`` object.

    ``status`` is the job's state, the one source of it: the transport sets
    it as the job moves (a plain string is taken as its :class:`JobState`)
    and every listener added with :meth:`watch` hears of each change at
    once; nobody polls.
    """

    role: str
    total: int = 0  # image bytes
    page_size: int = DEFAULT_PAGE_SIZE
    channels: list[ChannelStats] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: The job core's counters (zero and normal pages, bytes, sessions...).
    counters: JobCounters = field(default_factory=JobCounters)
    started: float = field(default_factory=time.monotonic)
    setup_done: float | None = None
    finished: float | None = None
    cpu_start: float = field(default_factory=time.process_time)
    cpu_end: float | None = None
    threads_start: dict[str, float] = field(default_factory=thread_cpu_seconds)
    threads: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of this job's threads that ended before the job did (a
    #: channel's pump): /proc no longer shows them when the job finishes.
    ended_threads: dict[str, float] = field(default_factory=dict)
    #: CPU seconds /proc showed at the finish for threads still running then:
    #: already in ``threads``, so a thread ending later adds only the rest.
    live_at_finish: dict[str, float] = field(default_factory=dict)
    earlier_transferred: int = 0  # bytes of connections closed before a reconnect
    extra: dict[str, Any] = field(default_factory=dict)  # more figures for to_dict
    _status: JobState = field(default=JobState.SETUP, init=False, repr=False)
    _listeners: list[StatusListener] = field(default_factory=list, init=False, repr=False,
                                             compare=False)

    @property
    def status(self) -> JobState:
        """Where the job is: setup, active, completing, then how it ended."""
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        state = JobState(value)
        previous = self._status
        if state == previous:
            return
        self._status = state
        for listener in list(self._listeners):
            listener(self, previous)

    def watch(self, listener: StatusListener) -> None:
        """Call ``listener(stats, previous)`` after every status change from now on."""
        self._listeners.append(listener)

    @property
    def transferred(self) -> int:
        return self.earlier_transferred + sum(c.transferred for c in self.channels)

    def mark_setup_done(self) -> None:
        self.setup_done = time.monotonic()

    def add_thread_cpu(self, name: str, seconds: float) -> None:
        """Count the CPU time of a thread of this job that has ended (a
        channel's thread may end just after the job did)."""
        if self.finished is None:
            self.ended_threads[name] = self.ended_threads.get(name, 0.0) + seconds
        else:
            rest = max(seconds - self.live_at_finish.pop(name, 0.0), 0.0)
            self.threads[name] = round(self.threads.get(name, 0.0) + rest, 3)

    def finish(self, status: str, error: str | None = None) -> None:
        """Freeze the clock and the CPU figures, then end in ``status``: the
        listeners hear of the end with every figure final."""
        if self.finished is not None:
            return
        self.finished = time.monotonic()
        self.error = error
        self.cpu_end = time.process_time()
        now = thread_cpu_seconds()
        threads = {
            name: seconds - self.threads_start.get(name, 0.0)
            for name, seconds in now.items()
            if seconds - self.threads_start.get(name, 0.0) > 0 or name.startswith("dsamig")
        }
        self.live_at_finish = dict(threads)
        for name, seconds in self.ended_threads.items():
            threads[name] = threads.get(name, 0.0) + seconds
        self.threads = {name: round(seconds, 3) for name, seconds in sorted(threads.items())}
        self.status = status

    @property
    def elapsed_s(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return max(end - self.started, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        """QEMU ``query-migrate`` names where one exists, dsamig's own beside them."""
        elapsed = self.elapsed_s
        setup_ms = 0 if self.setup_done is None else (self.setup_done - self.started) * 1000
        counters = self.counters
        pages = counters.zero_pages + counters.normal_pages
        cpu_end = self.cpu_end if self.cpu_end is not None else time.process_time()
        out: dict[str, Any] = {
            "role": self.role,
            "status": self.status.value,
            "total-time": round(elapsed * 1000, 3),
            "setup-time": round(setup_ms, 3),
            "mbps": round(self.transferred * 8 / elapsed / 1e6, 3),
            "transferred": self.transferred,
            "total": self.total,
            "remaining": max(self.total - counters.done_bytes, 0),
            "duplicate": counters.zero_pages,
            "normal": counters.normal_pages,
            "normal-bytes": counters.normal_bytes,
            "pages-per-second": round(pages / elapsed),
            "page-size": self.page_size,
            "channels": len(self.channels),
            "channel-stats": [c.to_dict() for c in self.channels],
            "engine": self.engine,
            "cpu-s": round(cpu_end - self.cpu_start, 3),
            "peak-rss-bytes": peak_rss_bytes(),
            "thread-cpu-s": self.threads,
            "sessions": counters.sessions,
            "resumed-packets": counters.resumed_packets,
            "retransmitted-bytes": counters.retransmitted_bytes,
        }
        out.update(self.extra)
        if counters.reused_bytes:
            out["reused"] = {"bytes": counters.reused_bytes,
                             "zero-pages": counters.reused_zero_pages,
                             "normal-pages": counters.reused_normal_pages}
        if self.error is not None:
            out["error-desc"] = self.error
        return out
