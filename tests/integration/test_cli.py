"""The CLI through subprocesses: send, receive, demo, --json output."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time

import pytest

from dsamig.settings import EXIT_HANGUP, EXIT_INTERRUPTED, EXIT_LOCAL_IO, EXIT_TRANSFER
from tests.conftest import read_bytes
from tests.integration.daemon_helpers import Daemon, job_document, ok, short_dir
from tests.integration.helpers import TIMEOUT_S, Receiver, dsamig, last_json


def test_send_receive_json(tmp_path, image_factory) -> None:
    image, zero, normal = image_factory(3 * 1024 * 1024 + 100, seed=2)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", "--json")
    try:
        sent = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "3",
                      "--json")
        code, out, err = receiver.finish()
    finally:
        receiver.kill()
    assert sent.returncode == 0, sent.stderr
    assert code == 0, err
    assert read_bytes(output) == read_bytes(image)
    for stats in (last_json(sent.stdout), last_json(out)):
        assert stats["status"] == "completed"
        assert stats["duplicate"] == zero and stats["normal"] == normal
        assert stats["channels"] == 3 and len(stats["channel-stats"]) == 3
        assert stats["total"] == os.path.getsize(image)
    sender_stats = last_json(sent.stdout)
    assert sender_stats["engine"]["backend"] == "cpu"
    assert "dsamig-send" in sender_stats["thread-cpu-s"]
    assert "dsamig-cpu-0" in sender_stats["thread-cpu-s"]
    assert "dsamig-recv" in last_json(out)["thread-cpu-s"]


def test_send_engine_none_and_packet_size(tmp_path, image_factory) -> None:
    image, zero, normal = image_factory(1024 * 1024, seed=4)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", "--json")
    try:
        sent = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--engine", "none",
                      "--packet-size", "64KiB", "--json")
        code, out, _ = receiver.finish()
    finally:
        receiver.kill()
    assert sent.returncode == 0 and code == 0
    assert last_json(out)["normal"] == zero + normal
    assert last_json(sent.stdout)["engine"]["backend"] == "none"
    assert read_bytes(output) == read_bytes(image)


def test_human_summary(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(512 * 1024, seed=6)
    receiver = Receiver.start(str(tmp_path / "d"), "--once")
    try:
        sent = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}")
        code, out, _ = receiver.finish()
    finally:
        receiver.kill()
    assert sent.returncode == 0 and code == 0
    assert "dsamig sender" in sent.stdout and "zero pages" in sent.stdout
    assert "dsamig receiver" in out and "completed" in out


def test_demo_runs_with_no_arguments_needed() -> None:
    result = dsamig("demo", "--size", "16MiB", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # one document, nothing else
    assert summary["identical"] is True
    assert summary["receiver"]["status"] == "completed"
    assert summary["sender"]["status"] == "completed"
    assert summary["sender"]["normal"] == summary["receiver"]["normal"] == summary[
        "normal-pages"]
    assert summary["image"] is None  # nothing kept without --workdir


def test_demo_workdir_keeps_the_image(tmp_path) -> None:
    workdir = tmp_path / "demo"
    result = dsamig("demo", "--size", "4MiB", "--workdir", str(workdir), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    image, copy = workdir / "dsamig-demo.img", workdir / "dsamig-demo.received.img"
    assert (summary["image"], summary["copy"]) == (str(image), str(copy))
    assert image.read_bytes() == copy.read_bytes() and image.stat().st_size == 4 * 1024 * 1024
    again = dsamig("demo", "--size", "1MiB", "--workdir", str(workdir))
    assert again.returncode == 0, again.stderr
    assert f"kept: {image}" in again.stdout and image.stat().st_size == 1024 * 1024
    # Only the demo's own files are replaced, and only files.
    blocked = tmp_path / "blocked"
    (blocked / "dsamig-demo.img").mkdir(parents=True)
    refused = dsamig("demo", "--size", "1MiB", "--workdir", str(blocked))
    assert refused.returncode == 3 and "cannot replace" in refused.stderr
    assert (blocked / "dsamig-demo.img").is_dir()


def test_make_image(tmp_path) -> None:
    path = tmp_path / "guest.ram"
    made = dsamig("make-image", str(path), "--size", "8MiB", "--zero-ratio", "0.75",
                  "--seed", "3", "--json")
    assert made.returncode == 0, made.stderr
    figures = json.loads(made.stdout)
    assert figures["zero-pages"] + figures["normal-pages"] == 2048
    assert 0.6 < figures["zero-pages"] / 2048 < 0.9
    data = path.read_bytes()
    zero_pages = sum(1 for i in range(0, len(data), 4096) if not any(data[i:i + 4096]))
    assert zero_pages == figures["zero-pages"]
    # The same seed gives the same image; an existing file is kept unless --force.
    kept = dsamig("make-image", str(path), "--size", "8MiB", "--seed", "4")
    assert kept.returncode == 3 and "already exists (--force replaces it)" in kept.stderr
    assert path.read_bytes() == data
    other = tmp_path / "again.ram"
    assert dsamig("make-image", str(other), "--size", "8MiB", "--zero-ratio", "0.75",
                  "--seed", "3").returncode == 0
    assert other.read_bytes() == data
    none = dsamig("make-image", str(path), "--size", "1MiB", "--zero-ratio", "0", "--force",
                  "--json")
    assert json.loads(none.stdout)["zero-pages"] == 0
    bad = dsamig("make-image", str(path), "--zero-ratio", "1.5")
    assert bad.returncode == 2 and "not between 0 and 1" in bad.stderr


def test_version_and_help() -> None:
    assert dsamig("--version").stdout.startswith("dsamig ")
    helped = dsamig("send", "--help")
    assert helped.returncode == 0 and "--channels" in helped.stdout


def test_ambiguous_bandwidth_is_refused_with_both_readings(tmp_path) -> None:
    refused = dsamig("send", str(tmp_path / "x"), "--to", "127.0.0.1:1", "--max-bandwidth",
                     "100mb")
    assert refused.returncode == 2
    assert "is ambiguous" in refused.stderr
    assert "100Mbit/s for 100 megabits per second, or 100MB/s" in refused.stderr


def test_progress_bar_on_a_terminal(tmp_path, image_factory) -> None:
    """On a terminal, send draws a progress bar (bytes, rate, ETA) and a table."""
    import pty
    import subprocess
    import sys

    image, _, _ = image_factory(6 * 1024 * 1024, seed=8, zero_every=0)
    receiver = Receiver.start(str(tmp_path / "d"), "--once")
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsamig", "send", image, "--to",
             f"127.0.0.1:{receiver.port}", "--max-bandwidth", "64Mbit/s"],
            stdout=terminal, stderr=terminal, close_fds=True,
        )
        os.close(terminal)
        seen = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=60) == 0
        receiver.finish()
    finally:
        os.close(controller)
        receiver.kill()
    text = seen.decode(errors="replace")
    assert "] " in text and "ETA" in text  # [#####    ] 3.0 MiB / 6.0 MiB ...
    # The rate is shown in the unit of the cap, with the cap beside it.
    assert "Mbit/s (cap 64.0 Mbit/s)" in text
    assert "dsamig sender" in text and "completed" in text


MiB = 1 << 20


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m dsamig ARGS``; its result and every module it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dsamig", *args],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    names = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    return done, names


def test_control_commands_load_neither_engine_nor_transport(tmp_path) -> None:
    """`dsamig status`, `stop` and `jobs` talk to a socket: the zero-page
    engine, the transport and the daemons stay unloaded (docs/architecture.md
    "Layers")."""
    image = tmp_path / "small.img"
    image.write_bytes(b"\1" * 4096)
    with short_dir() as directory:
        sender = Daemon.start("sender", directory, {"source_dirs": [str(tmp_path)]})
        try:
            # Port 1: nothing listens there, so the job fails at once.
            job = ok(sender.socket, "job-start", job_document("imports", str(image), 1))
            sender.wait_job(job["id"])
            runs = {
                "status JOB": imported_modules("status", "imports", "--socket", sender.socket),
                "status": imported_modules("status", "--socket", sender.socket),
                "jobs": imported_modules("jobs", "--socket", sender.socket),
                "stop": imported_modules("stop", "imports", "--socket", sender.socket),
            }
        finally:
            sender.stop()
    for what, (done, names) in runs.items():
        assert "dsamig.control.commands" in names, (what, done.stderr[-2000:])
        assert done.returncode == (2 if what == "stop" else 0), (what, done.stderr[-2000:])
        loaded = sorted(n for n in names
                        if n.startswith(("dsamig.engine", "dsamig.transport", "dsamig.daemon")))
        assert not loaded, (what, loaded)
    assert "already failed" in runs["stop"][0].stderr


def wait_stored(path: str, at_least: int) -> None:
    """Wait (bounded) until ``path`` holds ``at_least`` bytes of data."""
    deadline = time.monotonic() + TIMEOUT_S

    def stored() -> int:
        try:
            return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            return 0

    while stored() < at_least:
        assert time.monotonic() < deadline, f"{path} never held {at_least} bytes"
        time.sleep(0.02)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, EXIT_INTERRUPTED),
                                                   (signal.SIGHUP, EXIT_HANGUP)])
def test_an_interrupted_send_cancels_its_job(tmp_path, image_factory, signum: signal.Signals,
                                             exit_code: int) -> None:
    """Ctrl-C (or a hang-up) on `dsamig send` cancels the job as `dsamig stop`
    would: the receiver learns why and keeps nothing."""
    image, _, _ = image_factory(16 * MiB, seed=9, zero_every=0)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", "--json")
    sender = subprocess.Popen(
        [sys.executable, "-m", "dsamig", "send", image, "--to", f"127.0.0.1:{receiver.port}",
         "--max-bandwidth", "4MiB", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_stored(output + ".partial", MiB)
        sender.send_signal(signum)
        out, err = sender.communicate(timeout=TIMEOUT_S)
        code, rout, rerr = receiver.finish()
    finally:
        sender.kill()
        sender.communicate()
        receiver.kill()
    assert sender.returncode == exit_code, err
    assert err.strip().splitlines()[-1] == "dsamig: interrupted: the job was cancelled"
    assert last_json(out)["status"] == "cancelled"
    assert code == EXIT_TRANSFER, rerr
    received = last_json(rout)
    assert received["status"] == "cancelled"
    assert f"interrupted ({signum.name}) on the sending host" in received["error-desc"]
    assert not os.path.exists(output) and not os.path.exists(output + ".partial")


def test_receive_never_replaces_a_file_unless_forced(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(MiB, seed=10)
    output = tmp_path / "dest.img"
    output.write_bytes(b"precious")
    refused = dsamig("receive", "--listen", "127.0.0.1:0", "--output", str(output), "--once")
    assert refused.returncode == EXIT_LOCAL_IO
    assert refused.stderr.strip() == (f"dsamig: error: output '{output}' already exists "
                                      "(--force replaces it)")
    assert output.read_bytes() == b"precious"

    # A receiver that keeps listening refuses a second job into the file the first wrote.
    fresh = tmp_path / "fresh.img"
    receiver = Receiver.start(str(fresh))
    try:
        first = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}")
        second = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}")
    finally:
        code, out, _ = receiver.stop()
    assert first.returncode == 0, first.stderr
    assert f"received image-0.img into {fresh}" in out
    assert second.returncode == EXIT_TRANSFER
    assert second.stderr.strip() == (f"dsamig: error: refused: output '{fresh}' already "
                                     "exists (--force replaces it)")
    assert code == EXIT_INTERRUPTED

    forced = Receiver.start(str(output), "--once", "--force")
    try:
        sent = dsamig("send", image, "--to", f"127.0.0.1:{forced.port}")
        code, out, _ = forced.finish()
    finally:
        forced.kill()
    assert sent.returncode == 0 and code == 0
    assert out.strip().splitlines()[-1] == f"received image-0.img into {output}"
    assert read_bytes(str(output)) == read_bytes(image)


def test_receive_shows_progress_on_a_terminal(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(6 * MiB, seed=11, zero_every=0)
    output = str(tmp_path / "dest.img")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsamig", "receive", "--listen", "127.0.0.1:0", "--output",
         output, "--once"], stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    seen = b""
    try:
        while b"listening on" not in seen or not seen.endswith(b"\n"):
            seen += os.read(controller, 65536)  # bounded by pytest's timeout
        port = int(seen.split(b"listening on ")[1].split(b"\n")[0].rsplit(b":", 1)[1])
        sent = dsamig("send", image, "--to", f"127.0.0.1:{port}", "--max-bandwidth", "16MiB")
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=TIMEOUT_S) == 0
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sent.returncode == 0, sent.stderr
    text = seen.decode(errors="replace")
    assert "] " in text and "ETA" in text and " / 6.0 MiB" in text
    assert "dsamig receiver" in text and f"into {output}" in text
