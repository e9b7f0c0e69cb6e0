"""Daemons as real subprocesses, and a blocking control client for fixtures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 20.0


@contextmanager
def short_dir() -> Iterator[str]:
    """A directory with a short path: a Unix socket path must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="dsm", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def execute(path: str, command: str, arguments: dict[str, Any] | None = None,
            timeout_s: float = 10.0) -> dict[str, Any]:
    """One request on a fresh connection; the whole reply (``return`` or ``error``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        reader = sock.makefile("rb")
        json.loads(reader.readline())  # greeting
        request: dict[str, Any] = {"execute": command, "id": 1}
        if arguments is not None:
            request["arguments"] = arguments
        sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = json.loads(reader.readline())
            if "event" not in message:
                return message


def ok(path: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """The ``return`` of a command that must succeed."""
    reply = execute(path, command, arguments)
    assert "return" in reply, reply
    return reply["return"]


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.02,
             what: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Daemon:
    """A ``dsamig receiver`` or ``dsamig sender`` subprocess with its config and log."""

    role: str
    proc: subprocess.Popen[bytes]
    config_path: str
    socket: str
    log_path: str
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, role: str, directory: str, config: dict[str, Any],
              env: dict[str, str] | None = None, wait: bool = True) -> Daemon:
        """Write ``config`` (``control_socket`` defaults to ``<directory>/<role>.sock``),
        start the daemon and, with ``wait``, return once its control socket answers."""
        config = {"control_socket": os.path.join(directory, f"{role}.sock"), **config}
        if role == "sender":
            # A sender must list where jobs may send from; the tests' images
            # live in pytest's temporary directories.
            config = {"source_dirs": [tempfile.gettempdir()], **config}
        config_path = os.path.join(directory, f"{role}.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f)
        log_path = os.path.join(directory, f"{role}.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "dsamig", role, "--config", config_path],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        daemon = cls(role, proc, config_path, config["control_socket"], log_path)
        if wait:
            daemon.wait_ready()
        return daemon

    def wait_ready(self) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.role} exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.info = ok(self.socket, "query-daemon")
            except OSError:
                return False
            return True

        wait_for(answers, START_TIMEOUT_S, 0.05, f"{self.role} control socket")

    @property
    def port(self) -> int:
        """The receiver's data port (it listens on port 0: any free one)."""
        return int(self.info["listen"].rsplit(":", 1)[1])

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def job(self, ref: str) -> dict[str, Any]:
        return ok(self.socket, "query-job", {"id": ref})

    def wait_job(self, ref: str, states: tuple[str, ...] = ("completed", "failed", "cancelled"),
                 timeout_s: float = 30.0) -> dict[str, Any]:
        """Poll until job ``ref`` is in one of ``states``; its dict."""
        def reached() -> dict[str, Any] | None:
            reply = execute(self.socket, "query-job", {"id": ref})
            job = reply.get("return")
            return job if job and job["status"] in states else None

        return wait_for(reached, timeout_s, 0.02, f"job {ref} in {states}")

    def send_signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM,
             timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Signal and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.role} ignored {sig.name}:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def job_document(name: str, source: str, port: int, **extra: Any) -> dict[str, Any]:
    """A job-start document for a receiver on 127.0.0.1:``port``."""
    return {"name": name, "source": source,
            "destination": {"host": "127.0.0.1", "port": port}, **extra}


def write_job(directory: str, name: str, source: str, port: int, **extra: Any) -> str:
    """A job file; returns its path."""
    path = os.path.join(directory, f"{name}.job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job_document(name, source, port, **extra), f)
    return path


class EventStream:
    """A subscribed control connection, read synchronously."""

    def __init__(self, path: str, timeout_s: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        json.loads(self.reader.readline())  # greeting
        self.sock.sendall(b'{"execute": "subscribe"}\n')
        reply = json.loads(self.reader.readline())
        assert "return" in reply, reply

    def next(self) -> dict[str, Any]:
        while True:
            message = json.loads(self.reader.readline())
            if "event" in message:
                return message

    def job_states(self, ids: set[str]) -> list[tuple[str, str]]:
        """(id, status) of ``ids``'s changes, until every one of them finished."""
        seen: list[tuple[str, str]] = []
        ended: set[str] = set()
        while ended != ids:
            event = self.next()
            data = event["data"]
            if event["event"] == "JOB_STATUS_CHANGE" and data["id"] in ids:
                seen.append((data["id"], data["status"]))
                if data["status"] in ("completed", "failed", "cancelled"):
                    ended.add(data["id"])
        return seen

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
