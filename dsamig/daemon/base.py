"""What both daemons share: lifecycle phases, signals, sd_notify, control API.

The lifecycle is three explicit phases, as in uvicorn's ``Server``:

``startup()``
    bind the data listener (receiver), the control socket and the metrics
    endpoint; only then ``READY=1``.  A failure here exits non-zero before
    systemd ever hears READY.
``main_loop()``
    one tick every ``tick_s``: forget expired jobs, measure the rate,
    ``STATUS=``, ``WATCHDOG=1``; a SIGHUP reloads between ticks.  Job states
    are not polled: each record follows its job's stats
    (:meth:`JobRecord.follow`) and hears of every change at once.
``shutdown()``
    ``STOPPING=1``; refuse new work; let running jobs finish for at most
    ``shutdown_timeout``; cancel the rest (their partial files are deleted);
    close the sockets.  A second SIGINT skips the wait.

Signals are captured for the life of ``serve()`` and the previous handlers
restored afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

from dsamig import __version__
from dsamig.control.protocol import (
    EVENT_JOB_STATUS_CHANGE,
    EVENT_SHUTDOWN,
    CommandError,
    ErrorClass,
)
from dsamig.control.server import ControlServer, Handler, expect_keys
from dsamig.daemon.checks import Check, check_address_free, check_control_socket, run_checks
from dsamig.daemon.metrics import (
    Figures,
    JobSeries,
    MetricsServer,
    Snapshot,
    Totals,
    reconnects_of,
)
from dsamig.daemon.sdnotify import Notifier
from dsamig.errors import ConfigError
from dsamig.jobs.config import DaemonConfig
from dsamig.jobs.model import JobRecord, JobRegistry
from dsamig.logs import configure, get_logger, loop_exception_handler
from dsamig.report import RateMeter
from dsamig.runtime import bounded
from dsamig.settings import EXIT_OK, JobState
from dsamig.units import format_bytes

DEFAULT_TICK_S = 0.5
#: After the graceful wait, cancelled jobs get this long to clean up.
CANCEL_BOUND_S = 10.0


class Daemon(ABC):
    """A long-running dsamig service; subclasses add the data side and commands."""

    role: ClassVar[str]
    #: Config fields a SIGHUP cannot change (the sockets are bound already).
    restart_fields: ClassVar[tuple[str, ...]] = ("control_socket", "metrics_listen")

    def __init__(
        self,
        config: DaemonConfig,
        *,
        notifier: Notifier | None = None,
        install_signals: bool = True,
    ) -> None:
        self.config = config
        #: False when embedded (tests, another program's loop): stop with
        #: :meth:`request_stop` instead of signals.
        self.install_signals = install_signals
        self.notifier = notifier or Notifier.from_environment()
        self.registry = JobRegistry(config.job_retention_s)
        self.totals = Totals()
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.should_exit = False
        self.force_exit = False
        self.stopping = False
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self._reload_requested = False
        self._wake: asyncio.Event | None = None
        self._last_ping = 0.0
        self._image_rate = RateMeter()
        #: Per running job: the rate meters of its wire bytes and image bytes.
        self._job_meters: dict[uuid.UUID, tuple[RateMeter, RateMeter]] = {}

    @property
    def log(self) -> Any:
        # Looked up at each use: a bound logger keeps the level it was bound
        # under, and a SIGHUP may have changed the level since.
        return get_logger(role=self.role, component="daemon")

    # --- for subclasses ------------------------------------------------------------

    @abstractmethod
    async def start_data(self) -> None:
        """Bind what moves data (the receiver's listener); called first in startup."""

    @abstractmethod
    async def close_data(self) -> None:
        """Release what :meth:`start_data` opened; idempotent."""

    @abstractmethod
    def stop_accepting(self) -> None:
        """Refuse new jobs from now on (queued ones may be dropped)."""

    @abstractmethod
    def running_jobs(self) -> int:
        """Jobs still moving data."""

    @abstractmethod
    async def cancel_all(self, reason: str) -> None:
        """Cancel every running job; return once they ended (bounded)."""

    @abstractmethod
    async def cancel_job(self, record: JobRecord, *, keep_partial: bool = False) -> None:
        """Cancel one job (``job-cancel``); CommandError if it cannot be.
        ``keep_partial``: a receiver keeps the partial file and its
        checkpoint, for a later resume."""

    @abstractmethod
    def status_line(self) -> str:
        """One line for systemd's STATUS=."""

    def extra_commands(self) -> dict[str, Handler]:
        """Commands only this role has."""
        return {}

    def data_checks(self) -> list[Check]:
        """This role's start-up checks (see :meth:`checks`)."""
        return []

    def checks(self) -> list[Check]:
        """Every check start-up makes before it binds anything, in its order.

        ``--check`` runs this same list (:meth:`preflight`), so the two
        cannot disagree about a config.
        """
        cfg = self.config
        checks = [*self.data_checks(),
                  lambda: check_control_socket(cfg.control_socket, cfg.control_group)]
        if cfg.metrics_listen is not None:
            host, port = cfg.metrics_listen
            checks.append(lambda: check_address_free(host, port, " for metrics"))
        return checks

    def preflight(self) -> list[str]:
        """Run :meth:`checks`: the first failure raises; the warnings."""
        return run_checks(self.checks())

    def describe(self) -> dict[str, Any]:
        """Role-specific fields of ``query-daemon``."""
        return {}

    def live_figures(self) -> Figures:
        """Byte and page counts of the running jobs."""
        live = Figures()
        for record in self.registry:
            if not record.finished and record.stats is not None:
                live.add(record.stats)
        return live

    def extra_gauges(self) -> dict[str, float]:
        """Role-specific gauges for the metrics endpoint."""
        return {}

    def job_series(self) -> list[JobSeries]:
        """Per-job metrics of the running jobs, oldest first."""
        out = []
        for record in sorted(self.registry, key=lambda r: r.created_at):
            stats = record.stats
            if record.finished or stats is None:
                continue
            fields: dict[str, Any] = {
                "name": record.name, "peer": record.peer,
                "image_bytes": stats.counters.done_bytes - stats.counters.reused_bytes,
                "transferred": stats.transferred,
                "remaining": max(stats.total - stats.counters.done_bytes, 0),
                "channels": len(stats.channels), "reconnects": reconnects_of(stats),
            }
            if "round" in stats.extra:  # a live job (sender side)
                fields["live_round"] = stats.extra["round"]
                fields["dirty_pages_rate"] = stats.extra.get("dirty-pages-rate")
                expected = stats.extra.get("expected-downtime")
                fields["expected_downtime_s"] = None if expected is None else expected / 1000
            fields.update(self.job_series_extra(record))
            out.append(JobSeries(**fields))
        return out

    def job_series_extra(self, record: JobRecord) -> dict[str, Any]:
        """Role-specific fields of a running job's :class:`JobSeries`."""
        return {}

    def job_view(self, record: JobRecord) -> dict[str, Any]:
        """What ``query-job`` gives: the job's JSON form and, while it is not
        finished, what ``virsh domjobinfo`` would show of it: the current
        rates of the wire and the image, the ETA, the time since data last
        moved, and the role's own fields (:meth:`job_view_extra`)."""
        out = record.to_dict()
        if record.finished:
            return out
        stats = record.stats
        if stats is not None:
            wire, image = self._measure(record, time.monotonic())
            out["wire-bytes-per-second"] = round(wire.rate)
            out["image-bytes-per-second"] = round(image.rate)
            remaining = out["remaining"]
            out["eta-s"] = round(remaining / image.rate, 1) if image.rate > 0 else None
            out["last-data-s"] = (round(time.monotonic() - wire.last_change, 1)
                                  if wire.last_change is not None else None)
        out.update(self.job_view_extra(record))
        return out

    def job_view_extra(self, record: JobRecord) -> dict[str, Any]:
        """Role-specific fields of an unfinished job's :meth:`job_view`."""
        return {}

    def _measure(self, record: JobRecord, now: float) -> tuple[RateMeter, RateMeter]:
        """Feed the job's rate meters its counters as of ``now``."""
        assert record.stats is not None
        meters = self._job_meters.get(record.id)
        if meters is None:
            meters = self._job_meters[record.id] = (RateMeter(), RateMeter())
        wire, image = meters
        wire.update(record.stats.transferred, now)
        image.update(record.stats.counters.done_bytes, now)
        return meters

    def bandwidth_limit(self) -> float | None:
        """The daemon-wide bandwidth cap, if there is one."""
        return None

    def apply_config(self, old: DaemonConfig, new: DaemonConfig) -> None:
        """Put a reloaded config's limits into effect (the base does the common part)."""
        if new.log_level != old.log_level:
            configure(new.log_level)
        self.registry.retention_s = new.job_retention_s

    @classmethod
    @abstractmethod
    def load_config(cls, path: str) -> DaemonConfig:
        """Read this role's config file."""

    # --- lifecycle -----------------------------------------------------------------------

    async def serve(self) -> int:
        """startup → main_loop → shutdown; returns the exit code (0 after SIGTERM too)."""
        self._wake = asyncio.Event()
        # Whatever the loop reports (an unretrieved future, a callback's
        # error) becomes one log event, not a traceback in the JSON log.
        asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
        with self._capture_signals():
            try:
                await self.startup()
            except BaseException:
                await self._close_all()
                raise
            try:
                if not self.should_exit:
                    self.notifier.ready(self.status_line())
                    self.log.info("daemon ready", **self.ready_fields())
                    await self.main_loop()
            finally:
                await self.shutdown()
        return EXIT_OK

    async def startup(self) -> None:
        """Check, then bind every socket; READY=1 is sent by :meth:`serve` after this returns."""
        for warning in self.preflight():
            self.log.warning("configuration warning", warning=warning)
        await self.start_data()
        commands: dict[str, Handler] = {
            "query-daemon": self._cmd_query_daemon,
            "job-list": self._cmd_job_list,
            "query-jobs": self._cmd_query_jobs,
            "query-job": self._cmd_query_job,
            "job-cancel": self._cmd_job_cancel,
            **self.extra_commands(),
        }
        self.control = ControlServer(
            self.config.control_socket, commands,
            {"role": self.role, "version": __version__, "pid": os.getpid()},
            group=self.config.control_group,
        )
        await self.control.start()
        if self.config.metrics_listen is not None:
            host, port = self.config.metrics_listen
            self.metrics = MetricsServer(host, port, self.snapshot)
            self.metrics_address = await self.metrics.start()

    async def main_loop(self) -> None:
        """Tick until a signal asks us to stop."""
        assert self._wake is not None
        while not self.should_exit:
            with contextlib.suppress(TimeoutError):
                await bounded(self._wake.wait(), self.tick_s)
            self._wake.clear()
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            self.tick()

    async def shutdown(self) -> None:
        """Stop accepting work, drain for at most shutdown_timeout, cancel, close."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.stopping(f"stopping: {self.running_jobs()} job(s) running")
        self.log.info("daemon stopping", running=self.running_jobs(),
                      timeout_s=self.config.shutdown_timeout_s)
        self.stop_accepting()
        if self.control is not None:
            self.control.broadcast(EVENT_SHUTDOWN, {"role": self.role})
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        assert self._wake is not None
        while self.running_jobs() and not self.force_exit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await bounded(self._wake.wait(), min(self.tick_s, left))
            self._wake.clear()
            self.tick()
        if self.running_jobs():
            self.log.warning("cancelling jobs still running", running=self.running_jobs(),
                             forced=self.force_exit)
            reason = "daemon shutting down" + (" (forced)" if self.force_exit else "")
            try:
                await bounded(self.cancel_all(reason), CANCEL_BOUND_S + 5)
            except TimeoutError:
                self.log.error("jobs did not end after cancellation; exiting anyway",
                               running=self.running_jobs())
        self.tick()
        await self._close_all()
        self.log.info("daemon stopped")

    async def _close_all(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        await self.close_data()
        self.notifier.close()

    # --- ticks ------------------------------------------------------------------

    @property
    def tick_s(self) -> float:
        """Seconds between ticks: at most half the watchdog interval."""
        interval = self.notifier.watchdog_interval_s
        return DEFAULT_TICK_S if interval is None else min(DEFAULT_TICK_S, interval / 2)

    def tick(self) -> None:
        """Periodic work; a bug here is logged, never fatal to the jobs."""
        try:
            self.registry.purge()
            figures = self.totals.figures.plus(self.live_figures())
            now = time.monotonic()
            self._image_rate.update(figures.image_bytes, now)
            for record in self.registry:
                if not record.finished and record.stats is not None:
                    self._measure(record, now)
            self.notifier.status(self.status_line())
        except Exception:
            self.log.exception("daemon tick failed")
        interval = self.notifier.watchdog_interval_s
        now = time.monotonic()
        # Ping when waiting for the next tick would overrun the interval.
        if interval is not None and now - self._last_ping + self.tick_s >= interval:
            self.notifier.watchdog()
            self._last_ping = now

    def wake(self) -> None:
        """Run a tick now (a job finished; a signal arrived)."""
        if self._wake is not None:
            self._wake.set()

    @property
    def rate_bytes_per_s(self) -> float:
        """Image bytes per second of all jobs, as of the last tick."""
        return self._image_rate.rate

    # --- signals and reload -----------------------------------------------------------

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        previous: dict[signal.Signals, Any] = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if self.install_signals else ():
            try:
                previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self.handle_signal, sig)
            except (ValueError, RuntimeError, NotImplementedError):
                previous.pop(sig, None)  # not the main thread: the caller handles signals
        try:
            yield
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                if handler in (None, signal.SIG_DFL) and sig == signal.SIGTERM and self.should_exit:
                    # We are on our way out after a stop request: a repeated
                    # SIGTERM (systemd, a supervisor) must not turn the clean
                    # exit into death by signal in the last milliseconds.
                    handler = signal.SIG_IGN
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def handle_signal(self, sig: signal.Signals) -> None:
        """SIGTERM/SIGINT: stop (a second SIGINT: without waiting); SIGHUP: reload."""
        if sig == signal.SIGHUP:
            self._reload_requested = True
        elif sig == signal.SIGINT and self.should_exit:
            self.force_exit = True
            self.log.warning("second interrupt: not waiting for running jobs")
        else:
            self.log.info("stop requested", signal=sig.name)
        if sig != signal.SIGHUP:
            self.request_stop()
        self.wake()

    def request_stop(self) -> None:
        """Begin the shutdown phase, as SIGTERM does."""
        self.should_exit = True
        self.wake()

    def reload(self) -> None:
        """Re-read the config file; apply what can change without a restart."""
        old = self.config
        if old.path is None:
            self.log.warning("reload requested, but the daemon has no config file")
            return
        self.notifier.reloading()
        try:
            new = self.load_config(old.path)
        except ConfigError as exc:
            self.log.error("reload failed; the running configuration stays", error=str(exc))
            self.notifier.ready(self.status_line())
            return
        changed = [f.name for f in dataclasses.fields(new)
                   if getattr(new, f.name) != getattr(old, f.name)]
        needs_restart = [name for name in changed if name in self.restart_fields]
        # Each changed key with its old and new value, before those that need
        # a restart are put back.
        settings = changed_settings(old, new)
        new = dataclasses.replace(new, **{name: getattr(old, name) for name in needs_restart})
        self.config = new
        self.apply_config(old, new)
        applied = [name for name in changed if name not in needs_restart]
        for key, before, after in settings:
            self.log.info("setting changed", key=key, old=before, new=after,
                          applied=key.split(".")[0] not in needs_restart)
        self.log.info("configuration reloaded", applied=applied, needs_restart=needs_restart)
        if needs_restart:
            self.log.warning("these settings change only on restart", settings=needs_restart)
        self.notifier.ready(self.status_line())

    # --- jobs -------------------------------------------------------------------------

    def job_changed(self, record: JobRecord, previous: JobState | None) -> None:
        """Every state change of every job: event, logs, totals."""
        data: dict[str, Any] = {"id": str(record.id), "name": record.name,
                                "status": record.state.value}
        if previous is not None:
            data["previous"] = previous.value
        if record.error is not None and record.finished:
            data["error"] = record.error
        if self.control is not None:
            self.control.broadcast(EVENT_JOB_STATUS_CHANGE, data)
        log = get_logger(role=self.role, job=str(record.id), name=record.name)
        log.debug("job state", status=record.state.value,
                  previous=previous.value if previous else None)
        if record.finished:
            self._job_meters.pop(record.id, None)
            self.totals.job_finished(record.state.value, record.stats)
            # The canonical line: one per job, short, with the key figures;
            # query-job has the rest.  A failure is a warning; a cancel is not.
            level = log.warning if record.state == JobState.FAILED else log.info
            level("job finished", **finished_fields(record))
            self.wake()

    def find_job(self, arguments: dict[str, Any], optional: tuple[str, ...] = ()) -> JobRecord:
        """The job ``{"id": REF}`` names (id or name), or a CommandError;
        ``optional`` are the other arguments the command takes."""
        expect_keys(arguments, required=("id",), optional=optional)
        ref = arguments["id"]
        if not isinstance(ref, str):
            raise CommandError(ErrorClass.INVALID_ARGUMENT, "id must be a job id or name (string)")
        record = self.registry.get(ref)
        if record is None:
            raise CommandError(ErrorClass.JOB_NOT_FOUND, f"no job {ref!r} on this {self.role}")
        return record

    # --- commands ---------------------------------------------------------------------

    def query_daemon_fields(self) -> dict[str, Any]:
        """What ``query-daemon`` returns."""
        cfg = self.config
        out: dict[str, Any] = {
            "role": self.role,
            "version": __version__,
            "pid": os.getpid(),
            "state": "stopping" if self.stopping else "running",
            "uptime-s": round(time.monotonic() - self.started_mono, 3),
            "config-file": cfg.path,
            "control-socket": cfg.control_socket,
            "metrics-listen": (f"{self.metrics_address[0]}:{self.metrics_address[1]}"
                               if self.metrics_address else None),
            "log-level": cfg.log_level,
            "shutdown-timeout-s": cfg.shutdown_timeout_s,
            "job-retention-s": cfg.job_retention_s,
            "jobs": self.registry.counts(),
            "rate-bytes-per-second": round(self.rate_bytes_per_s),
        }
        out.update(self.describe())
        return out

    #: query-daemon fields that describe the moment, not the set-up: left out
    #: of the "daemon ready" line.
    _MOMENTARY = frozenset({"state", "uptime-s", "jobs", "rate-bytes-per-second", "queued",
                            "running", "channels-in-use", "job-rates"})

    def ready_fields(self) -> dict[str, Any]:
        """What the ``daemon ready`` line says: version, sockets, limits."""
        return {k: v for k, v in self.query_daemon_fields().items() if k not in self._MOMENTARY}

    async def _cmd_query_daemon(self, arguments: dict[str, Any]) -> dict[str, Any]:
        expect_keys(arguments)
        return self.query_daemon_fields()

    async def _cmd_job_list(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        expect_keys(arguments)
        return [record.summary() for record in self.registry]

    async def _cmd_query_jobs(self, arguments: dict[str, Any]) -> list[dict[str, Any]]:
        expect_keys(arguments)
        return [self.job_view(record) for record in self.registry]

    async def _cmd_query_job(self, arguments: dict[str, Any]) -> dict[str, Any]:
        record = self.find_job(arguments)
        return self.job_view(record)

    async def _cmd_job_cancel(self, arguments: dict[str, Any]) -> dict[str, Any]:
        record = self.find_job(arguments, optional=("keep-partial",))
        keep_partial = arguments.get("keep-partial", False)
        if not isinstance(keep_partial, bool):
            raise CommandError(ErrorClass.INVALID_ARGUMENT, "keep-partial must be true or false")
        if record.finished:
            raise CommandError(ErrorClass.INVALID_STATE,
                               f"job {record.name} ({record.id}) already {record.state.value}")
        await self.cancel_job(record, keep_partial=keep_partial)
        return record.summary()

    # --- metrics ------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Everything the metrics endpoint shows, now."""
        return Snapshot(
            role=self.role,
            version=__version__,
            start_time_s=self.started_wall,
            jobs_by_state=self.registry.counts(),
            finished=dict(self.totals.finished),
            figures=self.totals.figures.plus(self.live_figures()),
            bandwidth_limit=self.bandwidth_limit(),
            extra_gauges=self.extra_gauges(),
            jobs=self.job_series(),
        )


def finished_fields(record: JobRecord) -> dict[str, Any]:
    """The key figures of a finished job, for its ``job finished`` line."""
    d = record.to_dict()
    out: dict[str, Any] = {"status": d["status"]}
    if record.error is not None:
        out["reason" if record.state == JobState.CANCELLED else "error"] = record.error
    if record.peer:
        out["peer"] = record.peer
    out.update({
        "elapsed_s": round(d["total-time"] / 1000, 3),
        "image_bytes": d["total"],
        "remaining_bytes": d["remaining"],
        "transferred_bytes": d["transferred"],
        "mbps": round(d["mbps"], 1),
        "zero_pages": d["duplicate"],
        "normal_pages": d["normal"],
        "channels": d["channels"],
    })
    engine = d.get("engine") or {}
    if engine.get("backend"):
        out["engine"] = engine["backend"]
    for key in ("sessions", "retransmitted-bytes", "resumed-packets"):
        if d.get(key):
            out[key.replace("-bytes", "_bytes").replace("-", "_")] = d[key]
    return out


def changed_settings(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """``(key, old, new)`` for every setting that differs, nested ones as
    ``limits.max_jobs``; values as the log shows them (numbers, strings, lists)."""
    flat_old, flat_new = _flat_settings(old), _flat_settings(new)
    return [(key, flat_old.get(key), flat_new.get(key))
            for key in sorted(set(flat_old) | set(flat_new))
            if flat_old.get(key) != flat_new.get(key)]


def _flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            out.update(_flat_settings(getattr(value, f.name), f"{prefix}{f.name}."))
        return out
    key = prefix.rstrip(".")
    if isinstance(value, bytes | bytearray):
        return {key: f"<{len(value)} bytes>"}  # key material never goes to a log
    if isinstance(value, tuple | list):
        return {key: [v if isinstance(v, int | float | str) else str(v) for v in value]}
    if value is None or isinstance(value, bool | int | float | str):
        return {key: value}
    return {key: str(value)}


def rate_text(bytes_per_s: float) -> str:
    """``12.3 MiB/s``."""
    return f"{format_bytes(bytes_per_s)}/s"
