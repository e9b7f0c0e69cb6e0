"""The daemons' trust rules: TLS and pre-shared keys from YAML, the sender's
security defaults and job-start checks, and sources that cannot be swapped."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from dsamig.settings import EXIT_USAGE
from tests.conftest import read_bytes
from tests.helpers_tls import make_pki
from tests.integration.daemon_helpers import (
    Daemon,
    execute,
    job_document,
    ok,
    short_dir,
    write_job,
)
from tests.integration.helpers import dsamig

MiB = 1024 * 1024


def write_key(path: str, key: bytes, mode: int = 0o600) -> str:
    with open(path, "wb") as f:
        f.write(key)
    os.chmod(path, mode)
    return path


def test_tls_and_psk_from_yaml(image_factory) -> None:
    image, zero, normal = image_factory(2 * MiB + 4096, seed=21)
    with short_dir() as directory:
        pki = make_pki(directory)
        psk = os.path.join(directory, "psk")
        with open(psk, "wb") as f:
            f.write(os.urandom(32))
        os.chmod(psk, 0o600)
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory, {
            "listen": "127.0.0.1:0", "storage_dir": storage,
            "security": {"tls_cert": pki.receiver_cert, "tls_key": pki.receiver_key,
                         "tls_ca": pki.ca, "psk_file": psk},
        })
        sender = Daemon.start("sender", directory, {"source_dirs": [os.path.dirname(image)]})
        try:
            good = ok(sender.socket, "job-start", {
                "name": "secure", "source": image,
                "destination": {"host": "127.0.0.1", "port": receiver.port},
                "security": {"tls_cert": pki.sender_cert, "tls_key": pki.sender_key,
                             "tls_ca": pki.ca, "psk_file": psk},
            })
            done = sender.wait_job(good["id"])
            assert done["status"] == "completed", done
            assert (done["duplicate"], done["normal"]) == (zero, normal)
            assert read_bytes(os.path.join(storage, "secure")) == read_bytes(image)

            # No client certificate: refused before any page data, nothing stored.
            bad = ok(sender.socket, "job-start", {
                "name": "impostor", "source": image, "retry_for": 0,
                "destination": {"host": "127.0.0.1", "port": receiver.port},
                "security": {"tls_ca": pki.ca, "psk_file": psk},
            })
            failed = sender.wait_job(bad["id"])
            assert failed["status"] == "failed"
            assert "TLS" in failed["error-desc"] or "certificate" in failed["error-desc"]
            assert not [n for n in os.listdir(storage) if n.startswith("impostor")]
        finally:
            sender.kill()
            receiver.kill()


# -- the sender's sources ---------------------------------------------------------------


@contextmanager
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never answers: a job sent there
    holds its slot in the sender until it is cancelled."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def test_a_source_swapped_for_a_link_while_queued_is_not_followed(tmp_path) -> None:
    # The sender checks the source at job-start and sends the job later, when
    # a slot is free.  Whatever replaces the path in between (a link to a
    # file outside source_dirs, here both at the file and at a directory
    # above it), the job sends the file that was checked.
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = os.urandom(64 * 1024)
    (outside / "vm.img").write_bytes(secret)
    original = {name: os.urandom(64 * 1024) for name in ("file-swap", "dir-swap")}
    (allowed / "vm.img").write_bytes(original["file-swap"])
    (allowed / "sub" / "vm.img").write_bytes(original["dir-swap"])
    with short_dir() as directory, black_hole() as hole:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory,
                                {"listen": "127.0.0.1:0", "storage_dir": storage})
        sender = Daemon.start("sender", directory, {"source_dirs": [str(allowed)],
                                                    "limits": {"max_jobs": 1}})
        try:
            blocker = ok(sender.socket, "job-start", job_document(
                "blocker", str(allowed / "vm.img"), hole, timeouts={"handshake": "5m"}))
            sender.wait_job(blocker["id"], ("setup", "active"))
            queued = {
                "file-swap": ok(sender.socket, "job-start", job_document(
                    "file-swap", str(allowed / "vm.img"), receiver.port)),
                "dir-swap": ok(sender.socket, "job-start", job_document(
                    "dir-swap", str(allowed / "sub" / "vm.img"), receiver.port)),
            }
            assert [sender.job(j["id"])["status"] for j in queued.values()] == ["queued"] * 2
            # Swap atomically, as an attacker racing the queue would.
            os.symlink(outside / "vm.img", allowed / "link")
            os.rename(allowed / "link", allowed / "vm.img")
            os.rename(allowed / "sub", allowed / "old-sub")
            os.symlink(outside, allowed / "sub")
            ok(sender.socket, "job-cancel", {"id": blocker["id"]})
            for name, job in queued.items():
                assert sender.wait_job(job["id"])["status"] == "completed"
                sent = read_bytes(os.path.join(storage, name))
                assert sent == original[name] and sent != secret
            # Submitted now, through the links, the same paths are refused.
            for name, source in (("late-file", allowed / "vm.img"),
                                 ("late-dir", allowed / "sub" / "vm.img")):
                refused = execute(sender.socket, "job-start",
                                  job_document(name, str(source), receiver.port))
                assert refused["error"]["class"] == "InvalidArgument"
                assert "is a symbolic link; the sender does not follow links" in (
                    refused["error"]["desc"])
        finally:
            sender.kill()
            receiver.kill()


def test_job_start_refuses_what_it_cannot_send(tmp_path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(allowed / "fifo")
    (allowed / "dir").mkdir()
    (tmp_path / "outside.img").write_bytes(b"x" * 4096)
    os.symlink(tmp_path / "outside.img", allowed / "escape.img")
    cases = {
        str(allowed / "fifo"): "is not a regular file or block device",
        str(allowed / "dir"): "is not a regular file or block device",
        str(allowed / "ghost.img"): "does not exist",
        str(allowed / "escape.img"): "is a symbolic link",
        str(tmp_path / "outside.img"): "is outside the sender's source_dirs",
        str(allowed): "is outside the sender's source_dirs",  # the directory itself
    }
    with short_dir() as directory:
        sender = Daemon.start("sender", directory, {"source_dirs": [str(allowed)]})
        try:
            for source, words in cases.items():
                reply = execute(sender.socket, "job-start", job_document("x", source, 9))
                assert reply["error"]["class"] == "InvalidArgument", (source, reply)
                assert reply["error"]["desc"].startswith("job-start: source: ")
                assert words in reply["error"]["desc"], (source, reply)
            assert ok(sender.socket, "job-list") == []
        finally:
            assert sender.stop() == 0


# -- security defaults and checks at job-start -------------------------------------------


def test_jobs_inherit_security_and_bad_keys_are_refused_at_start(image_factory,
                                                                  tmp_path) -> None:
    image, _, _ = image_factory(MiB + 4096, seed=22)
    with short_dir() as directory:
        pki = make_pki(directory)
        key = write_key(os.path.join(directory, "psk"), os.urandom(32))
        other = write_key(os.path.join(directory, "other"), os.urandom(32))
        short = write_key(os.path.join(directory, "short"), os.urandom(20))
        readable = write_key(os.path.join(directory, "readable"), os.urandom(32), 0o644)
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory, {
            "listen": "127.0.0.1:0", "storage_dir": storage, "security": {"psk_file": key}})
        sender = Daemon.start("sender", directory, {
            "source_dirs": [str(tmp_path)], "security": {"psk_file": key}})
        try:
            # No security of its own: the sender's default key.
            inherited = ok(sender.socket, "job-start",
                           job_document("inherited", image, receiver.port))
            assert sender.wait_job(inherited["id"])["status"] == "completed"
            assert read_bytes(os.path.join(storage, "inherited")) == read_bytes(image)
            # Its own key wins over the default (and here is the wrong one).
            own = ok(sender.socket, "job-start", job_document(
                "own-key", image, receiver.port, retry_for=0, security={"psk_file": other}))
            failed = sender.wait_job(own["id"])
            assert failed["status"] == "failed"
            assert "authentication failed" in failed["error-desc"]

            # Refused by `dsamig start` itself, before anything is queued.
            for name, security, words in (
                ("short", {"psk_file": short},
                 "holds 20 bytes; a key needs at least 32"),
                ("readable", {"psk_file": readable},
                 "is accessible to group or others (mode 0644); chmod 600 it"),
                ("tls-to-ip", {"tls_cert": pki.sender_cert, "tls_key": pki.sender_key},
                 "TLS to the IP address 127.0.0.1 needs --tls-ca"),
            ):
                job_file = write_job(directory, name, image, receiver.port, security=security)
                started = dsamig("start", job_file, "--socket", sender.socket)
                assert started.returncode == EXIT_USAGE, started.stderr
                assert started.stderr.startswith("dsamig: error: job-start: security: ")
                assert words in started.stderr
            names = {job["name"] for job in ok(sender.socket, "job-list")}
            assert names == {"inherited", "own-key"}
        finally:
            sender.kill()
            receiver.kill()
