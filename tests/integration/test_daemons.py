"""The daemons as real subprocesses on 127.0.0.1, driven through real control sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from dsamig.control import ControlClient
from dsamig.daemon.receiver import ReceiverDaemon
from dsamig.daemon.sdnotify import Notifier
from dsamig.daemon.sender import SenderDaemon
from dsamig.errors import DsamigError
from dsamig.jobs.config import ReceiverConfig, SenderConfig
from dsamig.jobs.schema import Document
from dsamig.settings import EXIT_TRANSFER
from dsamig.transport.sender import SendOptions, send_image
from tests.conftest import read_bytes
from tests.integration.daemon_helpers import (
    Daemon,
    EventStream,
    execute,
    job_document,
    ok,
    short_dir,
    wait_for,
    write_job,
)
from tests.integration.helpers import dsamig
from tests.live_writer import LiveWriter

MiB = 1024 * 1024
FINISHED = ("completed", "failed", "cancelled")


@dataclass
class Pair:
    receiver: Daemon
    sender: Daemon
    storage: str
    directory: str


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[Pair]:
    """One receiver and one sender for the tests that leave both running.

    The sender may send what lies below pytest's temporary directory, where
    every test's ``image_factory`` writes its images."""
    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory, {
            "listen": "127.0.0.1:0", "storage_dir": storage, "metrics_listen": "127.0.0.1:0",
            "timeouts": {"idle": "10s"},
        })
        try:
            sender = Daemon.start("sender", directory, {
                "limits": {"max_jobs": 8},
                "source_dirs": [str(tmp_path_factory.getbasetemp())]})
        except BaseException:
            receiver.kill()
            raise
        try:
            yield Pair(receiver, sender, storage, directory)
        finally:
            sender.kill()
            receiver.kill()


def stored(pair: Pair) -> set[str]:
    return set(os.listdir(pair.storage))


def test_start_status_stop_through_the_cli(pair: Pair, image_factory, tmp_path) -> None:
    image, zero, normal = image_factory(3 * MiB + 4096, seed=11)
    job_file = write_job(str(tmp_path), "cli-job", image, pair.receiver.port, channels=3)
    started = dsamig("start", job_file, "--socket", pair.sender.socket, "--wait", "--json")
    assert started.returncode == 0, started.stderr
    final = json.loads(started.stdout)  # one JSON object and nothing else
    job_id = final["id"]
    assert final["status"] == "completed" and final["name"] == "cli-job"
    assert (final["duplicate"], final["normal"]) == (zero, normal)
    assert read_bytes(os.path.join(pair.storage, "cli-job")) == read_bytes(image)

    status = dsamig("status", job_id, "--socket", pair.sender.socket, "--json")
    assert status.returncode == 0, status.stderr
    as_sender = json.loads(status.stdout)
    # The same figures the one-shot `dsamig send --json` prints, plus identity and state.
    for key in ("total-time", "mbps", "transferred", "duplicate", "normal", "channel-stats"):
        assert key in as_sender
    assert as_sender["channels"] == 3
    as_receiver = json.loads(dsamig("status", "cli-job", "--socket", pair.receiver.socket,
                                    "--json").stdout)
    assert as_receiver["id"] == job_id and as_receiver["status"] == "completed"
    assert as_receiver["normal"] == normal

    listing = dsamig("jobs", "--socket", pair.sender.socket)
    assert job_id in listing.stdout and "completed" in listing.stdout
    human = dsamig("status", "--socket", pair.sender.socket)
    assert "dsamig sender" in human.stdout and "cli-job" in human.stdout

    stopped = dsamig("stop", job_id, "--socket", pair.sender.socket)
    assert stopped.returncode == 2
    assert "already completed" in stopped.stderr
    missing = dsamig("status", "no-such-job", "--socket", pair.sender.socket)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr


def test_json_means_pure_json(pair: Pair, image_factory, tmp_path) -> None:
    """start --json prints one object; status --json has the daemon's state too."""
    image, _, _ = image_factory(MiB, seed=12)
    job_file = write_job(str(tmp_path), "json-only", image, pair.receiver.port)
    started = dsamig("start", job_file, "--socket", pair.sender.socket, "--json")
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)
    assert job["name"] == "json-only" and job["id"] and "created" in job
    pair.sender.wait_job(job["id"])
    status = dsamig("status", "--socket", pair.sender.socket, "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert set(state) == {"daemon", "jobs"}
    daemon = state["daemon"]
    assert daemon["role"] == "sender" and daemon["state"] == "running"
    for key in ("rate-bytes-per-second", "limits", "queued", "running", "job-rates"):
        assert key in daemon, key
    assert job["id"] in {j["id"] for j in state["jobs"]}
    assert all("total-time" in j for j in state["jobs"])  # the full job objects


def test_jobs_never_cuts_a_name(pair: Pair, image_factory, tmp_path) -> None:
    image, _, _ = image_factory(MiB, seed=13)
    name = "vm-" + "0123456789abcdef" * 4 + "-memory-snapshot"
    job = ok(pair.sender.socket, "job-start", job_document(name, image, pair.receiver.port))
    pair.sender.wait_job(job["id"])
    listing = dsamig("jobs", "--socket", pair.sender.socket)
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if job["id"] in line)
    assert f"  {name}  " in line
    header = listing.stdout.splitlines()[0]
    # The columns stay aligned: STATUS starts where the status of every row starts.
    assert line.index("completed") == header.index("STATUS")
    # What the user copies from the listing names the job.
    assert dsamig("status", name, "--socket", pair.sender.socket).returncode == 0


def test_a_closed_pipe_ends_quietly(pair: Pair) -> None:
    """`dsamig jobs | head -0`: the reader is gone before we write; exit 0, no traceback."""
    import subprocess
    import sys

    for command in (["jobs", "--socket", pair.sender.socket],
                    ["status", "--socket", pair.sender.socket, "--json"],
                    ["--help"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = subprocess.run([sys.executable, "-m", "dsamig", *command], stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, timeout=30)
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr) == (0, ""), command


async def test_many_concurrent_jobs(pair: Pair, image_factory) -> None:
    images = [image_factory(2 * MiB + i * 4096, seed=100 + i) for i in range(6)]
    async with await ControlClient.connect(pair.sender.socket) as client:
        await client.execute("subscribe")
        ids = {}
        for i, (image, _, _) in enumerate(images):
            # Paced so that they are certain to overlap.
            job = await client.execute("job-start", job_document(
                f"many-{i}", image, pair.receiver.port, channels=2, max_bandwidth="16MiB"))
            ids[job["id"]] = i
        seen: list[tuple[str, str]] = []
        while sum(1 for _, s in seen if s in FINISHED) < len(ids):
            event = await client.next_event(30)
            data = event["data"]
            if event["event"] == "JOB_STATUS_CHANGE" and data["id"] in ids:
                seen.append((data["id"], data["status"]))
    statuses = [s for _, s in seen]
    assert statuses.count("completed") == 6, seen
    first_done = statuses.index("completed")
    assert statuses[:first_done].count("setup") == 6, "the jobs did not run at once"
    for i, (image, _, _) in enumerate(images):
        assert read_bytes(os.path.join(pair.storage, f"many-{i}")) == read_bytes(image)
    received = {j["id"]: j for j in ok(pair.receiver.socket, "query-jobs")}
    assert all(received[job_id]["status"] == "completed" for job_id in ids)


async def test_subscriber_sees_every_state_in_order(pair: Pair, image_factory) -> None:
    image, _, _ = image_factory(2 * MiB, seed=3)
    async with await ControlClient.connect(pair.sender.socket) as client:
        assert (await client.execute("subscribe", {"events": ["JOB_STATUS_CHANGE"]}))[
            "events"] == ["JOB_STATUS_CHANGE"]
        job = await client.execute("job-start", job_document(
            "events-job", image, pair.receiver.port, max_bandwidth="8MiB"))
        states = []
        while not states or states[-1] not in FINISHED:
            event = await client.next_event(30)
            assert event["timestamp"]["seconds"] > 0
            if event["data"]["id"] == job["id"]:
                states.append(event["data"]["status"])
    assert states == ["queued", "setup", "active", "completing", "completed"]


def _active_with_progress(daemon: Daemon, job_id: str) -> bool:
    job = execute(daemon.socket, "query-job", {"id": job_id}).get("return")
    return bool(job) and job["status"] == "active" and 0 < job["remaining"] < job["total"]


def test_cancel_mid_transfer_leaves_nothing(pair: Pair, image_factory) -> None:
    # Eight seconds of paced sending: time enough for `dsamig stop` to start
    # and cancel it even on a busy host.
    image, _, _ = image_factory(16 * MiB, seed=5, zero_every=0)
    job = ok(pair.sender.socket, "job-start", job_document(
        "cancel-me", image, pair.receiver.port, max_bandwidth="2MiB"))
    wait_for(lambda: _active_with_progress(pair.sender, job["id"]), what="progress")
    assert "cancel-me.partial" in stored(pair)
    stopped = dsamig("stop", job["id"], "--socket", pair.sender.socket)
    assert stopped.returncode == 0, stopped.stderr
    assert "cancelled" in stopped.stdout
    on_sender = pair.sender.job(job["id"])
    assert on_sender["status"] == "cancelled"
    assert on_sender["error-desc"] == "cancelled by the sender's operator"
    on_receiver = pair.receiver.wait_job(job["id"], timeout_s=10)
    assert on_receiver["status"] == "cancelled", on_receiver
    assert "cancelled by the sender's operator" in on_receiver["error-desc"]
    assert not {"cancel-me", "cancel-me.partial"} & stored(pair)


def test_receiver_cancel_spares_the_other_jobs(pair: Pair, image_factory) -> None:
    doomed, _, _ = image_factory(8 * MiB, seed=6, zero_every=0)
    spared, _, _ = image_factory(3 * MiB, seed=7)
    first = ok(pair.sender.socket, "job-start", job_document(
        "doomed", doomed, pair.receiver.port, max_bandwidth="4MiB"))
    second = ok(pair.sender.socket, "job-start", job_document(
        "spared", spared, pair.receiver.port, max_bandwidth="6MiB"))
    wait_for(lambda: _active_with_progress(pair.receiver, first["id"]), what="progress")
    cancelled = ok(pair.receiver.socket, "job-cancel", {"id": "doomed"})
    assert cancelled["status"] == "cancelled"
    assert pair.sender.wait_job(first["id"])["status"] == "failed"
    assert "CANCELLED" in pair.sender.job(first["id"])["error-desc"]
    assert pair.sender.wait_job(second["id"])["status"] == "completed"
    assert read_bytes(os.path.join(pair.storage, "spared")) == read_bytes(spared)
    assert not {"doomed", "doomed.partial"} & stored(pair)


def test_max_bandwidth_limits_a_job(pair: Pair, image_factory) -> None:
    image, _, _ = image_factory(8 * MiB, seed=8, zero_every=0)
    job = ok(pair.sender.socket, "job-start", job_document(
        "paced", image, pair.receiver.port, max_bandwidth="20MiB"))
    done = pair.sender.wait_job(job["id"])
    assert done["status"] == "completed"
    # 8 MiB of normal pages at 20 MiB/s cannot take less than 0.4 s.
    assert done["total-time"] >= 350, done["total-time"]


def _reply(reader: Any) -> dict[str, Any]:
    while True:
        message = json.loads(reader.readline())
        if "event" not in message:
            return message


def test_garbage_and_broken_clients_do_not_hurt(pair: Pair, image_factory) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(pair.sender.socket)
        reader = sock.makefile("rb")
        greeting = json.loads(reader.readline())["dsamig"]
        assert greeting["role"] == "sender" and "job-start" in greeting["commands"]
        cases = [
            (b"garbage", "GenericError", "not JSON"),
            (b"[1, 2]", "GenericError", "JSON object"),
            (b'{"execute": 5}', "GenericError", "command name"),
            (b'{"execute": "query-daemon", "argumnts": {}}', "GenericError", "'argumnts'"),
            (b'{"execute": "x", "arguments": {"a": NaN}}', "GenericError", "not JSON"),
            (b"[" * 100000 + b"]" * 100000, "GenericError", "longer than"),
            (b"\xff\xfe", "GenericError", "not JSON"),
            (b'{"execute": "no-such-command", "id": 7}', "CommandNotFound", "no-such-command"),
            (b'{"execute": "query-job", "arguments": {"id": 5}}', "InvalidArgument", "string"),
            (b'{"execute": "query-job", "arguments": {}}', "InvalidArgument", "missing"),
            (b'{"execute": "job-list", "arguments": {"x": 1}}', "InvalidArgument", "unknown"),
            (b'{"execute": "job-start", "arguments": {"name": "x"}}', "InvalidArgument",
             "missing required key 'source'"),
            (b'{"execute": "job-cancel", "arguments": {"id": "nope"}}', "JobNotFound", "nope"),
        ]
        for line, error_class, words in cases:
            sock.sendall(line + b"\n")
            reply = _reply(reader)
            assert reply["error"]["class"] == error_class, (line[:40], reply)
            assert words in reply["error"]["desc"], (line[:40], reply)
        sock.sendall(b'\n  \n{"execute": "query-daemon", "id": "x"}\n')
        reply = _reply(reader)
        assert reply["id"] == "x" and reply["return"]["role"] == "sender"

    # A client that leaves halfway through a line: the line is never executed.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(pair.sender.socket)
        sock.sendall(b'{"execute": "job-start", "arguments": {"name": "half"')
    # A client that sends a whole command and leaves without reading the reply:
    # the command still runs.
    image, _, _ = image_factory(256 * 1024, seed=9)
    request = {"execute": "job-start",
               "arguments": job_document("hit-and-run", image, pair.receiver.port)}
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(pair.sender.socket)
        sock.makefile("rb").readline()  # the greeting
        sock.sendall(json.dumps(request).encode() + b"\n")
    assert pair.sender.wait_job("hit-and-run")["status"] == "completed"
    names = {job["name"] for job in ok(pair.sender.socket, "job-list")}
    assert "half" not in names
    assert ok(pair.sender.socket, "query-daemon")["state"] == "running"


async def test_job_names_cannot_leave_storage_dir(pair: Pair, image_factory, tmp_path) -> None:
    image, _, _ = image_factory(64 * 1024, seed=10)
    for name in ("../../etc/passwd", "a/b", "..", ".hidden", "x.partial", "a..b", ""):
        reply = execute(pair.sender.socket, "job-start",
                        job_document(name, image, pair.receiver.port))
        assert reply["error"]["class"] == "InvalidArgument", (name, reply)
        assert "name" in reply["error"]["desc"]
    # A sender that is not our daemon (no validation on its side) gets refused
    # by the receiver, and nothing is written anywhere.
    before_parent = set(os.listdir(pair.directory))
    for name in ("../escaped", "sub/dir", "..", "evil.partial", "evil.partial.progress"):
        with pytest.raises(DsamigError, match=r"job name .* (is not allowed|contains)"):
            await send_image(image, SendOptions(host="127.0.0.1", port=pair.receiver.port,
                                                channels=1, name=name))
    assert set(os.listdir(pair.directory)) == before_parent
    assert not any(n.startswith(("escaped", "evil")) for n in stored(pair))
    refused = [j for j in ok(pair.receiver.socket, "job-list") if j["name"] == "../escaped"]
    assert refused and refused[0]["status"] == "failed"
    assert refused[0]["error-desc"].startswith("refused: job name")


async def test_symlinks_and_existing_images_are_refused(pair: Pair, image_factory,
                                                        tmp_path) -> None:
    image, _, _ = image_factory(64 * 1024, seed=12)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, os.path.join(pair.storage, "linked"))
    os.symlink(victim, os.path.join(pair.storage, "partial-linked.partial"))
    for name, words in (("linked", "refused: .*symbolic link"),
                        ("partial-linked", "refused: .*symbolic link")):
        with pytest.raises(DsamigError, match=words):
            await send_image(image, SendOptions(host="127.0.0.1", port=pair.receiver.port,
                                                channels=1, name=name))
    assert victim.read_bytes() == b"precious"
    await send_image(image, SendOptions(host="127.0.0.1", port=pair.receiver.port, name="once"))
    with pytest.raises(DsamigError, match=r"^refused: image 'once' already exists"):
        await send_image(image, SendOptions(host="127.0.0.1", port=pair.receiver.port,
                                            name="once"))
    assert read_bytes(os.path.join(pair.storage, "once")) == read_bytes(image)


def test_send_names_its_job_after_the_image(pair: Pair, image_factory, tmp_path) -> None:
    """Into a receiver daemon, `dsamig send` without --name stores the image
    under its file name; a second time, the refusal says so."""
    made, _, _ = image_factory(MiB, seed=61)
    image = tmp_path / "named-by-file.img"
    os.rename(made, image)
    sent = dsamig("send", str(image), "--to", f"127.0.0.1:{pair.receiver.port}")
    assert sent.returncode == 0, sent.stderr
    assert read_bytes(os.path.join(pair.storage, "named-by-file.img")) == read_bytes(str(image))
    again = dsamig("send", str(image), "--to", f"127.0.0.1:{pair.receiver.port}")
    assert again.returncode == EXIT_TRANSFER
    assert again.stderr.strip() == (
        "dsamig: error: refused: image 'named-by-file.img' already exists in storage_dir "
        "(replace_existing: true allows replacing it)")


def test_status_of_a_running_job(pair: Pair, image_factory) -> None:
    """`dsamig status JOB` has what virsh domjobinfo has: rates of the wire and
    the image, the ETA, the bandwidth share, channels, time since data moved,
    sessions and the engine; --watch follows it to its end."""
    # Four seconds of paced sending, to look at it while it runs.
    image, _, _ = image_factory(8 * MiB, seed=62, zero_every=0)
    job = ok(pair.sender.socket, "job-start", job_document(
        "watched", image, pair.receiver.port, max_bandwidth="2MiB", channels=2))
    watch = subprocess.Popen(
        [sys.executable, "-m", "dsamig", "status", job["id"], "--socket", pair.sender.socket,
         "--watch", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def measured() -> dict[str, Any] | None:
            live = pair.sender.job(job["id"])
            return live if live.get("image-bytes-per-second") else None

        live = wait_for(measured, what="a measured rate")
        human = dsamig("status", "watched", "--socket", pair.sender.socket)
        on_receiver = pair.receiver.job(job["id"])
        out, err = watch.communicate(timeout=60)
    finally:
        watch.kill()
        watch.communicate()
    assert live["status"] == "active"
    assert live["bandwidth-limit"] == live["max-bandwidth"] == 2 * MiB
    assert 0 < live["image-bytes-per-second"] <= 4 * MiB
    assert live["wire-bytes-per-second"] > 0 and live["eta-s"] > 0
    assert 0 <= live["last-data-s"] < 5
    assert (live["channels-connected"], live["channels-wanted"]) == (2, 2)
    assert live["reconnecting"] is False and live["sessions"] == 1
    assert live["engine"]["backend"] == "cpu"
    assert human.returncode == 0, human.stderr
    rows = {line.strip().split("  ", 1)[0]: line.strip().split("  ", 1)[1].strip()
            for line in human.stdout.splitlines()[1:]}
    assert rows["bandwidth"] == "2.0 MiB/s"
    assert rows["channels"].startswith("2 of 2 connected")
    assert rows["remaining"].endswith(" s") and rows["rates now"].startswith("wire ")
    assert rows["sessions"].startswith("1 (0 reconnects)")
    assert rows["engine"].startswith("cpu")
    assert on_receiver["channels-connected"] == 2 and on_receiver["reconnecting"] is False
    assert watch.returncode == 0, err
    views = [json.loads(line) for line in out.splitlines()]
    assert len(views) >= 2 and {v["id"] for v in views} == {job["id"]}
    assert views[-1]["status"] == "completed"
    assert "eta-s" not in views[-1]  # a finished job has only its final figures


def test_a_live_job_from_yaml_shows_its_rounds_and_stores_the_frozen_image(
        pair: Pair, image_factory, tmp_path) -> None:
    """A ``live:`` job on the sender daemon: ``dsamig status`` shows its round
    and dirty rate while a writer keeps dirtying the image, and the stored
    copy is the image as the pause froze it."""
    image, _, _ = image_factory(8 * MiB, seed=63, zero_every=4)
    with LiveWriter(image, str(tmp_path / "count"), seed=64, rate=0) as writer:
        writer.wait_writes(50)
        pid = writer.pid
        job = ok(pair.sender.socket, "job-start", job_document(
            "live-vm", image, pair.receiver.port, max_bandwidth="4MiB", channels=2,
            live={"pause_cmd": f"kill -STOP {pid} && "
                               f"while ! grep -q '^State:.*T' /proc/{pid}/status; do :; done",
                  "resume_cmd": f"kill -CONT {pid}", "max_downtime": "1ms",
                  "max_rounds": 3}))

        def in_a_later_round() -> dict[str, Any] | None:
            view = pair.sender.job(job["id"])
            return view if view.get("round", 0) >= 1 or view["status"] in FINISHED else None

        running = wait_for(in_a_later_round, timeout_s=60, what="round 1")
        human = dsamig("status", "live-vm", "--socket", pair.sender.socket)
        table = dsamig("status", "--socket", pair.sender.socket)
        done = pair.sender.wait_job(job["id"])
        writer.wait_state(stopped=True)  # the guest lives on at the destination
        frozen = read_bytes(image)
    assert running["status"] == "active", running
    assert human.returncode == 0, human.stderr
    rows = {line.strip().split("  ", 1)[0]: line.strip().split("  ", 1)[1].strip()
            for line in human.stdout.splitlines()[1:]}
    assert rows["live"].startswith(f"round {running['round']}, ")
    assert "dirty pages/s" in rows["live"]
    line = next(x for x in table.stdout.splitlines() if " live-vm " in x)
    assert " round " in line and "dirty pages/s" in line
    assert done["status"] == "completed", done.get("error-desc")
    assert done["dirty-sync-count"] == 4 and done["downtime"] >= 0  # rounds 0..3
    assert [r["round"] for r in done["rounds"]] == [0, 1, 2, 3]
    assert read_bytes(os.path.join(pair.storage, "live-vm")) == frozen


def test_a_resuming_sender_takes_its_orphaned_job_over(pair: Pair, image_factory) -> None:
    """A sender killed mid-job and started again with --resume continues at
    once: the receiver's orphaned job (same name, image and host, no channel
    left) is handed over, not refused until the idle timeout."""
    image, zero, normal = image_factory(16 * MiB, seed=63, zero_every=4)
    progress = os.path.join(pair.storage, "orphan.partial.progress")
    command = [sys.executable, "-m", "dsamig", "send", image, "--to",
               f"127.0.0.1:{pair.receiver.port}", "--name", "orphan", "--channels", "2",
               "--json"]
    first = subprocess.Popen([*command, "--max-bandwidth", "4MiB"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(progress), what="a checkpoint")
        first.kill()
        first.wait(timeout=10)
        orphaned = wait_for(lambda: [j for j in ok(pair.receiver.socket, "query-jobs")
                                     if j["name"] == "orphan" and j["status"] == "active"
                                     and j["channels-connected"] == 0],
                            what="the orphaned job")[0]
        began = time.monotonic()
        second = subprocess.run([*command, "--resume"], capture_output=True, text=True,
                                timeout=60)
        took_s = time.monotonic() - began
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 0, second.stderr
    assert took_s < 10  # the receiver's idle timeout: nothing waited for it
    assert read_bytes(os.path.join(pair.storage, "orphan")) == read_bytes(image)
    old = pair.receiver.job(orphaned["id"])
    assert old["status"] == "cancelled"
    assert old["error-desc"].startswith("taken over by resuming job ")
    assert json.loads(second.stdout)["status"] == "completed"
    received = pair.receiver.job("orphan")  # the newest job of that name
    assert received["id"] != orphaned["id"]
    assert received["status"] == "completed" and received["resumed-packets"] > 0
    assert (received["duplicate"], received["normal"]) == (zero, normal)


def test_stop_keep_partial_keeps_the_receivers_work(pair: Pair, image_factory) -> None:
    # Eight seconds of paced sending: time for two `dsamig stop` on a busy host.
    image, _, _ = image_factory(16 * MiB, seed=64, zero_every=0)
    partial = os.path.join(pair.storage, "kept.partial")
    job = ok(pair.sender.socket, "job-start", job_document(
        "kept", image, pair.receiver.port, max_bandwidth="2MiB", channels=2))
    wait_for(lambda: os.path.exists(partial + ".progress"), what="a checkpoint")
    on_sender = dsamig("stop", "kept", "--keep-partial", "--socket", pair.sender.socket)
    assert on_sender.returncode == 2
    assert "keep-partial applies to a receiver's job" in on_sender.stderr
    stopped = dsamig("stop", "kept", "--keep-partial", "--socket", pair.receiver.socket)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == (f"kept ({job['id']}): cancelled; the partial file is "
                                      "kept for a resume")
    failed = pair.sender.wait_job(job["id"])
    assert failed["status"] == "failed"
    assert "the partial file is kept" in failed["error-desc"]
    assert os.path.exists(partial) and os.path.exists(partial + ".progress")
    again = ok(pair.sender.socket, "job-start", job_document(
        "kept", image, pair.receiver.port, resume=True, channels=2))
    assert pair.sender.wait_job(again["id"])["status"] == "completed"
    assert pair.receiver.job(again["id"])["resumed-packets"] > 0
    assert read_bytes(os.path.join(pair.storage, "kept")) == read_bytes(image)
    assert not os.path.exists(partial)


def test_metrics_endpoint(pair: Pair) -> None:
    address = ok(pair.receiver.socket, "query-daemon")["metrics-listen"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['dsamig_info{role="receiver",version="0.1.0"}'] == 1
    assert samples["dsamig_image_bytes_total"] >= 0
    for name in ("dsamig_transferred_bytes_total", "dsamig_zero_pages_total",
                 "dsamig_normal_pages_total", "dsamig_reconnects_total",
                 'dsamig_jobs{state="active"}', 'dsamig_jobs_finished_total{state="completed"}',
                 "dsamig_channels_in_use"):
        assert name in samples, name
    assert 0 < time.time() - samples["process_start_time_seconds"] < 3600
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{address}/other", timeout=5)
    info.value.close()  # the error holds the response and its socket
    assert info.value.code == 404


def test_queue_beyond_the_concurrent_job_limit(image_factory, tmp_path) -> None:
    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory,
                                {"listen": "127.0.0.1:0", "storage_dir": storage})
        sender = Daemon.start("sender", directory,
                              {"limits": {"max_jobs": 1, "max_queued": 2, "max_channels": 4},
                               "source_dirs": [str(tmp_path)]})
        events = EventStream(sender.socket)
        try:
            images = [image_factory(1 * MiB, seed=20 + i, zero_every=0)[0] for i in range(4)]
            jobs = [ok(sender.socket, "job-start", job_document(
                f"q{i}", images[i], receiver.port, max_bandwidth="10MiB", channels=2))
                for i in range(3)]
            views = {j["name"]: j for j in ok(sender.socket, "query-jobs")}
            statuses = {name: view["status"] for name, view in views.items()}
            assert statuses["q0"] in ("setup", "active")
            assert statuses["q1"] == statuses["q2"] == "queued"
            # A queued job says why it waits.
            assert views["q1"]["queue-reason"] == "max_jobs 1 jobs are running"
            assert views["q2"]["queue-reason"] == (
                "1 earlier job(s) wait first (the queue is first in, first out)")
            assert (views["q1"]["queue-position"], views["q2"]["queue-position"]) == (1, 2)
            overflow = execute(sender.socket, "job-start",
                               job_document("q3", images[3], receiver.port))
            assert overflow["error"]["class"] == "Unavailable"
            assert "queue is full" in overflow["error"]["desc"]
            too_wide = execute(sender.socket, "job-start",
                               job_document("wide", images[3], receiver.port, channels=5))
            assert "max_channels" in too_wide["error"]["desc"]
            ids = [j["id"] for j in jobs]
            seen = events.job_states(set(ids))
            # One at a time, in order: each set up only after the one before it ended.
            starts_and_ends = [(i, s) for i, s in seen if s in ("setup", "completed")]
            assert starts_and_ends == [(ids[0], "setup"), (ids[0], "completed"),
                                       (ids[1], "setup"), (ids[1], "completed"),
                                       (ids[2], "setup"), (ids[2], "completed")]
            for i in range(3):
                assert read_bytes(os.path.join(storage, f"q{i}")) == read_bytes(images[i])
        finally:
            events.close()
            sender.kill()
            receiver.kill()


def test_sigterm_during_a_job(image_factory, tmp_path) -> None:
    """Sender stopped mid-job: exit 0, the receiver keeps no image, partial or final."""
    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory, {
            "listen": "127.0.0.1:0", "storage_dir": storage, "shutdown_timeout": "200ms"})
        sender = Daemon.start("sender", directory, {"shutdown_timeout": "300ms",
                                                    "source_dirs": [str(tmp_path)]})
        try:
            image, _, _ = image_factory(8 * MiB, seed=30, zero_every=0)
            job = ok(sender.socket, "job-start",
                     job_document("interrupted", image, receiver.port, max_bandwidth="4MiB"))
            wait_for(lambda: _active_with_progress(sender, job["id"]), what="progress")
            began = time.monotonic()
            assert sender.stop(signal.SIGTERM) == 0
            assert time.monotonic() - began < 5
            assert not os.path.exists(sender.socket)
            finished = [e for e in sender.log_events() if e.get("event") == "job finished"]
            assert finished[0]["status"] == "cancelled"
            assert "shutting down" in finished[0]["reason"]
            assert receiver.wait_job(job["id"])["status"] == "cancelled"
            assert os.listdir(storage) == []

            # The receiver stopped mid-job: the same guarantees on its side.
            sender = Daemon.start("sender", directory, {"source_dirs": [str(tmp_path)]})
            job = ok(sender.socket, "job-start",
                     job_document("interrupted", image, receiver.port, max_bandwidth="4MiB"))
            wait_for(lambda: _active_with_progress(receiver, job["id"]), what="progress")
            assert receiver.stop(signal.SIGTERM) == 0
            assert os.listdir(storage) == []
            failed = sender.wait_job(job["id"])
            assert failed["status"] == "failed" and "shutting down" in failed["error-desc"]
        finally:
            sender.kill()
            receiver.kill()


def test_sigterm_lets_running_jobs_finish(image_factory, tmp_path) -> None:
    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory,
                                {"listen": "127.0.0.1:0", "storage_dir": storage})
        sender = Daemon.start("sender", directory, {"shutdown_timeout": "20s",
                                                    "source_dirs": [str(tmp_path)]})
        try:
            image, _, _ = image_factory(6 * MiB, seed=31, zero_every=0)
            job = ok(sender.socket, "job-start",
                     job_document("drained", image, receiver.port, max_bandwidth="8MiB"))
            wait_for(lambda: _active_with_progress(sender, job["id"]), what="progress")
            sender.send_signal(signal.SIGTERM)
            wait_for(lambda: ok(sender.socket, "query-daemon")["state"] == "stopping",
                     what="stopping")
            refused = execute(sender.socket, "job-start",
                              job_document("late", image, receiver.port))
            assert refused["error"]["class"] == "Unavailable", refused
            assert sender.stop(signal.SIGTERM) == 0
            assert read_bytes(os.path.join(storage, "drained")) == read_bytes(image)
            finished = [e for e in sender.log_events() if e.get("event") == "job finished"]
            assert [e["status"] for e in finished] == ["completed"]
        finally:
            sender.kill()
            receiver.kill()


def test_sighup_reloads_limits_and_log_level(tmp_path) -> None:
    with short_dir() as directory:
        sender = Daemon.start("sender", directory, {"limits": {"max_jobs": 3},
                                                    "source_dirs": [directory]})
        try:
            with open(sender.config_path) as f:
                config = yaml.safe_load(f)
            config["limits"]["max_jobs"] = 2
            config["log_level"] = "debug"
            config["control_socket"] = os.path.join(directory, "moved.sock")
            with open(sender.config_path, "w") as f:
                yaml.safe_dump(config, f)
            sender.send_signal(signal.SIGHUP)
            info = wait_for(lambda: (i := ok(sender.socket, "query-daemon"))["limits"][
                "max-jobs"] == 2 and i, what="reload")
            assert info["log-level"] == "debug"
            assert info["control-socket"] == sender.socket  # needs a restart: unchanged
            reloaded = [e for e in sender.log_events()
                        if e.get("event") == "configuration reloaded"]
            assert reloaded and reloaded[0]["needs_restart"] == ["control_socket"]
            assert "limits" in reloaded[0]["applied"]

            with open(sender.config_path, "w") as f:
                f.write("limits: {max_jobs: many}\n")
            sender.send_signal(signal.SIGHUP)
            wait_for(lambda: any(e.get("event", "").startswith("reload failed")
                                 for e in sender.log_events()), what="reload failure")
            assert ok(sender.socket, "query-daemon")["limits"]["max-jobs"] == 2
            assert sender.stop() == 0
        finally:
            sender.kill()


async def test_one_canonical_log_line_per_job_in_process(image_factory) -> None:
    """Both daemons in this process, their logs captured: one "job finished" line
    per side, with the job's id and name bound and its key figures."""
    image, zero, normal = image_factory(MiB + 4096, seed=40)
    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = ReceiverDaemon(ReceiverConfig.from_document(Document.from_object(
            {"listen": "127.0.0.1:0", "storage_dir": storage,
             "control_socket": os.path.join(directory, "r.sock")}, "test")),
            notifier=Notifier(None), install_signals=False)
        sender = SenderDaemon(SenderConfig.from_document(Document.from_object(
            {"control_socket": os.path.join(directory, "s.sock"),
             "source_dirs": [os.path.dirname(image)]}, "test")),
            notifier=Notifier(None), install_signals=False)
        with capture_logs() as logs:
            served = [asyncio.ensure_future(d.serve()) for d in (receiver, sender)]
            try:
                await asyncio.wait_for(_until(lambda: receiver.listen_address and os.path.exists(
                    sender.config.control_socket)), 10)
                assert receiver.listen_address is not None
                async with await ControlClient.connect(sender.config.control_socket) as client:
                    await client.execute("subscribe")
                    job = await client.execute("job-start", job_document(
                        "logged", image, receiver.listen_address[1], channels=2))
                    while True:
                        event = await client.next_event(30)
                        if event["data"].get("status") == "completed":
                            break
            finally:
                for daemon in (receiver, sender):
                    daemon.request_stop()
                assert await asyncio.wait_for(asyncio.gather(*served), 15) == [0, 0]
    finished = [e for e in logs if e["event"] == "job finished"]
    assert sorted(e["role"] for e in finished) == ["receiver", "sender"]
    for entry in finished:
        assert entry["job"] == job["id"] and entry["name"] == "logged"
        assert entry["status"] == "completed" and entry["log_level"] == "info"
        assert (entry["zero_pages"], entry["normal_pages"]) == (zero, normal)
        assert entry["channels"] == 2 and entry["image_bytes"] == MiB + 4096
    # The transport's own lines carry the job too.
    assert any(e["event"] == "engine selected" and e["job"] == job["id"] for e in logs)
    assert any(e["event"] == "daemon stopped" for e in logs)


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
