"""The CLI's control-socket commands: ``dsamig start``, ``status``, ``stop``, ``jobs``.

Each is a small object built by ``dsamig.cli`` from its arguments; ``run()``
returns the exit code.  ``start --wait`` exits by the job's outcome:
:data:`EXIT_OK` completed, :data:`~dsamig.errors.EXIT_TRANSFER` failed,
:data:`EXIT_CANCELLED` cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

from dsamig.control.client import ControlClient
from dsamig.control.protocol import EVENT_JOB_STATUS_CHANGE, EVENT_SHUTDOWN
from dsamig.errors import ConfigError
from dsamig.jobs.config import default_control_socket, load_job
from dsamig.report import live_line, progress_line, reconnect_note, summary_table
from dsamig.runtime import run_loop
from dsamig.settings import EXIT_OK, JobState, exit_code_for
from dsamig.units import BYTES, RateUnit, format_bytes, rate_unit

#: How often ``start --wait`` refreshes its progress bar.
PROGRESS_INTERVAL_S = 0.25
#: After asking for a cancellation (Ctrl-C during --wait), how long to wait for it.
CANCEL_WAIT_S = 15.0
#: How often ``status --watch`` shows the job again.
WATCH_INTERVAL_S = 1.0
#: Home the cursor and clear the terminal: ``status --watch`` redraws in place.
CLEAR_SCREEN = "\x1b[H\x1b[2J"
FINISHED = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)

T = TypeVar("T")


def default_socket() -> str:
    """``$DSAMIG_SOCKET``, else the sender daemon's default control socket."""
    return os.environ.get("DSAMIG_SOCKET") or default_control_socket("sender")


def _run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await main()

    return run_loop(wrapper())


# --- formatting ---------------------------------------------------------------------

def jobs_table(jobs: list[dict[str, Any]]) -> str:
    """Many jobs, one line each, for people.

    The name column is as wide as the longest name: a name is what the user
    pastes into ``dsamig stop``, so it is never cut.
    """
    if not jobs:
        return "no jobs"
    width = max(len("NAME"), *(len(job["name"]) for job in jobs))
    lines = [f"{'ID':<36}  {'NAME':<{width}}  {'STATUS':<10}  {'DONE':>6}  {'SIZE':>10}  NOTE"]
    for job in jobs:
        total = job.get("total", 0)
        done = 1.0 if not total else 1 - job.get("remaining", total) / total
        status = job["status"]
        if status == "completed":
            done = 1.0
        # The error of a failed job; the round and dirty rate of a live one.
        note = job.get("error-desc") or live_line(job, status in FINISHED)
        lines.append(
            f"{job['id']:<36}  {job['name']:<{width}}  {status:<10}  "
            f"{done * 100:5.1f}%  {format_bytes(total):>10}  {note}".rstrip()
        )
    return "\n".join(lines)


def job_progress_line(job: dict[str, Any], unit: RateUnit = BYTES,
                      cap: float | None = None) -> str:
    """The ``start --wait`` progress line of a job as ``query-job`` gives it: the
    daemon's image rate, in ``unit`` (the unit the job's cap was written in)."""
    total = job.get("total", 0)
    note = job["status"]
    if "round" in job and note == JobState.ACTIVE:
        note = f"round {job['round']}"  # a live job
    reconnects = reconnect_note(job)
    if reconnects:
        note += f", {reconnects}"
    return progress_line(total - job.get("remaining", total), total,
                         job.get("image-bytes-per-second", 0), unit=unit, cap=cap,
                         note=f"{note:<12}")


# --- commands -------------------------------------------------------------------------

@dataclass
class StartCommand:
    """``dsamig start JOB.yaml [--socket PATH] [--wait] [--json]``.

    The job file is validated here, so its errors carry line numbers; the
    daemon validates the document again.  With ``--wait`` a SIGINT or SIGTERM
    cancels the job: the command and the job end together (which is what the
    ``dsamig-job@.service`` template relies on for ``systemctl stop``).
    """

    job_file: str
    socket: str
    wait: bool = False
    as_json: bool = False
    stream: TextIO = sys.stderr
    _unit: RateUnit = field(default=BYTES, init=False, repr=False)
    _cap: float | None = field(default=None, init=False, repr=False)

    def run(self) -> int:
        """Validate the job file, submit it, maybe wait; the exit code."""
        spec = load_job(self.job_file)
        # The progress bar shows the rate in the unit the cap was written in.
        self._unit = rate_unit(spec.max_bandwidth)
        self._cap = spec.max_bandwidth
        return _run(lambda: self._main(spec.to_document()))

    async def _main(self, document: dict[str, Any]) -> int:
        client = await ControlClient.connect(self.socket)
        try:
            if client.role != "sender":
                raise ConfigError(f"{self.socket} is the {client.role} daemon's socket; "
                                  "jobs are started on the sender")
            if self.wait:
                await client.execute("subscribe", {"events": [EVENT_JOB_STATUS_CHANGE,
                                                              EVENT_SHUTDOWN]})
            job = await client.execute("job-start", document)
            if not self.as_json:
                print(job["id"], flush=True)
            if not self.wait:
                if self.as_json:
                    print(json.dumps(job), flush=True)
                return EXIT_OK
            return await self._wait(client, job["id"])
        finally:
            await client.close()

    async def _wait(self, client: ControlClient, job_id: str) -> int:
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        handled = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, interrupted.set)
                handled.append(sig)
        show_bar = self.stream.isatty() and not self.as_json
        try:
            status = await self._follow(client, job_id, interrupted, show_bar)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            if show_bar:
                self.stream.write("\r" + " " * 120 + "\r")
                self.stream.flush()
        final = await client.execute("query-job", {"id": job_id})
        if self.as_json:
            print(json.dumps(final), flush=True)
        else:
            print(summary_table(final), flush=True)
        return exit_code_for(status)

    async def _follow(self, client: ControlClient, job_id: str, interrupted: asyncio.Event,
                      show_bar: bool) -> str:
        """Wait for the job's last state change; returns it."""
        cancel_deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            if interrupted.is_set() and cancel_deadline is None:
                cancel_deadline = loop.time() + CANCEL_WAIT_S
                print("dsamig: interrupted: cancelling the job", file=sys.stderr, flush=True)
                with contextlib.suppress(Exception):
                    await client.execute("job-cancel", {"id": job_id})
            try:
                event = await client.next_event(PROGRESS_INTERVAL_S)
            except TimeoutError:
                event = None
            if event is not None and event.get("event") == EVENT_JOB_STATUS_CHANGE:
                data = event.get("data", {})
                if data.get("id") == job_id and data.get("status") in FINISHED:
                    return str(data["status"])
            if event is None:
                job = await client.execute("query-job", {"id": job_id})
                if job["status"] in FINISHED:
                    return str(job["status"])  # ended between subscribe and job-start's reply
                if show_bar:
                    self.stream.write("\r" + job_progress_line(job, self._unit, self._cap))
                    self.stream.flush()
            if cancel_deadline is not None and loop.time() > cancel_deadline:
                return "cancelled"


@dataclass
class StatusCommand:
    """``dsamig status [JOB] [--watch] [--json]``: one job in full, or the daemon and every job.

    ``--json`` without a job prints ``{"daemon": <query-daemon>, "jobs":
    [<query-job>, ...]}``: the daemon's state (rates, limits, queue) with the
    jobs.  ``--watch`` shows the job again every ``interval_s`` until it
    ended (with ``--json``, one object per line).
    """

    socket: str
    job: str | None = None
    as_json: bool = False
    watch: bool = False
    interval_s: float = WATCH_INTERVAL_S
    stream: TextIO = sys.stdout

    def run(self) -> int:
        """Ask the daemon and print the answer; the exit code."""
        if self.watch and self.job is None:
            raise ConfigError("status --watch needs a JOB to watch")
        return _run(self._main)

    async def _main(self) -> int:
        async with await ControlClient.connect(self.socket) as client:
            if self.job is not None:
                return await self._show_job(client)
            jobs = await client.execute("query-jobs")
            daemon = await client.execute("query-daemon")
            if self.as_json:
                print(json.dumps({"daemon": daemon, "jobs": jobs}), file=self.stream,
                      flush=True)
                return EXIT_OK
            counts = ", ".join(f"{n} {s}" for s, n in daemon["jobs"].items() if n)
            print(f"dsamig {daemon['role']} (pid {daemon['pid']}, {daemon['state']}): "
                  f"{counts or 'no jobs'}; {format_bytes(daemon['rate-bytes-per-second'])}/s",
                  file=self.stream, flush=True)
            print(jobs_table(jobs), file=self.stream, flush=True)
            return EXIT_OK

    async def _show_job(self, client: ControlClient) -> int:
        redraw = self.watch and not self.as_json and self.stream.isatty()
        while True:
            job = await client.execute("query-job", {"id": self.job})
            if self.as_json:
                self.stream.write(json.dumps(job) + "\n")
            else:
                if redraw:
                    self.stream.write(CLEAR_SCREEN)
                self.stream.write(summary_table(job) + "\n")
                if self.watch and not redraw:
                    self.stream.write("\n")
            self.stream.flush()
            if not self.watch or job["status"] in FINISHED:
                return EXIT_OK
            await asyncio.sleep(self.interval_s)


@dataclass
class JobsCommand:
    """``dsamig jobs [--json]``: the short list."""

    socket: str
    as_json: bool = False

    def run(self) -> int:
        """Ask the daemon and print the answer; the exit code."""
        return _run(self._main)

    async def _main(self) -> int:
        async with await ControlClient.connect(self.socket) as client:
            jobs = await client.execute("job-list")
        print(json.dumps(jobs) if self.as_json else jobs_table(jobs), flush=True)
        return EXIT_OK


@dataclass
class StopCommand:
    """``dsamig stop JOB [--keep-partial]``: cancel a queued or running job.

    ``keep_partial`` (a receiver's job) keeps the partial file and its
    checkpoint, so that the job can be sent again with resume later.
    """

    socket: str
    job: str
    keep_partial: bool = False

    def run(self) -> int:
        """Ask the daemon and print the answer; the exit code."""
        return _run(self._main)

    async def _main(self) -> int:
        arguments: dict[str, Any] = {"id": self.job}
        if self.keep_partial:
            arguments["keep-partial"] = True
        async with await ControlClient.connect(self.socket) as client:
            job = await client.execute("job-cancel", arguments)
        kept = "; the partial file is kept for a resume" if self.keep_partial else ""
        print(f"{job['name']} ({job['id']}): {job['status']}{kept}", flush=True)
        return EXIT_OK
