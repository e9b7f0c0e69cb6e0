"""Helpers for real transfers: in one process, or through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    """A ``dsamig receive`` subprocess: the one way the tests start one.

    It listens on ``port`` (0: any free port, which it reports; the tests
    never pick a port themselves and hand it over, so no other process can
    take it in between) and ``start`` returns once it listens.  ``before``
    holds what it printed on stderr before that (warnings).
    """

    proc: subprocess.Popen[str]
    port: int
    before: list[str] = field(default_factory=list)
    _rest: str = ""

    @classmethod
    def start(cls, output: str, *extra: str, port: int = 0, host: str = "127.0.0.1",
              log_level: str | None = None, env: dict[str, str] | None = None) -> Receiver:
        """Start ``dsamig [--log-level L] receive --listen HOST:PORT --output OUTPUT EXTRA...``
        (``env``: more environment variables)."""
        command = [sys.executable, "-m", "dsamig"]
        if log_level is not None:
            command += ["--log-level", log_level]
        proc = subprocess.Popen(
            [*command, "receive", "--listen", f"{host}:{port}", "--output", output, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        lines, rest = read_lines_until(proc, "dsamig: listening on ")
        if not lines or not lines[-1].startswith("dsamig: listening on "):
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"receiver did not start: {''.join(lines)}{rest}{err}")
        return cls(proc, int(lines[-1].rsplit(":", 1)[1]), [x.rstrip("\n") for x in lines[:-1]],
                   rest)

    def finish(self) -> tuple[int, str, str]:
        """Wait for it to exit (bounded): exit code, stdout, stderr after the listening line."""
        out, err = self.proc.communicate(timeout=TIMEOUT_S)
        return self.proc.returncode, out, self._rest + err

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM, then :meth:`finish`."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.finish()

    def kill(self) -> None:
        """SIGKILL whatever is still running, reap it and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def read_lines_until(proc: subprocess.Popen[str], prefix: str,
                     timeout_s: float = TIMEOUT_S) -> tuple[list[str], str]:
    """Read ``proc``'s stderr line by line until a line starts with ``prefix``,
    it ends, or ``timeout_s`` passes; the lines read (that one last) and
    whatever followed it in the same read."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout_s
    buffered = ""
    lines: list[str] = []
    while True:
        while "\n" in buffered:
            line, buffered = buffered.split("\n", 1)
            lines.append(line + "\n")
            if line.startswith(prefix):
                return lines, buffered
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return lines, buffered
        chunk = os.read(fd, 65536)
        if not chunk:
            return lines, buffered
        buffered += chunk.decode(errors="replace")


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the life of the block:
    bound by us and never listening, so nothing else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def last_json(text: str) -> dict[str, Any]:
    """The last line of ``text`` parsed as JSON."""
    return json.loads(text.strip().splitlines()[-1])
