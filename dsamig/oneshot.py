"""The one-shot commands: ``dsamig send`` and ``dsamig receive``.

Each builds the layers below from its options, runs one loop and turns the
outcome into an exit code; argument parsing stays in ``dsamig.cli``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import uvloop

from dsamig.errors import EXIT_OK, EXIT_TRANSFER, DsamigError, SinkError
from dsamig.logs import loop_exception_handler
from dsamig.native import impl
from dsamig.pages import PageSink
from dsamig.proto import Hello
from dsamig.report import ProgressBar, print_json, summary_table
from dsamig.settings import ReceiverLimits
from dsamig.stats import JobStats
from dsamig.transport.common import Timeouts, parse_address
from dsamig.transport.receiver import ReceiverJob, ReceiverServer
from dsamig.transport.security import SecurityConfig, is_loopback_host
from dsamig.transport.sender import Sender, SendOptions, send_image
from dsamig.units import rate_unit

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh uvloop event loop.

    Everything allocated so far (modules, classes) goes to the permanent GC
    generation: the transfer makes many short-lived objects per packet and
    none of them form cycles, so full collections would only rescan imports.
    What the loop reports goes through the logger (one event, no traceback).
    """
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.get_loop().set_exception_handler(loop_exception_handler)
        return runner.run(coro)


def warn(message: str) -> None:
    """One ``dsamig: warning:`` line on stderr."""
    print(f"dsamig: warning: {message}", file=sys.stderr, flush=True)


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


@dataclass
class SendCommand:
    """``dsamig send IMAGE --to HOST:PORT ...``."""

    image: str
    options: SendOptions
    as_json: bool = False

    def run(self) -> int:
        impl.set_thread_name("dsamig-send")
        check_security(self.options.security, "sender", self.options.host)
        return run_loop(self._main())

    async def _main(self) -> int:
        try:
            stats = await self._send()
        except DsamigError as exc:
            failed: JobStats | None = getattr(exc, "stats", None)
            if failed is not None and self.as_json:
                print_json(failed)
            raise
        report(stats, self.as_json)
        return EXIT_OK

    async def _send(self) -> JobStats:
        bar: ProgressBar | None = None

        def show_progress(sender: Sender) -> None:
            nonlocal bar
            cap = getattr(self.options.pacer, "rate", None)
            bar = ProgressBar(sender.stats, unit=rate_unit(cap), cap=cap)
            bar.start()

        try:
            return await send_image(
                self.image, self.options, on_start=None if self.as_json else show_progress
            )
        finally:
            if bar is not None:
                bar.stop()


@dataclass
class ReceiveCommand:
    """``dsamig receive --listen HOST:PORT --output PATH [--once]``."""

    listen: str
    output: str
    once: bool = False
    as_json: bool = False
    timeouts: Timeouts | None = None
    security: SecurityConfig | None = None

    def run(self) -> int:
        impl.set_thread_name("dsamig-recv")
        check_security(self.security, "receiver")
        host, port = parse_address(self.listen)
        if not (self.security is not None and self.security.authenticates) and not \
                is_loopback_host(host):
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            warn(f"listening on {shown} without authenticating senders: "
                 f"anyone who can reach it can send an image to {self.output!r} (give "
                 "--psk-file, or --tls-cert and --tls-key with --tls-ca)")
        return run_loop(self._main())

    def _sink(self, hello: Hello) -> PageSink:
        assert hello.manifest is not None
        return PageSink(self.output, hello.manifest.image_size)

    async def _main(self) -> int:
        host, port = parse_address(self.listen)
        output_dir = os.path.dirname(os.path.abspath(self.output))
        if not os.path.isdir(output_dir):
            raise SinkError(f"output directory {output_dir!r} does not exist")
        if os.path.isdir(self.output):
            raise SinkError(f"output {self.output!r} is a directory")
        finished: asyncio.Queue[ReceiverJob] = asyncio.Queue()
        server = ReceiverServer(
            host, port, self._sink, timeouts=self.timeouts, limits=ReceiverLimits(max_jobs=1),
            on_job_finished=finished.put_nowait, security=self.security,
            on_refused=lambda message: print(f"dsamig: error: {message}", file=sys.stderr,
                                             flush=True),
        )
        bound = await server.start()
        print(f"dsamig: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        exit_code = EXIT_OK
        try:
            while True:
                getter = asyncio.ensure_future(finished.get())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
                    await server.close("receiver interrupted")
                    return 130
                job = getter.result()
                if job.superseded:
                    continue  # a restarted sender took its partial file over
                report(job.stats, self.as_json)
                if job.stats.error:
                    print(f"dsamig: error: {job.stats.error}", file=sys.stderr, flush=True)
                exit_code = EXIT_OK if job.stats.status == "completed" else EXIT_TRANSFER
                if self.once:
                    return exit_code
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await server.close()
