"""The one-shot commands: ``dsamig send`` and ``dsamig receive``.

Each builds the layers below from its options, runs one loop and turns the
outcome into an exit code; argument parsing stays in ``dsamig.cli``.

A signal ends a one-shot command the way ``dsamig stop`` ends a daemon's
job: ``send`` cancels its job through :meth:`Sender.cancel` (the receiver is
told why and drops its partial file), ``receive`` cancels the jobs it runs.
SIGINT and SIGTERM exit with :data:`EXIT_INTERRUPTED`, SIGHUP with
:data:`EXIT_HANGUP`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from dsamig.dsa_config import DsaConfig
from dsamig.errors import DsamigError
from dsamig.native import impl
from dsamig.pages import PageSink, check_output
from dsamig.proto import ErrorCode, Hello
from dsamig.report import ProgressBar, print_json, summary_table
from dsamig.runtime import run_loop
from dsamig.security import SecurityConfig, is_loopback_host
from dsamig.settings import (
    DEFAULT_CHANNELS,
    DEFAULT_ENGINE,
    DEFAULT_PAGE_SIZE,
    EXIT_HANGUP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TRANSFER,
    RETRY_FOR_S,
    JobState,
    ReceiverLimits,
    Timeouts,
)
from dsamig.stats import JobStats
from dsamig.transport.common import parse_address
from dsamig.transport.pacing import TokenBucket
from dsamig.transport.receiver import JobFailedError, ReceiverJob, ReceiverServer
from dsamig.transport.sender import LiveOptions, Sender, SendOptions, send_image
from dsamig.units import rate_unit

#: How long a finished job's report waits for its channel threads to end.
THREADS_WAIT_S = 2.0
#: How long ``receive --once`` waits for a failed job's channels to deliver
#: its ERROR before it exits, and how often it looks.
LINGER_S = 2.0
LINGER_POLL_S = 0.02
#: The signals that end a one-shot command, with the exit code each gives.
STOP_SIGNALS = {signal.SIGINT: EXIT_INTERRUPTED, signal.SIGTERM: EXIT_INTERRUPTED,
                signal.SIGHUP: EXIT_HANGUP}


def say(message: str) -> None:
    """One ``dsamig: ...`` line on stderr."""
    print(f"dsamig: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """One ``dsamig: warning:`` line on stderr."""
    say(f"warning: {message}")


def check_security(security: SecurityConfig | None, role: str, host: str | None = None) -> None:
    """Load keys and certificates before anything starts (a sender's ``host``
    against the TLS name rules); print warnings."""
    if security is None:
        return
    for warning in security.check(role, host=host):
        warn(warning)


def report(stats: JobStats, as_json: bool) -> None:
    """Print a finished job's stats: JSON on stdout, or a table for people."""
    if as_json:
        print_json(stats)
    else:
        print(summary_table(stats), flush=True)


async def linger(server: ReceiverServer, bound_s: float = LINGER_S) -> None:
    """Wait (bounded) until the channels of finished jobs are closed.

    A failed job's channels send ERROR and half-close; closing them at once,
    with the sender's bytes still unread, would make the kernel answer with
    a reset that can destroy the ERROR before the sender reads it.
    """
    deadline = asyncio.get_running_loop().time() + bound_s
    while server.channels and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(LINGER_POLL_S)


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route :data:`STOP_SIGNALS` to ``on_signal(signum)`` on the running loop,
    and back to their previous handlers afterwards."""
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def default_job_name(image: str) -> str:
    """The image's file name, the name a receiver daemon stores it under
    (empty when it cannot travel in a HELLO: not UTF-8)."""
    name = os.path.basename(os.path.abspath(image))
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return name


@dataclass
class SendCommand:
    """``dsamig send IMAGE --to HOST:PORT ...``.

    Without ``name`` the job is named after the image's file name, which is
    the name a receiver daemon stores it under.
    """

    image: str
    to: str
    channels: int = DEFAULT_CHANNELS
    packet_size: int | None = None  # None: the default for the job's kind
    page_size: int = DEFAULT_PAGE_SIZE
    engine: str = DEFAULT_ENGINE
    engine_threads: int | None = None
    dsa: DsaConfig | None = None
    name: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    resume: bool = False
    refresh: bool = False
    retry_for_s: float = RETRY_FOR_S
    max_bandwidth: float | None = None  # bytes per second
    security: SecurityConfig | None = None
    as_json: bool = False
    live: LiveOptions | None = None

    def options(self) -> SendOptions:
        """The transport's options for this job (ConfigError if they are bad)."""
        host, port = parse_address(self.to)
        options = SendOptions(
            host=host, port=port, channels=self.channels, packet_size=self.packet_size,
            page_size=self.page_size, engine=self.engine, engine_threads=self.engine_threads,
            dsa=self.dsa, name=self.name or default_job_name(self.image), resume=self.resume,
            refresh=self.refresh, retry_for_s=self.retry_for_s, timeouts=self.timeouts,
            pacer=TokenBucket(self.max_bandwidth) if self.max_bandwidth else None,
            security=self.security, live=self.live,
        )
        options.validate()
        return options

    def run(self) -> int:
        """Send the image; the exit code."""
        options = self.options()
        impl.set_thread_name("dsamig-send")
        check_security(options.security, "sender", options.host)
        return run_loop(self._main(options))

    async def _main(self, options: SendOptions) -> int:
        bar: ProgressBar | None = None
        sender: Sender | None = None
        stopped: list[int] = []

        def started(job: Sender) -> None:
            nonlocal bar, sender
            sender = job
            if not self.as_json:
                bar = ProgressBar(job.stats, unit=rate_unit(self.max_bandwidth),
                                  cap=self.max_bandwidth)
                bar.start()

        def on_signal(signum: int) -> None:
            if stopped:
                return
            stopped.append(STOP_SIGNALS[signal.Signals(signum)])
            reason = f"interrupted ({signal.Signals(signum).name}) on the sending host"
            if sender is not None:
                sender.cancel(reason)  # the one cancel path: the receiver is told why
            else:
                task.cancel()

        task = asyncio.ensure_future(send_image(self.image, options, on_start=started))
        stats: JobStats | None = None
        with stop_signals(on_signal):
            try:
                stats = await task
            except asyncio.CancelledError:
                if not stopped:
                    raise
                stats = sender.stats if sender is not None else None
            except DsamigError as exc:
                failed: JobStats | None = getattr(exc, "stats", None)
                if failed is not None and self.as_json:
                    print_json(failed)
                raise
            finally:
                if bar is not None:
                    bar.stop()
        if stopped:
            if stats is not None:
                report(stats, self.as_json)
            say("interrupted: the job was cancelled")
            return stopped[0]
        assert stats is not None
        report(stats, self.as_json)
        return EXIT_OK


@dataclass
class ReceiveCommand:
    """``dsamig receive --listen HOST:PORT --output PATH [--once] [--force]``.

    An existing ``PATH`` is never replaced without ``force``: not at start,
    and not by a later job while the command runs.
    """

    listen: str
    output: str
    once: bool = False
    force: bool = False
    as_json: bool = False
    timeouts: Timeouts | None = None
    security: SecurityConfig | None = None
    _bars: dict[ReceiverJob, ProgressBar] = field(default_factory=dict, init=False, repr=False)

    def run(self) -> int:
        """Listen and receive; the exit code."""
        host, port = parse_address(self.listen)
        check_output(self.output, replace=self.force)
        impl.set_thread_name("dsamig-recv")
        check_security(self.security, "receiver")
        if not (self.security is not None and self.security.authenticates) and not \
                is_loopback_host(host):
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            warn(f"listening on {shown} without authenticating senders: "
                 f"anyone who can reach it can send an image to {self.output!r} (give "
                 "--psk-file, or --tls-cert and --tls-key with --tls-ca)")
        return run_loop(self._main(host, port))

    def _sink(self, hello: Hello) -> PageSink:
        assert hello.manifest is not None
        try:
            check_output(self.output, replace=self.force)
        except DsamigError as exc:
            # The sender reads this as "refused: ..."; nothing was touched.
            raise JobFailedError(str(exc), ErrorCode.REJECTED) from None
        return PageSink(self.output, hello.manifest.image_size)

    def _started(self, job: ReceiverJob) -> None:
        if not self.as_json:
            bar = ProgressBar(job.stats)
            self._bars[job] = bar
            bar.start()

    def _stop_bar(self, job: ReceiverJob) -> None:
        bar = self._bars.pop(job, None)
        if bar is not None:
            bar.stop()

    async def _main(self, host: str, port: int) -> int:
        finished: asyncio.Queue[ReceiverJob] = asyncio.Queue()
        stopped: asyncio.Queue[int] = asyncio.Queue()
        server = ReceiverServer(
            host, port, self._sink, timeouts=self.timeouts, limits=ReceiverLimits(max_jobs=1),
            on_job_started=self._started, on_job_finished=finished.put_nowait,
            security=self.security, on_refused=lambda message: say(f"error: {message}"),
        )
        bound = await server.start()
        say(f"listening on {bound[0]}:{bound[1]}")
        exit_code = EXIT_OK
        with stop_signals(lambda signum: stopped.put_nowait(STOP_SIGNALS[signal.Signals(signum)])):
            try:
                while True:
                    getter = asyncio.ensure_future(finished.get())
                    stopper = asyncio.ensure_future(stopped.get())
                    await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if stopper.done():
                        getter.cancel()
                        for job in list(self._bars):
                            self._stop_bar(job)
                        await server.close("receiver interrupted")
                        say("interrupted: running jobs were cancelled")
                        return stopper.result()
                    stopper.cancel()
                    job = getter.result()
                    self._stop_bar(job)
                    if job.superseded:
                        continue  # a restarted sender took its partial file over
                    # Its channel threads end as their connections close: wait
                    # for them, so that the figures carry their CPU time.
                    await job.threads_ended(THREADS_WAIT_S)
                    exit_code = self._report(job)
                    if self.once:
                        await linger(server)
                        return exit_code
            finally:
                for job in list(self._bars):
                    self._stop_bar(job)
                await server.close()

    def _report(self, job: ReceiverJob) -> int:
        """Print a finished job; its exit code."""
        stats = job.stats
        completed = stats.status == JobState.COMPLETED
        if completed:
            stats.extra["path"] = job.sink.path
        report(stats, self.as_json)
        if completed:
            if not self.as_json:
                print(f"received {job.name or 'the image'} into {job.sink.path}", flush=True)
            return EXIT_OK
        if stats.error:
            say(f"error: {stats.error}")
        return EXIT_TRANSFER
