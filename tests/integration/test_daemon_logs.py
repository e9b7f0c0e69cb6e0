"""What the daemons log, read from real subprocesses: JSON lines only, even when
capped jobs are cancelled; the lifecycle lines once each; priorities for the
journal; a reload's changed keys."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.integration.daemon_helpers import (
    Daemon,
    execute,
    job_document,
    ok,
    short_dir,
    wait_for,
)
from tests.integration.helpers import dsamig

MiB = 1024 * 1024


def json_lines(daemon: Daemon) -> list[dict[str, Any]]:
    """Every line of the daemon's output, each of which must be one JSON object."""
    events = []
    for number, line in enumerate(daemon.log().splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"{daemon.role} log line {number} is not JSON: {line!r}\n"
                                 f"{daemon.log()}") from None
        assert isinstance(event, dict) and "event" in event and "level" in event, line
        events.append(event)
    return events


def moving(daemon: Daemon, job_id: str) -> bool:
    job = execute(daemon.socket, "query-job", {"id": job_id}).get("return")
    return bool(job) and job["status"] == "active" and 0 < job["remaining"] < job["total"]


@pytest.fixture
def directory() -> Iterator[str]:
    with short_dir() as path:
        os.mkdir(os.path.join(path, "images"))
        yield path


def start_pair(directory: str, **sender_config: Any) -> tuple[Daemon, Daemon]:
    receiver = Daemon.start("receiver", directory, {
        "listen": "127.0.0.1:0", "storage_dir": os.path.join(directory, "images"),
        "log_level": "debug"})
    try:
        sender = Daemon.start("sender", directory, {"log_level": "debug", **sender_config})
    except BaseException:
        receiver.kill()
        raise
    return receiver, sender


def test_cancelling_capped_jobs_logs_json_only(directory: str, image_factory) -> None:
    """`dsamig stop`, SIGTERM and a double SIGINT while capped jobs wait in the
    pacer: every line both daemons write is JSON, at debug level too."""
    image, _, _ = image_factory(8 * MiB, seed=50, zero_every=0)
    receiver, sender = start_pair(directory, shutdown_timeout="60s")
    try:
        # dsamig stop
        job = ok(sender.socket, "job-start", job_document(
            "stopped", image, receiver.port, max_bandwidth="2MiB/s"))
        wait_for(lambda: moving(sender, job["id"]), what="progress")
        stopped = dsamig("stop", "stopped", "--socket", sender.socket)
        assert stopped.returncode == 0, stopped.stderr
        assert sender.wait_job(job["id"])["status"] == "cancelled"
        assert receiver.wait_job(job["id"])["status"] == "cancelled"

        # a double SIGINT: the first waits for the job (up to 60 s), the second does not
        job = ok(sender.socket, "job-start", job_document(
            "interrupted", image, receiver.port, max_bandwidth="16Mbit/s"))
        wait_for(lambda: moving(sender, job["id"]), what="progress")
        sender.send_signal(signal.SIGINT)
        wait_for(lambda: ok(sender.socket, "query-daemon")["state"] == "stopping",
                 what="stopping")
        assert sender.stop(signal.SIGINT) == 0
        assert receiver.wait_job(job["id"])["status"] == "cancelled"
        first = sender
        json_lines(first)

        # SIGTERM with a job running and a short drain
        sender = Daemon.start("sender", directory, {"log_level": "debug",
                                                    "shutdown_timeout": "200ms"})
        job = ok(sender.socket, "job-start", job_document(
            "terminated", image, receiver.port, max_bandwidth="2MiB"))
        wait_for(lambda: moving(sender, job["id"]), what="progress")
        assert sender.stop(signal.SIGTERM) == 0
        assert receiver.wait_job(job["id"])["status"] == "cancelled"
        assert receiver.stop(signal.SIGTERM) == 0
    finally:
        sender.kill()
        receiver.kill()
    for daemon in (first, sender, receiver):
        events = json_lines(daemon)
        assert not [e for e in events if "Traceback" in json.dumps(e)], daemon.log()
        assert not [e for e in events if e["level"] in ("error", "critical")], daemon.log()
        finished = [e for e in events if e["event"] == "job finished"]
        assert finished and all(e["status"] == "cancelled" for e in finished)
        # A cancel is not a failure: info, with a reason rather than an error.
        assert all(e["level"] == "info" and "reason" in e and "error" not in e
                   for e in finished), finished


def test_each_lifecycle_line_once_and_short(directory: str, image_factory) -> None:
    """submitted, queued (with the reason), started, finished: once each, at info."""
    image, zero, normal = image_factory(2 * MiB, seed=51)
    receiver, sender = start_pair(directory, limits={"max_jobs": 1})
    try:
        events = []
        first = ok(sender.socket, "job-start", job_document(
            "first", image, receiver.port, max_bandwidth="4MiB"))
        second = ok(sender.socket, "job-start", job_document("second", image, receiver.port))
        for job in (first, second):
            assert sender.wait_job(job["id"])["status"] == "completed"
        wait_for(lambda: sum(e.get("event") == "job finished"
                             for e in receiver.log_events()) == 2, what="receiver lines")
        assert sender.stop() == 0 and receiver.stop() == 0
    finally:
        sender.kill()
        receiver.kill()
    events = json_lines(sender)
    for job, expected in ((first, ["job submitted", "job started", "job finished"]),
                          (second, ["job submitted", "job queued", "job started",
                                    "job finished"])):
        lines = [e for e in events if e.get("job") == job["id"] and e["level"] != "debug"]
        assert [e["event"] for e in lines
                if e["event"] in ("job submitted", "job queued", "job started",
                                  "job finished")] == expected
        assert all(e["level"] == "info" for e in lines), lines
        finished = lines[-1]
        assert finished["status"] == "completed" and finished["name"] == job["name"]
        assert (finished["zero_pages"], finished["normal_pages"]) == (zero, normal)
        assert finished["image_bytes"] == 2 * MiB and finished["engine"]
        assert len(json.dumps(finished)) < 500
    queued = next(e for e in events if e["event"] == "job queued")
    assert queued["reason"] == "max_jobs 1 jobs are running"
    # The transport's own end-of-job lines are restated by "job finished": debug only.
    for daemon_events in (events, json_lines(receiver)):
        ends = Counter(e["event"] for e in daemon_events if e["level"] != "debug")
        assert ends["job finished"] == 2
        assert ends["job completed"] == ends["job failed"] == 0
    receiver_started = Counter(e.get("job") for e in json_lines(receiver)
                               if e["event"] == "job started")
    assert receiver_started == {first["id"]: 1, second["id"]: 1}


def test_journal_lines_carry_syslog_priorities(directory: str, image_factory) -> None:
    """With stderr on the journal ($JOURNAL_STREAM names it), each line starts with
    <priority>, which journald strips: the rest is the same JSON object."""
    log_path = os.path.join(directory, "journal.log")
    config_path = os.path.join(directory, "sender.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump({"control_socket": os.path.join(directory, "s.sock"),
                        "source_dirs": [tempfile.gettempdir()],
                        "log_level": "info", "limits": {"max_jobs": 1}}, f)
    with open(log_path, "wb") as log:
        st = os.fstat(log.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsamig", "sender", "--config", config_path],
            stdout=log, stderr=log,
            env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
    daemon = Daemon("sender", proc, config_path, os.path.join(directory, "s.sock"), log_path)
    try:
        daemon.wait_ready()
        refused = execute(daemon.socket, "job-start", job_document(
            "missing", os.path.join(directory, "no-such-image"), 1))
        assert "error" in refused
        image, _, _ = image_factory(MiB, seed=52)
        # Nobody listens on this port: the job fails, which is a warning.
        failed = ok(daemon.socket, "job-start", job_document(
            "unreachable", image, 1, retry_for=0, timeouts={"connect": "1s"}))
        assert daemon.wait_job(failed["id"])["status"] == "failed"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    priorities = {"debug": 7, "info": 6, "warning": 4, "error": 3}
    seen = set()
    for line in daemon.log().splitlines():
        match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert match, f"no priority prefix: {line!r}"
        event = json.loads(match.group(2))
        assert int(match.group(1)) == priorities[event["level"]], line
        seen.add((event["event"], event["level"]))
    assert ("daemon ready", "info") in seen
    assert ("job finished", "warning") in seen


def test_reload_logs_each_changed_key(directory: str) -> None:
    sender = Daemon.start("sender", directory, {"log_level": "info",
                                                "limits": {"max_jobs": 3,
                                                           "max_bandwidth": "1Gbit"}})
    try:
        with open(sender.config_path) as f:
            config = yaml.safe_load(f)
        config["limits"] = {"max_jobs": 2, "max_bandwidth": "800Mbit/s"}
        config["control_socket"] = os.path.join(directory, "moved.sock")
        with open(sender.config_path, "w") as f:
            yaml.safe_dump(config, f)
        sender.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "configuration reloaded"
                             for e in sender.log_events()), what="reload")
        assert sender.stop() == 0
    finally:
        sender.kill()
    changes = {e["key"]: e for e in json_lines(sender) if e["event"] == "setting changed"}
    assert set(changes) == {"limits.max_jobs", "limits.max_bandwidth", "control_socket"}
    assert (changes["limits.max_jobs"]["old"], changes["limits.max_jobs"]["new"]) == (3, 2)
    assert (changes["limits.max_bandwidth"]["old"],
            changes["limits.max_bandwidth"]["new"]) == (125e6, 100e6)
    assert changes["limits.max_jobs"]["applied"] is True
    socket_change = changes["control_socket"]
    assert socket_change["applied"] is False
    assert socket_change["new"] == os.path.join(directory, "moved.sock")
