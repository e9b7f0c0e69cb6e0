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
from dsamig.daemon.checks import (
    Check,
    check_address_free,
    check_descriptors,
    check_exposure,
    check_security,
    check_storage_dir,
    open_storage_dir,
)
from dsamig.jobs.config import ReceiverConfig, job_name_problem, load_receiver_config
from dsamig.jobs.model import JobRecord
from dsamig.pages import PageSink
from dsamig.pages.sink import PARTIAL_SUFFIX
from dsamig.proto import ErrorCode, Hello
from dsamig.settings import JobState
from dsamig.transport.receiver import JobFailedError, ReceiverJob, ReceiverServer


class JobRefusedError(JobFailedError):
    """A job the receiver will not take (name, limits, existing file, shutdown)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.REJECTED)


class ReceiverDaemon(Daemon):
    """``dsamig receiver --config FILE``."""

    role = "receiver"
    # The listener is built with its security: a change needs a restart.
    restart_fields = (*Daemon.restart_fields, "listen", "storage_dir", "security",
                      "allow_unauthenticated")

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

    def data_checks(self) -> list[Check]:
        cfg = self.config
        host, port = cfg.listen
        return [
            lambda: check_storage_dir(cfg.storage_dir),
            lambda: check_security(cfg.security, "receiver"),
            lambda: check_exposure(cfg.listen, cfg.security, cfg.allow_unauthenticated, cfg.path),
            lambda: check_address_free(host, port),
            lambda: check_descriptors(cfg.limits.descriptors_needed()),
        ]

    async def start_data(self) -> None:
        self._dir_fd = open_storage_dir(self.config.storage_dir)
        host, port = self.config.listen
        security = self.config.security  # loaded and checked by the start-up checks
        self.server = ReceiverServer(
            host, port, self._sink_for, timeouts=self.config.timeouts,
            limits=self.config.limits, on_job_started=self._job_started,
            on_job_refused=self._job_refused,
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
        """Admit a job whose channel 0 arrived, and name its destination."""
        assert hello.manifest is not None
        self._admit(hello)
        return self._open_sink(hello.name, hello.manifest.image_size)

    def _job_started(self, job: ReceiverJob) -> None:
        record = JobRecord(
            job.job_id, job.name, self.role, JobState.SETUP, total=job.manifest.image_size,
            channels=job.channel_count, peer=job.peer_host, on_change=self.job_changed,
        )
        self.registry.add(record)
        record.follow(job.stats)

    def _job_refused(self, hello: Hello, reason: str) -> None:
        """Keep a record of every refusal (the operator asks "where is my job?"),
        finished at once, so that the name is free for the next attempt."""
        existing = self.registry.get(str(hello.job_id))
        if existing is not None and not existing.finished:
            return  # a refused reconnect of a running job: its record tells its story
        size = hello.manifest.image_size if hello.manifest is not None else 0
        self.registry.add(JobRecord(
            hello.job_id, hello.name, self.role, JobState.FAILED, total=size,
            channels=hello.channel_count, error=f"refused: {reason}", on_change=self.job_changed,
        ))

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
        # The sink works relative to our descriptor of storage_dir, so a link
        # put in place of the directory (or of a file in it) later on is
        # never followed either.
        return PageSink(os.path.join(self.config.storage_dir, name), size, dir_fd=self._dir_fd)

    # --- jobs ---------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        pass  # _admit refuses every new job once self.stopping is set

    def running_jobs(self) -> int:
        return len(self.server.jobs) if self.server is not None else 0

    async def cancel_all(self, reason: str) -> None:
        if self.server is not None:
            for job in list(self.server.jobs.values()):
                job.fail(JobFailedError(reason, ErrorCode.CANCELLED))

    async def cancel_job(self, record: JobRecord, *, keep_partial: bool = False) -> None:
        job = self.server.jobs.get(record.id) if self.server is not None else None
        if job is None:
            raise CommandError(ErrorClass.INVALID_STATE, f"job {record.name} is not running")
        if keep_partial and not job.acks:
            raise CommandError(ErrorClass.INVALID_STATE,
                               f"job {record.name} cannot be resumed (its sender does not "
                               "acknowledge), so there is no partial file to keep")
        reason = "cancelled by the receiver's operator"
        if keep_partial:
            reason += "; the partial file is kept: send again with resume to continue"
        # fail() tells the sender, closes the channels and deletes the partial
        # file, or keeps it with its checkpoint for a resume.
        job.fail(JobFailedError(reason, ErrorCode.CANCELLED, resumable=keep_partial))

    def job_view_extra(self, record: JobRecord) -> dict[str, Any]:
        """A running job's channels: connected ones against those it has."""
        job = self.server.jobs.get(record.id) if self.server is not None else None
        if job is None:
            return {}
        connected = len(job.channels)
        return {"channels-connected": connected, "channels-wanted": job.channel_count,
                "reconnecting": job.stats.setup_done is not None
                and connected < job.channel_count}

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
            # New jobs and connections get the new bounds; running jobs keep theirs.
            self.server.limits = new.limits
            self.server.timeouts = new.timeouts
