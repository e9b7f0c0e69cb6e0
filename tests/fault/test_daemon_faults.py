"""Daemons facing bad configs, taken addresses, dead peers and impatient operators."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.integration.daemon_helpers import (
    Daemon,
    execute,
    job_document,
    ok,
    short_dir,
    wait_for,
    write_job,
)
from tests.integration.helpers import dsamig

MiB = 1024 * 1024


@pytest.fixture
def directory() -> Iterator[str]:
    with short_dir() as path:
        os.mkdir(os.path.join(path, "images"))
        yield path


def run_daemon(role: str, directory: str, config: dict) -> subprocess.CompletedProcess[str]:
    """A daemon that is expected to refuse to start."""
    path = os.path.join(directory, f"{role}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"control_socket": os.path.join(directory, f"{role}.sock"), **config}, f)
    return dsamig(role, "--config", path)


def test_bad_config_exits_2_naming_file_line_and_key(directory: str) -> None:
    path = os.path.join(directory, "receiver.yaml")
    with open(path, "w") as f:
        f.write("listen: 127.0.0.1:0\nstorage_dir: images\nlimits:\n  max_jobs: lots\n")
    result = dsamig("receiver", "--config", path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"dsamig: error: {path}:4: limits.max_jobs: must be an integer 1..4096, not 'lots'")
    assert not os.path.exists(os.path.join(directory, "receiver.sock"))
    with open(path, "w") as f:
        f.write("listen: 127.0.0.1:0\nstorage_dir: images\ncontrol_socket: r.sock\n")
    checked = dsamig("receiver", "--config", path, "--check")
    assert checked.returncode == 0 and "valid receiver configuration" in checked.stdout


@pytest.mark.parametrize(
    ("storage", "code", "words"),
    [("missing", 3, "does not exist"), ("link", 3, "is a symbolic link"),
     ("file", 3, "is not a directory")],
)
def test_bad_storage_dir(directory: str, storage: str, code: int, words: str) -> None:
    target = os.path.join(directory, storage)
    if storage == "link":
        os.symlink(os.path.join(directory, "images"), target)
    elif storage == "file":
        open(target, "w").close()
    result = run_daemon("receiver", directory, {"listen": "127.0.0.1:0", "storage_dir": target})
    assert result.returncode == code, result.stderr
    assert words in result.stderr


def test_taken_addresses_exit_4_and_leave_nothing_behind(directory: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        storage = os.path.join(directory, "images")
        data = run_daemon("receiver", directory,
                          {"listen": f"127.0.0.1:{port}", "storage_dir": storage})
        assert data.returncode == 4 and f"cannot listen on 127.0.0.1:{port}" in data.stderr
        metrics = run_daemon("sender", directory, {"metrics_listen": f"127.0.0.1:{port}",
                                                   "source_dirs": [directory]})
        assert metrics.returncode == 4 and "cannot listen for metrics" in metrics.stderr
    # The control socket bound before the metrics endpoint failed is gone again.
    assert not os.path.exists(os.path.join(directory, "sender.sock"))


def test_control_socket_of_a_running_daemon_is_not_stolen(directory: str) -> None:
    first = Daemon.start("sender", directory, {"source_dirs": [directory]})
    try:
        second = run_daemon("sender", directory, {"source_dirs": [directory]})
        assert second.returncode == 4
        assert "in use by another running daemon" in second.stderr
        assert ok(first.socket, "query-daemon")["pid"] == first.proc.pid
    finally:
        first.kill()  # SIGKILL: the socket file stays behind, stale
    assert os.path.exists(first.socket)
    # Replaces the stale file.
    again = Daemon.start("sender", directory, {"source_dirs": [directory]})
    try:
        assert ok(again.socket, "query-daemon")["pid"] == again.proc.pid
    finally:
        assert again.stop() == 0


def test_cli_errors_without_a_daemon(directory: str, image_factory) -> None:
    image, _, _ = image_factory(4096)
    job = write_job(directory, "lonely", image, 1)
    nobody = dsamig("start", job, "--socket", os.path.join(directory, "none.sock"))
    assert nobody.returncode == 4 and "no daemon is listening" in nobody.stderr
    bad = os.path.join(directory, "bad.yaml")
    with open(bad, "w") as f:
        f.write("name: ok\nsource: x\ndestination: {host: h}\nchannels: 0\n")
    invalid = dsamig("start", bad, "--socket", os.path.join(directory, "none.sock"))
    assert invalid.returncode == 2
    assert f"{bad}:4: channels: must be an integer 1..64 or auto, not 0" in invalid.stderr


def test_failed_jobs_do_not_stop_the_daemon(directory: str, image_factory) -> None:
    storage = os.path.join(directory, "images")
    receiver = Daemon.start("receiver", directory,
                            {"listen": "127.0.0.1:0", "storage_dir": storage})
    sender = Daemon.start("sender", directory, {"source_dirs": [os.path.dirname(
        image_factory(4096)[0])]})
    try:
        image, _, _ = image_factory(MiB, seed=3)
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            dead_port = unused.getsockname()[1]
        job = ok(sender.socket, "job-start", job_document("nowhere", image, dead_port))
        failed = sender.wait_job(job["id"])
        assert failed["status"] == "failed"
        assert failed["error-desc"].startswith(f"cannot connect to receiver 127.0.0.1:{dead_port}")

        missing = execute(sender.socket, "job-start", job_document(
            "ghost", os.path.join(os.path.dirname(image), "ghost.img"), receiver.port))
        assert missing["error"]["class"] == "InvalidArgument"
        assert "does not exist" in missing["error"]["desc"]
        outside = execute(sender.socket, "job-start",
                          job_document("outside", "/etc/hostname", receiver.port))
        assert "outside the sender's source_dirs" in outside["error"]["desc"]
        on_receiver = subprocess.run(
            [sys.executable, "-m", "dsamig", "start", write_job(directory, "x", image, 1),
             "--socket", receiver.socket], capture_output=True, text=True, timeout=60)
        assert on_receiver.returncode == 2
        assert "is the receiver daemon's socket" in on_receiver.stderr

        job = ok(sender.socket, "job-start", job_document("fine", image, receiver.port))
        assert sender.wait_job(job["id"])["status"] == "completed"
    finally:
        sender.kill()
        receiver.kill()


def test_second_sigint_skips_the_drain(directory: str, image_factory, tmp_path) -> None:
    storage = os.path.join(directory, "images")
    receiver = Daemon.start("receiver", directory,
                            {"listen": "127.0.0.1:0", "storage_dir": storage})
    sender = Daemon.start("sender", directory, {"shutdown_timeout": "60s",
                                                "source_dirs": [str(tmp_path)]})
    try:
        image, _, _ = image_factory(8 * MiB, seed=5, zero_every=0)
        job = ok(sender.socket, "job-start", job_document(
            "slow", image, receiver.port, max_bandwidth="2MiB"))
        sender.wait_job(job["id"], ("active",))
        sender.send_signal(signal.SIGINT)
        stopping = wait_for(lambda: (d := ok(sender.socket, "query-daemon"))["state"] ==
                            "stopping" and d, what="stopping")
        # Draining: the job still runs and the daemon still answers; it would
        # wait up to 60 s for it.
        assert stopping["running"] == 1
        assert sender.job(job["id"])["status"] == "active"
        began = time.monotonic()
        assert sender.stop(signal.SIGINT) == 0
        assert time.monotonic() - began < 5
        finished = [e for e in sender.log_events() if e.get("event") == "job finished"]
        assert finished[0]["status"] == "cancelled" and "forced" in finished[0]["reason"]
        assert receiver.wait_job(job["id"])["status"] == "cancelled"
        assert os.listdir(storage) == []
    finally:
        sender.kill()
        receiver.kill()


def test_start_wait_interrupted_cancels_the_job(directory: str, image_factory,
                                                tmp_path) -> None:
    storage = os.path.join(directory, "images")
    receiver = Daemon.start("receiver", directory,
                            {"listen": "127.0.0.1:0", "storage_dir": storage})
    sender = Daemon.start("sender", directory, {"source_dirs": [str(tmp_path)]})
    try:
        image, _, _ = image_factory(8 * MiB, seed=6, zero_every=0)
        job_file = write_job(directory, "watched", image, receiver.port, max_bandwidth="2MiB")
        waiting = subprocess.Popen(
            [sys.executable, "-m", "dsamig", "start", job_file, "--socket", sender.socket,
             "--wait", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # --json: stdout carries only the final JSON object, so find the job by name.
        job_id = wait_for(lambda: next((j["id"] for j in ok(sender.socket, "job-list")
                                        if j["name"] == "watched"), None), what="the job")
        sender.wait_job(job_id, ("active",))
        waiting.send_signal(signal.SIGTERM)  # what `systemctl stop dsamig-job@...` does
        out, err = waiting.communicate(timeout=30)
        assert waiting.returncode == 5, err
        assert "cancelling the job" in err
        assert json.loads(out)["status"] == "cancelled"  # one object, nothing else
        assert sender.job(job_id)["status"] == "cancelled"
        assert receiver.wait_job(job_id)["status"] == "cancelled"
    finally:
        sender.kill()
        receiver.kill()
