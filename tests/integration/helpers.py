"""Helpers for real transfers: in one process, or through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dsamig.pages import PageSink, PageSource
from dsamig.proto import Hello
from dsamig.stats import JobStats
from dsamig.transport.common import Timeouts
from dsamig.transport.receiver import ReceiverJob, ReceiverServer
from dsamig.transport.sender import Sender, SendOptions

TIMEOUT_S = 60


async def transfer_in_process(
    image: str, output: str, during: Callable[[ReceiverServer], Awaitable[None]] | None = None,
    receiver: dict[str, Any] | None = None, **options: Any,
) -> tuple[JobStats, JobStats]:
    """Send ``image`` to a receiver in the same loop; return (sender, receiver) stats.

    ``during(server)``, if given, runs beside the transfer: fault tests use
    it to break channels or corrupt packets mid-way. ``receiver`` holds more
    ReceiverServer arguments (``native``, ``receive_path``); ``options`` are
    the SendOptions.
    """
    finished: asyncio.Future[ReceiverJob] = asyncio.get_running_loop().create_future()

    def sink(hello: Hello) -> PageSink:
        assert hello.manifest is not None
        return PageSink(output, hello.manifest.image_size)

    server = ReceiverServer(
        "127.0.0.1", 0, sink, timeouts=Timeouts(idle_s=20),
        on_job_finished=lambda job: finished.done() or finished.set_result(job),
        **(receiver or {}),
    )
    _, port = await server.start()
    source = PageSource(image)
    try:
        sender = Sender(source, SendOptions(host="127.0.0.1", port=port, **options))
        run = asyncio.ensure_future(sender.run())
        side = asyncio.ensure_future(during(server)) if during is not None else None
        sent = await asyncio.wait_for(run, TIMEOUT_S)
        if side is not None:
            await asyncio.wait_for(side, TIMEOUT_S)
        job = await asyncio.wait_for(finished, TIMEOUT_S)
    finally:
        source.close()
        await server.close()
    return sent, job.stats


def dsamig(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a subprocess and wait for it (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "dsamig", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs,
    )


@dataclass
class Receiver:
    """A ``dsamig receive`` subprocess listening on a free loopback port."""

    proc: subprocess.Popen[str]
    port: int

    @classmethod
    def start(cls, output: str, *extra: str) -> Receiver:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsamig", "receive", "--listen", "127.0.0.1:0",
             "--output", output, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if "listening on" not in line:
            proc.kill()
            raise AssertionError(f"receiver did not start: {line}{proc.stderr.read()}")
        return cls(proc, int(line.rsplit(":", 1)[1]))

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=TIMEOUT_S)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` parsed as JSON."""
    return json.loads(text.strip().splitlines()[-1])
