"""The receiver daemon: many senders, many jobs, every image inside storage_dir.

A job's destination is always ``<storage_dir>/<job name>``, where the name
comes from the sender's HELLO and must pass :func:`job_name_problem` (one
path component, no ``..``).  The sender never names a path.  Before a sink
is opened, the name and its ``.partial`` twin are looked up relative to the
storage directory's descriptor without following links: a symbolic link is
refused, not written through.  The sink itself opens the partial file with
O_NOFOLLOW and renames it into place only after the job digest matched.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from dsamig.control.protocol import CommandError, ErrorClass
from dsamig.daemon.base import Daemon, rate_text
from dsamig.errors import DsamigError, SinkError
from dsamig.jobs.config import ReceiverConfig, job_name_problem, load_receiver_config
from dsamig.jobs.model import JobRecord, JobState
from dsamig.pages import PageSink
from dsamig.pages.sink import PARTIAL_SUFFIX
from dsamig.proto import ErrorCode, Hello
from dsamig.transport.receiver import JobFailedError, ReceiverJob, ReceiverServer


class JobRefusedError(SinkError):
    """A job the receiver will not take (name, limits, existing file, shutdown)."""


class ReceiverDaemon(Daemon):
    """``dsamig receiver --config FILE``."""

    role = "receiver"
    restart_fields = (*Daemon.restart_fields, "listen", "storage_dir")

    def __init__(self, config: ReceiverConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.config: ReceiverConfig = config
        self.server: ReceiverServer | None = None
        self.listen_address: tuple[str, int] | None = None
        self._dir_fd: int | None = None

    @classmethod
    def load_config(cls, path: str) -> ReceiverConfig:
        return load_receiver_config(path)

    # --- data side -------------------------------------------------------------------

    async def start_data(self) -> None:
        storage = self.config.storage_dir
        try:
            # O_NOFOLLOW: the configured directory itself, not wherever a link points.
            self._dir_fd = os.open(
                storage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
            )
        except OSError as exc:
            if os.path.islink(storage):
                why = "is a symbolic link; configure the directory it points to"
            elif isinstance(exc, FileNotFoundError):
                why = "does not exist"
            elif isinstance(exc, NotADirectoryError):
                why = "is not a directory"
            else:
                why = f"cannot be opened: {exc.strerror}"
            raise SinkError(f"storage_dir {storage!r} {why}") from None
        if not os.access(storage, os.W_OK | os.X_OK):
            raise SinkError(f"storage_dir {storage!r} is not writable by this user")
        host, port = self.config.listen
        security = self.config.security
        if security is not None:
            for warning in security.check("receiver"):  # ConfigError if a file is bad
                self.log.warning("security", warning=warning)
        self.server = ReceiverServer(
            host, port, self._sink_for, timeouts=self.config.timeouts,
            max_jobs=self.config.limits.max_jobs, on_job_finished=self._job_finished,
            max_jobs_per_peer=self.config.limits.max_jobs_per_peer,
            security=security,
        )
        self.listen_address = await self.server.start()

    async def close_data(self) -> None:
        if self.server is not None:
            await self.server.close("receiver shutting down")
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def _sink_for(self, hello: Hello) -> PageSink:
        """Admit a job whose channel 0 arrived, and open its destination."""
        assert hello.manifest is not None
        size = hello.manifest.image_size
        try:
            self._admit(hello)
            sink = self._open_sink(hello.name, size)
        except DsamigError as exc:
            # Keep a record of the refusal: the operator asks "where is my job?"
            record = JobRecord(
                hello.job_id, hello.name, self.role, JobState.FAILED, total=size,
                channels=hello.channel_count, error=f"refused: {exc}", on_change=self.job_changed,
            )
            self.registry.add(record)
            raise
        self.registry.add(JobRecord(
            hello.job_id, hello.name, self.role, JobState.SETUP, total=size,
            channels=hello.channel_count, on_change=self.job_changed,
        ))
        return sink

    def _admit(self, hello: Hello) -> None:
        if self.stopping:
            raise JobRefusedError("the receiver is shutting down and takes no new jobs")
        problem = job_name_problem(hello.name)
        if problem is not None:
            raise JobRefusedError(problem)
        for record in self.registry:
            if not record.finished and record.name == hello.name:
                raise JobRefusedError(f"a job named {hello.name!r} is already being received")
        assert self.server is not None
        in_use = sum(job.channel_count for job in self.server.jobs.values())
        limit = self.config.limits.max_channels
        if in_use + hello.channel_count > limit:
            raise JobRefusedError(
                f"the job's {hello.channel_count} channels would exceed the receiver's "
                f"max_channels {limit} ({in_use} in use)"
            )

    def _open_sink(self, name: str, size: int) -> PageSink:
        assert self._dir_fd is not None
        # The image, its partial file and whatever the sink keeps beside it
        # (<name>.partial.*): none may be a link or anything but a file.
        derived = name + PARTIAL_SUFFIX
        with os.scandir(self._dir_fd) as entries:
            for entry in entries:
                if entry.name != name and not entry.name.startswith(derived):
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise JobRefusedError(
                        f"{entry.name!r} in storage_dir is a symbolic link; "
                        "refusing to write through it"
                    )
                if not stat.S_ISREG(st.st_mode):
                    raise JobRefusedError(
                        f"{entry.name!r} in storage_dir exists and is not a regular file"
                    )
                if entry.name == name and not self.config.replace_existing:
                    raise JobRefusedError(
                        f"image {name!r} already exists in storage_dir "
                        "(replace_existing: true allows replacing it)"
                    )
        return PageSink(os.path.join(self.config.storage_dir, name), size)

    def _job_finished(self, job: ReceiverJob) -> None:
        record = self.registry.get(str(job.job_id))
        if record is None or record.finished:
            return
        record.stats = job.stats
        if not record.peer and 0 in job.channels:
            record.peer = job.channels[0].peer
        try:
            state = JobState(job.stats.status)
        except ValueError:
            state = JobState.FAILED
        if not state.finished:
            state = JobState.FAILED
        record.advance(state, job.stats.error)

    # --- jobs ---------------------------------------------------------------------------

    def sync_jobs(self) -> None:
        if self.server is None:
            return
        for record in self.registry:
            if record.finished:
                continue
            job = self.server.jobs.get(record.id)
            if job is None:
                continue
            record.stats = job.stats
            if not record.peer and 0 in job.channels:
                record.peer = job.channels[0].peer
            if job.stats.status in ("active", "completing"):
                record.advance(JobState(job.stats.status))

    def stop_accepting(self) -> None:
        pass  # _admit refuses every new job once self.stopping is set

    def running_jobs(self) -> int:
        return len(self.server.jobs) if self.server is not None else 0

    async def cancel_all(self, reason: str) -> None:
        if self.server is not None:
            for job in list(self.server.jobs.values()):
                job.fail(JobFailedError(reason, ErrorCode.CANCELLED))

    async def cancel_job(self, record: JobRecord) -> None:
        job = self.server.jobs.get(record.id) if self.server is not None else None
        if job is None:
            raise CommandError(ErrorClass.INVALID_STATE, f"job {record.name} is not running")
        # fail() deletes the partial file, tells the sender and closes the channels.
        job.fail(JobFailedError("cancelled by the receiver's operator", ErrorCode.CANCELLED))

    # --- reporting ---------------------------------------------------------------------

    def status_line(self) -> str:
        counts = self.registry.counts()
        running = sum(counts[s] for s in ("setup", "active", "completing"))
        done = counts["completed"]
        prefix = "stopping: " if self.stopping else ""
        return (f"{prefix}{running} job(s) receiving, {done} completed, "
                f"{rate_text(self.rate_bytes_per_s)}")

    def describe(self) -> dict[str, Any]:
        address = self.listen_address or self.config.listen
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return {
            "listen": f"{host}:{address[1]}",
            "storage-dir": self.config.storage_dir,
            "replace-existing": self.config.replace_existing,
            "limits": {"max-jobs": self.config.limits.max_jobs,
                       "max-channels": self.config.limits.max_channels},
            "channels-in-use": sum(j.channel_count for j in self.server.jobs.values())
            if self.server is not None else 0,
        }

    def extra_gauges(self) -> dict[str, float]:
        return {"channels_in_use": sum(j.channel_count for j in self.server.jobs.values())
                if self.server is not None else 0}

    def apply_config(self, old: Any, new: Any) -> None:
        super().apply_config(old, new)
        if self.server is not None:
            self.server.max_jobs = new.limits.max_jobs
            self.server.max_jobs_per_peer = new.limits.max_jobs_per_peer or max(
                1, new.limits.max_jobs // 2
            )
            # New jobs get the new bounds; running ones keep theirs.
            self.server.timeouts = new.timeouts
