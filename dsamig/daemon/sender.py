"""The sender daemon: jobs submitted over the control socket, queued, paced, sent.

Jobs start in submission order while the daemon's ``max_jobs`` and
``max_channels`` allow; the rest wait in the queue (strict FIFO: a big job at
the head is not overtaken, so it cannot starve).  Every running job has a
token bucket that its channels await before each chunk; the daemon sets the
buckets' rates so that the daemon-wide ``max_bandwidth`` is shared max-min
fairly and no job exceeds its own ``max_bandwidth``.

A job's source is opened at ``job-start``, not when the job leaves the
queue: below the ``source_dirs`` entry that holds it, one path component at
a time relative to the directory's descriptor, never following a link
(:func:`open_source_beneath`).  The job keeps that descriptor, so whatever
happens to the path while it waits, the file sent is the file checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from dsamig.control.protocol import CommandError, ErrorClass
from dsamig.control.server import Handler
from dsamig.daemon.base import CANCEL_BOUND_S, Daemon, rate_text
from dsamig.daemon.checks import Check, check_security, check_source_dirs
from dsamig.daemon.metrics import Figures, reconnects_of
from dsamig.engine import EnginePool
from dsamig.errors import ConfigError, DsamigError, SourceError
from dsamig.jobs.config import JobSpec, LiveSpec, SenderConfig, load_sender_config
from dsamig.jobs.model import JobRecord
from dsamig.logs import get_logger
from dsamig.pages import PageSource, image_size
from dsamig.report import live_fields
from dsamig.settings import JobState
from dsamig.transport.pacing import TokenBucket, fair_shares
from dsamig.transport.sender import LiveOptions, Sender, SendOptions, send_image


@dataclass
class SendingJob:
    """A submitted job: its record, its spec and, once started, its task."""

    record: JobRecord
    spec: JobSpec
    pacer: TokenBucket
    task: asyncio.Task[None] | None = None
    sender: Sender | None = None
    #: The source, opened and checked at job-start; the job's PageSource takes it over.
    source_fd: int | None = None

    def take_source_fd(self) -> int:
        """Hand the source's descriptor over (once)."""
        fd = self.source_fd
        assert fd is not None, "the source descriptor was already taken"
        self.source_fd = None
        return fd

    def release_source(self) -> None:
        """Close the source's descriptor if no PageSource took it; idempotent."""
        if self.source_fd is not None:
            os.close(self.source_fd)
            self.source_fd = None


def send_options(spec: JobSpec, job_id: uuid.UUID, pacer: TokenBucket | None = None) -> SendOptions:
    """The transport's options for running the job ``spec`` as ``job_id``."""
    return SendOptions(
        host=spec.host, port=spec.port, channels=spec.channels,
        packet_size=spec.packet_size, page_size=spec.page_size,
        engine=spec.engine.kind, engine_threads=spec.engine.threads, dsa=spec.engine.dsa,
        name=spec.name, job_id=job_id, timeouts=spec.timeouts, pacer=pacer,
        resume=spec.resume, refresh=spec.refresh, retry_for_s=spec.retry_for_s,
        security=spec.security, live=None if spec.live is None else live_options(spec.live),
    )


def live_options(live: LiveSpec) -> LiveOptions:
    """The transport's options for a job's ``live:`` mapping."""
    return LiveOptions(max_downtime_s=live.max_downtime_s, max_rounds=live.max_rounds,
                       pause_cmd=live.pause_cmd, resume_cmd=live.resume_cmd, qmp=live.qmp,
                       keep_paused=not live.resume_writer)


class SourceRefusedError(CommandError):
    """A job-start whose source may not or cannot be sent."""

    def __init__(self, why: str) -> None:
        super().__init__(ErrorClass.INVALID_ARGUMENT, f"job-start: source: {why}")


def _below(path: str, directory: str) -> list[str] | None:
    """The components of ``path`` below ``directory`` (lexically), or None if outside."""
    directory = directory.rstrip("/") or "/"
    if directory == "/":
        rest = path.lstrip("/")
    elif path.startswith(directory + "/"):
        rest = path[len(directory) + 1:]
    else:
        return None
    parts = rest.split("/")
    return parts if rest and all(p not in ("", ".", "..") for p in parts) else None


#: Directories on the way are only searched, never read: O_PATH needs no
#: read permission (a 0711 directory is fine), only search permission.
_DIR_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def open_source_beneath(source: str, source_dirs: tuple[str, ...]) -> tuple[int, int]:
    """``(fd, size)`` of ``source``, opened below the ``source_dirs`` entry holding it.

    ``source`` must be an absolute, normalised path whose text lies below an
    entry (as configured, or with that entry's own links resolved: the
    operator chose them).  From the entry's descriptor every further
    component is opened with ``O_NOFOLLOW`` relative to the one before, so a
    symbolic link anywhere below the entry, swapped in at any moment, is
    refused rather than followed; it has the guarantee of openat2's
    ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` on every kernel.  The file
    must be a regular file or a block device.  SourceRefusedError otherwise.
    """
    chosen: tuple[str, list[str]] | None = None
    for directory in source_dirs:
        for spelling in (directory, os.path.realpath(directory)):
            parts = _below(source, spelling)
            if parts is not None:
                chosen = (directory, parts)
                break
        if chosen is not None:
            break
    if chosen is None:
        raise SourceRefusedError(
            f"{source!r} is outside the sender's source_dirs ({', '.join(source_dirs)})"
        )
    directory, parts = chosen
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        raise SourceRefusedError(
            f"cannot open source_dirs entry {directory!r}: {exc.strerror}") from None
    walked = directory
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            # O_NONBLOCK: opening a FIFO must not hang the daemon.
            flags = (os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
                     if last else _DIR_FLAGS | os.O_NOFOLLOW)
            walked = os.path.join(walked, part)
            try:
                next_fd = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise SourceRefusedError(_open_failure(source, walked, exc, fd, part)) from None
            os.close(fd)
            fd = next_fd
        try:
            size = image_size(fd, source)
        except SourceError as exc:
            raise SourceRefusedError(exc.args[0]) from None
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, size


def _open_failure(source: str, walked: str, exc: OSError, dir_fd: int, part: str) -> str:
    """Why opening component ``part`` (the path ``walked``) of ``source`` failed."""
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return (f"{source!r}: {walked!r} is a symbolic link; the sender does not follow "
                    "links below source_dirs (name the file by its real path)")
    if isinstance(exc, FileNotFoundError):
        return f"{source!r} does not exist"
    if isinstance(exc, NotADirectoryError):
        return f"{source!r}: {walked!r} is not a directory"
    if isinstance(exc, PermissionError):
        return f"{source!r} is not readable by the sender daemon"
    return f"cannot open {source!r}: {exc.strerror}"


class SenderDaemon(Daemon):
    """``dsamig sender --config FILE``."""

    role = "sender"

    def __init__(self, config: SenderConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.config: SenderConfig = config
        self.queue: deque[SendingJob] = deque()
        self.running: dict[uuid.UUID, SendingJob] = {}
        # Jobs share DSA engines: a dedicated WQ opens in one process only.
        self.engines = EnginePool()

    @classmethod
    def load_config(cls, path: str) -> SenderConfig:
        return load_sender_config(path)

    async def start_data(self) -> None:
        pass  # a sender only connects out, per job

    async def close_data(self) -> None:
        if self.running or self.queue:
            await self.cancel_all("sender shutting down")
        self.engines.close()

    def data_checks(self) -> list[Check]:
        cfg = self.config
        return [lambda: check_source_dirs(cfg.source_dirs),
                lambda: check_security(cfg.security, "sender")]

    def extra_commands(self) -> dict[str, Handler]:
        return {"job-start": self._cmd_job_start}

    # --- submission ------------------------------------------------------------------

    async def _cmd_job_start(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.stopping:
            raise CommandError(ErrorClass.UNAVAILABLE, "the sender is shutting down; no new jobs")
        spec = JobSpec.from_object(arguments, source="job-start")
        spec = spec.with_security_defaults(self.config.security)
        limits = self.config.limits
        if spec.channels > limits.max_channels:
            raise CommandError(
                ErrorClass.INVALID_ARGUMENT,
                f"job-start: channels: {spec.channels} is more than this sender's "
                f"max_channels ({limits.max_channels})",
            )
        if len(self.queue) >= limits.max_queued:
            raise CommandError(ErrorClass.UNAVAILABLE,
                               f"the queue is full ({len(self.queue)} jobs waiting)")
        if spec.security is not None:
            # Keys, certificates and the receiver's name now, not when the
            # job leaves the queue: a short key is refused to `dsamig start`.
            try:
                for warning in spec.security.check("sender", host=spec.host, strict=True):
                    self.log.warning("job security", name=spec.name, warning=warning)
            except ConfigError as exc:
                raise CommandError(ErrorClass.INVALID_ARGUMENT,
                                   f"job-start: security: {exc}") from None
        fd, size = open_source_beneath(spec.source, self.config.source_dirs)
        record = JobRecord(
            uuid.uuid4(), spec.name, self.role, JobState.QUEUED, total=size,
            channels=spec.channels, peer=f"{spec.host}:{spec.port}", on_change=self.job_changed,
        )
        self.registry.add(record)
        job = SendingJob(record, spec, TokenBucket(), source_fd=fd)
        self.queue.append(job)
        log = get_logger(role=self.role, job=str(record.id), name=record.name)
        log.info("job submitted", source=spec.source, destination=record.peer,
                 channels=spec.channels, image_bytes=size, max_bandwidth=spec.max_bandwidth)
        self._schedule()
        if any(queued is job for queued in self.queue):
            log.info("job queued", reason=self.queue_reason(job), position=len(self.queue))
        return record.summary()

    # --- scheduling ------------------------------------------------------------------

    def channels_in_use(self) -> int:
        """TCP channels of the running jobs."""
        return sum(job.spec.channels for job in self.running.values())

    def _schedule(self) -> None:
        """Start queued jobs, in order, while the limits allow."""
        limits = self.config.limits
        while self.queue and not self.stopping:
            head = self.queue[0]
            if len(self.running) >= limits.max_jobs:
                break
            if self.channels_in_use() + head.spec.channels > limits.max_channels:
                break
            self.queue.popleft()
            get_logger(role=self.role, job=str(head.record.id), name=head.record.name).info(
                "job started", running=len(self.running) + 1,
                channels_in_use=self.channels_in_use() + head.spec.channels)
            self.running[head.record.id] = head
            head.task = asyncio.ensure_future(self._run(head))
            head.task.add_done_callback(functools.partial(self._reap_task, head))
        self._rebalance()

    def queue_reason(self, job: SendingJob) -> str:
        """Why ``job`` waits in the queue, in words."""
        limits = self.config.limits
        ahead = next((i for i, queued in enumerate(self.queue) if queued is job), 0)
        if ahead:
            return f"{ahead} earlier job(s) wait first (the queue is first in, first out)"
        if len(self.running) >= limits.max_jobs:
            return f"max_jobs {limits.max_jobs} jobs are running"
        return (f"its {job.spec.channels} channels do not fit: {self.channels_in_use()} of "
                f"max_channels {limits.max_channels} in use")

    def _rebalance(self) -> None:
        jobs = list(self.running.values())
        shares = fair_shares(self.config.limits.max_bandwidth,
                             [job.spec.max_bandwidth for job in jobs])
        for job, share in zip(jobs, shares, strict=True):
            job.pacer.set_rate(share)

    async def _run(self, job: SendingJob) -> None:
        """One job from setup to its end, through the runner ``dsamig send``
        uses too; whatever happens, the record says how it ended."""
        record = job.record
        log = get_logger(role=self.role, job=str(record.id), name=record.name)

        def started(sender: Sender) -> None:
            job.sender = sender
            record.follow(sender.stats)  # from here on the stats move the record

        try:
            record.advance(JobState.SETUP)
            source = PageSource(job.spec.source, fd=job.take_source_fd())
            await send_image(source, send_options(job.spec, record.id, job.pacer),
                             engines=self.engines, on_start=started)
        except DsamigError as exc:
            record.advance(JobState.FAILED, str(exc))  # before the job existed, if at all
        except asyncio.CancelledError:
            # We own this task: its cancellation is the job's end, not ours.
            record.advance(JobState.CANCELLED)
        except Exception as exc:  # a bug fails this job, never the daemon or the others
            log.exception("job crashed")
            record.advance(JobState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            job.release_source()

    def _reap_task(self, job: SendingJob, task: asyncio.Task[None]) -> None:
        """The job's task ended: free its slot and start the next.

        A done callback rather than a ``finally`` in :meth:`_run`: a task
        cancelled before its first step never enters its body.
        """
        job.release_source()  # a task cancelled before its first step never took it
        if not job.record.finished:
            job.record.advance(JobState.CANCELLED)
        self.running.pop(job.record.id, None)
        if not self.stopping:
            self._schedule()
        else:
            self._rebalance()
        self.wake()

    # --- cancelling ----------------------------------------------------------------------

    async def cancel_job(self, record: JobRecord, *, keep_partial: bool = False) -> None:
        if keep_partial:
            raise CommandError(
                ErrorClass.INVALID_ARGUMENT,
                "keep-partial applies to a receiver's job (the receiver keeps the partial "
                "file): stop the job on the receiver's socket with --keep-partial")
        for queued in self.queue:
            if queued.record is record:
                self.queue.remove(queued)
                queued.release_source()
                record.cancelling("cancelled before it started")
                record.advance(JobState.CANCELLED)
                return
        job = self.running.get(record.id)
        if job is None or job.task is None:
            raise CommandError(ErrorClass.INVALID_STATE, f"job {record.name} is not running")
        self._cancel(job, "cancelled by the sender's operator")
        await asyncio.wait({job.task}, timeout=CANCEL_BOUND_S)

    def _cancel(self, job: SendingJob, reason: str) -> None:
        job.record.cancelling(reason)
        if job.sender is not None:
            # The one cancel path, as `dsamig send` interrupted: the receiver
            # is told why (it records a cancellation and deletes the partial
            # file), then the job's task is cancelled.
            job.sender.cancel(reason)
        elif job.task is not None:
            job.task.cancel()  # not started yet: nobody to tell

    def stop_accepting(self) -> None:
        while self.queue:
            job = self.queue.popleft()
            job.release_source()
            job.record.cancelling("the sender shut down before the job started")
            job.record.advance(JobState.CANCELLED)

    def running_jobs(self) -> int:
        return len(self.running)

    async def cancel_all(self, reason: str) -> None:
        self.stop_accepting()
        tasks = []
        for job in list(self.running.values()):
            self._cancel(job, reason)
            if job.task is not None:
                tasks.append(job.task)
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_BOUND_S)

    # --- reporting ---------------------------------------------------------------------

    def live_figures(self) -> Figures:
        live = Figures()
        for job in self.running.values():
            sender = job.sender
            if sender is None or job.record.finished:
                continue
            engine: dict[str, Any] = sender.stats.engine
            if not engine and sender.engine is not None:
                try:
                    engine = sender.engine.stats()
                except Exception:  # closing under us: its final figures come with the record
                    engine = {}
            live.add(sender.stats, engine)
        for shared in self.engines.engine_stats():
            live.add_engine(shared)
        return live

    def job_view_extra(self, record: JobRecord) -> dict[str, Any]:
        """A queued job says why it waits; a running one its bandwidth share,
        its channels and the engine it uses."""
        queued = next((job for job in self.queue if job.record is record), None)
        if queued is not None:
            return {"queue-reason": self.queue_reason(queued),
                    "queue-position": self.queue.index(queued) + 1,
                    "max-bandwidth": queued.spec.max_bandwidth}
        job = self.running.get(record.id)
        if job is None:
            return {}
        out: dict[str, Any] = {"bandwidth-limit": job.pacer.rate,
                               "max-bandwidth": job.spec.max_bandwidth,
                               "channels-wanted": job.spec.channels}
        sender = job.sender
        if sender is not None:
            out["channels-connected"] = len(sender.stats.channels)
            out.update(live_fields(sender.stats))
            if sender.engine is not None and not sender.stats.engine:
                with contextlib.suppress(Exception):  # closing under us: nothing to show
                    out["engine"] = sender.engine.stats()
        return out

    def job_series_extra(self, record: JobRecord) -> dict[str, Any]:
        job = self.running.get(record.id)
        if job is None or job.sender is None:
            return {}
        return {"reconnects": reconnects_of(job.sender.stats),
                "bandwidth_limit": job.pacer.rate}

    def status_line(self) -> str:
        prefix = "stopping: " if self.stopping else ""
        done = self.registry.counts()["completed"]
        return (f"{prefix}{len(self.running)} job(s) sending, {len(self.queue)} queued, "
                f"{done} completed, {rate_text(self.rate_bytes_per_s)}")

    def describe(self) -> dict[str, Any]:
        limits = self.config.limits
        return {
            "limits": {"max-jobs": limits.max_jobs, "max-queued": limits.max_queued,
                       "max-channels": limits.max_channels,
                       "max-bandwidth": limits.max_bandwidth},
            "source-dirs": list(self.config.source_dirs),
            "queued": len(self.queue),
            "running": len(self.running),
            "channels-in-use": self.channels_in_use(),
            "job-rates": {str(j.record.id): j.pacer.rate for j in self.running.values()},
        }

    def bandwidth_limit(self) -> float | None:
        return self.config.limits.max_bandwidth

    def extra_gauges(self) -> dict[str, float]:
        # Queued jobs are dsamig_jobs{state="queued"}: not repeated here.
        return {"channels_in_use": self.channels_in_use()}

    def apply_config(self, old: Any, new: Any) -> None:
        super().apply_config(old, new)
        self._schedule()  # a higher limit may start queued jobs; rebalances too
