"""Daemon-wide figures, and the optional Prometheus text endpoint that shows them.

:class:`Totals` keeps the sums of finished jobs (jobs are forgotten after the
retention period; the sums are not), so every ``_total`` series is a true
counter: a running job's live figures are added on top, and when it finishes
its final figures move into the sums.  The endpoint is a deliberately tiny
HTTP/1.0 server: ``GET /metrics`` and nothing else, bounded in request size
and time, off unless ``metrics_listen`` is set.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dsamig.errors import NetworkError
from dsamig.logs import get_logger
from dsamig.runtime import bounded
from dsamig.stats import JobStats

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_S = 5.0


#: At most this many running jobs get per-job series (each job adds six), so a
#: scrape stays small whatever max_jobs allows.
MAX_JOB_SERIES = 64


@dataclass
class Figures:
    """Byte and page counts of some jobs: what this daemon moved.

    Pages a resumed job found already at the receiver are left out (see
    ``JobCounters.reused_*``): they were moved by an earlier run.
    """

    image_bytes: int = 0  # image bytes handled (sent or skipped as zero)
    transferred: int = 0  # bytes on the wire, headers included
    zero_pages: int = 0
    normal_pages: int = 0
    normal_bytes: int = 0
    reconnects: int = 0  # sessions after a job's first
    engine: dict[tuple[str, str], float] = field(default_factory=dict)  # (backend, key)

    def add(self, stats: JobStats, engine: dict[str, Any] | None = None) -> None:
        """Add one job's figures (``engine``: live engine counters, else the job's)."""
        counters = stats.counters
        self.image_bytes += counters.done_bytes - counters.reused_bytes
        self.transferred += stats.transferred
        self.zero_pages += counters.zero_pages - counters.reused_zero_pages
        self.normal_pages += counters.normal_pages - counters.reused_normal_pages
        self.normal_bytes += counters.normal_bytes
        self.reconnects += reconnects_of(stats)
        self.add_engine(stats.engine if engine is None else engine)

    def add_engine(self, engine: dict[str, Any]) -> None:
        """Add an engine's counters (a job's own, or a shared engine's)."""
        backend = str(engine.get("backend", "")) if engine else ""
        for key, value in (engine or {}).items():
            # Counters only: "threads" is a setting, not something that grows.
            if key == "threads" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.engine[(backend, key)] = self.engine.get((backend, key), 0.0) + value

    def plus(self, other: Figures) -> Figures:
        """The sum of both, as a new object."""
        engine = dict(self.engine)
        for key, value in other.engine.items():
            engine[key] = engine.get(key, 0.0) + value
        return Figures(
            self.image_bytes + other.image_bytes, self.transferred + other.transferred,
            self.zero_pages + other.zero_pages, self.normal_pages + other.normal_pages,
            self.normal_bytes + other.normal_bytes, self.reconnects + other.reconnects, engine,
        )


def reconnects_of(stats: JobStats) -> int:
    """How often a job reconnected: its sessions after the first."""
    return max(stats.counters.sessions - 1, 0)


@dataclass
class Totals:
    """What every finished job of this daemon added up to."""

    figures: Figures = field(default_factory=Figures)
    finished: collections.Counter[str] = field(default_factory=collections.Counter)

    def job_finished(self, state: str, stats: JobStats | None) -> None:
        """Count a job that ended in ``state`` and add its final figures."""
        self.finished[state] += 1
        if stats is not None:
            self.figures.add(stats)


@dataclass(frozen=True)
class JobSeries:
    """The per-job series of one running job."""

    name: str
    peer: str
    image_bytes: int  # handled so far by this run
    transferred: int
    remaining: int
    channels: int
    reconnects: int = 0
    bandwidth_limit: float | None = None  # this job's current share of the cap
    # A live job's pre-copy figures (absent for other jobs).
    live_round: int | None = None
    dirty_pages_rate: float | None = None
    expected_downtime_s: float | None = None


@dataclass
class Snapshot:
    """Everything one scrape shows."""

    role: str
    version: str
    start_time_s: float  # Unix time the daemon started
    jobs_by_state: dict[str, int]
    finished: dict[str, int]
    figures: Figures
    bandwidth_limit: float | None = None
    extra_gauges: dict[str, float] = field(default_factory=dict)
    jobs: list[JobSeries] = field(default_factory=list)


_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")

#: Help of engine counters whose meaning needs more than their name.
ENGINE_HELP = {
    "pages": "Pages the zero-page engine scanned, all jobs.",
    "zero-pages": (
        "Zero pages the engine found among the pages it scanned, all jobs. Not the same "
        "as dsamig_zero_pages_total: holes of a sparse image are never scanned, and "
        "packets scanned again (retransmitted, or checked against the receiver on "
        "resume) count again here."
    ),
}


def engine_metric(key: str) -> str:
    """``worker-cpu-s`` → ``engine_worker_cpu_seconds_total``."""
    name = _METRIC_NAME.sub("_", key).strip("_")
    if name.endswith("_cpu_s"):
        name = name.removesuffix("_s") + "_seconds"
    return f"engine_{name}_total"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    return repr(float(value))


def render(snap: Snapshot) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]], prefix: str = "dsamig_") -> None:
        out.append(f"# HELP {prefix}{name} {help_text}")
        out.append(f"# TYPE {prefix}{name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{prefix}{name}{{{text}}} {_number(value)}" if text
                       else f"{prefix}{name} {_number(value)}")

    f = snap.figures
    metric("info", "gauge", "Daemon role and version.",
           [({"role": snap.role, "version": snap.version}, 1)])
    metric("process_start_time_seconds", "gauge",
           "Start time of the process since the Unix epoch, in seconds.",
           [({}, snap.start_time_s)], prefix="")
    metric("jobs", "gauge", "Jobs the daemon knows of (running and retained), by state.",
           [({"state": state}, n) for state, n in snap.jobs_by_state.items()])
    metric("jobs_finished_total", "counter", "Jobs finished since the daemon started, by outcome.",
           [({"state": state}, snap.finished.get(state, 0))
            for state in ("completed", "failed", "cancelled")])
    metric("image_bytes_total", "counter",
           "Image bytes handled: sent, or skipped as zero pages (not those a resumed job "
           "found at the receiver).", [({}, f.image_bytes)])
    metric("transferred_bytes_total", "counter", "Bytes on the wire, frame headers included.",
           [({}, f.transferred)])
    metric("zero_pages_total", "counter",
           "Zero pages of the images handled (not sent), each page once, holes included.",
           [({}, f.zero_pages)])
    metric("normal_pages_total", "counter", "Normal pages (sent), each page once.",
           [({}, f.normal_pages)])
    metric("normal_bytes_total", "counter",
           "Bytes of normal pages sent, each page once (retransmissions and pages a resumed "
           "job found at the receiver are not counted).", [({}, f.normal_bytes)])
    metric("reconnects_total", "counter",
           "Times a job reconnected its channels after losing them.", [({}, f.reconnects)])
    if snap.bandwidth_limit is not None:
        metric("bandwidth_limit_bytes_per_second", "gauge", "Daemon-wide bandwidth cap.",
               [({}, snap.bandwidth_limit)])
    for name, value in sorted(snap.extra_gauges.items()):
        metric(name, "gauge", name.replace("_", " ").capitalize() + ".", [({}, value)])
    by_key: dict[str, list[tuple[dict[str, str], float]]] = {}
    for (backend, key), value in sorted(f.engine.items()):
        by_key.setdefault(key, []).append(({"backend": backend}, value))
    for key, samples in by_key.items():
        help_text = ENGINE_HELP.get(key, f"Zero-page engine counter {key!r}, all jobs.")
        metric(engine_metric(key), "counter", help_text, samples)
    _render_jobs(metric, snap.jobs[:MAX_JOB_SERIES])
    return "\n".join(out) + "\n"


def _render_jobs(metric: Callable[..., None], jobs: list[JobSeries]) -> None:
    """Per-job series of running jobs, labelled ``job_name`` and ``peer``.

    ``job_name``, not ``job``: Prometheus gives every target a ``job`` label
    and would rename ours to ``exported_job``.
    """
    def each(value: Callable[[JobSeries], float | None]) -> list[tuple[dict[str, str], float]]:
        return [({"job_name": j.name, "peer": j.peer}, v) for j in jobs
                if (v := value(j)) is not None]

    metric("job_image_bytes_total", "counter", "Image bytes a running job has handled.",
           each(lambda j: j.image_bytes))
    metric("job_transferred_bytes_total", "counter", "Bytes a running job put on the wire.",
           each(lambda j: j.transferred))
    metric("job_remaining_bytes", "gauge", "Image bytes a running job has still to handle.",
           each(lambda j: j.remaining))
    metric("job_channels", "gauge", "TCP channels of a running job.",
           each(lambda j: j.channels))
    metric("job_reconnects_total", "counter", "Times a running job reconnected.",
           each(lambda j: j.reconnects))
    metric("job_bandwidth_limit_bytes_per_second", "gauge",
           "A running job's share of the bandwidth caps (absent: unlimited).",
           each(lambda j: j.bandwidth_limit))
    metric("job_live_round", "gauge", "The round a live job is in (0: the whole image).",
           each(lambda j: j.live_round))
    metric("job_dirty_pages_per_second", "gauge",
           "Pages a live job's writer changed per second, as the last scan found.",
           each(lambda j: j.dirty_pages_rate))
    metric("job_expected_downtime_seconds", "gauge",
           "A live job's predicted pause for its final round.",
           each(lambda j: j.expected_downtime_s))


class MetricsServer:
    """Serves ``GET /metrics`` with ``render(snapshot())`` on ``host:port``."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot]) -> None:
        self.host = host
        self.port = port
        self.snapshot = snapshot
        self._server: asyncio.base_events.Server | None = None

    @property
    def log(self) -> Any:
        return get_logger(component="metrics")  # at each use: the level may change

    async def start(self) -> tuple[str, int]:
        """Listen; the bound address (port 0 picks a free port)."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, reuse_address=True, limit=MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise NetworkError(
                f"cannot listen for metrics on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        name = self._server.sockets[0].getsockname()
        self.port = name[1]
        return name[0], name[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await bounded(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
                self._respond(writer, 405, "method not allowed\n")
            elif parts[1].split(b"?", 1)[0] != b"/metrics":
                self._respond(writer, 404, "only /metrics is served here\n")
            else:
                try:
                    body = render(self.snapshot())
                except Exception:  # a bug: the scraper sees a 500, the log says why
                    self.log.exception("metrics request failed")
                    self._respond(writer, 500, "internal error; see the daemon's log\n")
                else:
                    self._respond(writer, 200, body if parts[0] == b"GET" else "",
                                  "text/plain; version=0.0.4; charset=utf-8")
            await bounded(writer.drain(), REQUEST_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # never let a scrape take the daemon down
            self.log.exception("metrics request failed")
        finally:
            writer.close()

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, code: int, body: str,
                 content_type: str = "text/plain; charset=utf-8") -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error"}[code]
        data = body.encode()
        writer.write(
            f"HTTP/1.0 {code} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
        )

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await bounded(self._server.wait_closed(), 2.0)
            self._server = None
