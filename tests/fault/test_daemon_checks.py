"""``--check`` runs every check start-up runs: the two never disagree.

Each bad config here is given to ``dsamig ROLE --config FILE --check`` and
to the daemon itself; both must fail with the same exit code and the same
one-line error, before anything is bound.  A good config passes ``--check``
and starts.  The examples in configs/ are held to the same rule: as shipped
(their files do not exist here) they fail both ways alike, and with their
files in place they pass ``--check`` and start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from dsamig.settings import EXIT_LOCAL_IO, EXIT_NETWORK, EXIT_OK, EXIT_USAGE
from tests.helpers_tls import make_pki
from tests.integration.daemon_helpers import Daemon, execute, short_dir, wait_for
from tests.integration.helpers import dsamig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def directory() -> Iterator[str]:
    with short_dir() as path:
        os.mkdir(os.path.join(path, "images"))
        yield path


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("dsamig: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def check_and_start(role: str, path: str) -> tuple[int, str]:
    """Run ``--check`` and the daemon on ``path``; both must fail alike: (code, error)."""
    checked = dsamig(role, "--config", path, "--check")
    started = dsamig(role, "--config", path)
    assert checked.returncode != EXIT_OK, checked.stdout
    assert (started.returncode, error_line(started.stderr)) == (
        checked.returncode, error_line(checked.stderr))
    assert "None" not in checked.stderr
    return checked.returncode, error_line(checked.stderr)


def write_key(path: str, key: bytes, mode: int = 0o600) -> str:
    with open(path, "wb") as f:
        f.write(key)
    os.chmod(path, mode)
    return path


def receiver_config(directory: str, **extra: object) -> dict[str, object]:
    return {"listen": "127.0.0.1:0", "storage_dir": os.path.join(directory, "images"),
            "control_socket": os.path.join(directory, "receiver.sock"), **extra}


def sender_config(directory: str, **extra: object) -> dict[str, object]:
    return {"source_dirs": [directory],
            "control_socket": os.path.join(directory, "sender.sock"), **extra}


def write_config(directory: str, role: str, config: dict[str, object]) -> str:
    path = os.path.join(directory, f"{role}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


Case = Callable[[str, int], tuple[str, dict[str, object]]]

CASES: dict[str, tuple[Case, int, str]] = {
    "storage_dir missing": (
        lambda d, _: ("receiver", receiver_config(d, storage_dir=os.path.join(d, "none"))),
        EXIT_LOCAL_IO, "storage_dir '{d}/none' does not exist"),
    "listen address taken": (
        lambda d, port: ("receiver", receiver_config(d, listen=f"127.0.0.1:{port}")),
        EXIT_NETWORK, "cannot listen on 127.0.0.1:{port}: "),
    "metrics address taken": (
        lambda d, port: ("sender", sender_config(d, metrics_listen=f"127.0.0.1:{port}")),
        EXIT_NETWORK, "cannot listen for metrics on 127.0.0.1:{port}: "),
    "control socket directory missing": (
        lambda d, _: ("sender", sender_config(d, control_socket=os.path.join(d, "no", "s.sock"))),
        EXIT_NETWORK, "control socket directory '{d}/no' does not exist"),
    "control socket group missing": (
        lambda d, _: ("receiver", receiver_config(d, control_group="no-such-group-dsamig")),
        EXIT_NETWORK, "to group 'no-such-group-dsamig': no such group"),
    "short pre-shared key": (
        lambda d, _: ("receiver", receiver_config(d, security={
            "psk_file": write_key(os.path.join(d, "psk"), os.urandom(16))})),
        EXIT_USAGE, "holds 16 bytes; a key needs at least 32"),
    "pre-shared key others can read": (
        lambda d, _: ("receiver", receiver_config(d, security={
            "psk_file": write_key(os.path.join(d, "psk"), os.urandom(32), 0o640)})),
        EXIT_USAGE, "is accessible to group or others (mode 0640); chmod 600 it (the daemons "
                    "refuse such a key)"),
    "sender default key others can read": (
        lambda d, _: ("sender", sender_config(d, security={
            "psk_file": write_key(os.path.join(d, "psk"), os.urandom(32), 0o604)})),
        EXIT_USAGE, "(mode 0604); chmod 600 it"),
    "TLS certificate missing": (
        lambda d, _: ("receiver", receiver_config(d, security={
            "tls_cert": os.path.join(d, "cert.pem")})),
        EXIT_USAGE, "TLS certificate file '{d}/cert.pem' does not exist"),
    "exposed without authentication": (
        lambda d, _: ("receiver", receiver_config(d, listen="0.0.0.0:0")),
        EXIT_USAGE, "listen: 0.0.0.0:0 is not a loopback address and the receiver does not "
                    "authenticate senders"),
    "source_dirs entry missing": (
        lambda d, _: ("sender", sender_config(d, source_dirs=[os.path.join(d, "vms")])),
        EXIT_LOCAL_IO, "source_dirs: '{d}/vms' does not exist"),
    "no source_dirs": (
        lambda d, _: ("sender", {"control_socket": os.path.join(d, "sender.sock")}),
        EXIT_USAGE, "missing required key 'source_dirs': list the directories jobs may send "
                    "images from"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_fails_exactly_as_start_up(directory: str, taken_port: int, case: str) -> None:
    build, code, words = CASES[case]
    role, config = build(directory, taken_port)
    path = write_config(directory, role, config)
    failed_with, line = check_and_start(role, path)
    assert failed_with == code
    assert words.format(d=directory, port=taken_port) in line
    assert not os.path.exists(os.path.join(directory, f"{role}.sock"))  # nothing was bound


def test_check_fails_on_a_running_daemons_socket(directory: str) -> None:
    # A second daemon on the same control socket would be refused; so is --check.
    running = Daemon.start("sender", directory, sender_config(directory))
    try:
        path = write_config(directory, "sender", sender_config(directory))
        code, line = check_and_start("sender", path)
        assert code == EXIT_NETWORK
        assert "is in use by another running daemon" in line
    finally:
        assert running.stop() == 0


def test_opting_out_of_authentication_starts_with_a_warning(directory: str) -> None:
    config = receiver_config(directory, listen="0.0.0.0:0",
                             security={"allow_unauthenticated": True})
    path = write_config(directory, "receiver", config)
    checked = dsamig("receiver", "--config", path, "--check")
    assert checked.returncode == EXIT_OK, checked.stderr
    assert "dsamig: warning: listening on 0.0.0.0:0 without authenticating senders" in (
        checked.stderr)
    receiver = Daemon.start("receiver", directory, config)
    try:
        warned = [e for e in receiver.log_events() if e.get("event") == "configuration warning"]
        assert "without authenticating senders" in warned[0]["warning"]
    finally:
        assert receiver.stop() == 0


def test_a_key_or_client_certificates_allow_any_address(directory: str) -> None:
    pki = make_pki(directory)
    key = write_key(os.path.join(directory, "psk"), os.urandom(32))
    server = {"tls_cert": pki.receiver_cert, "tls_key": pki.receiver_key}
    for security in ({"psk_file": key}, {**server, "tls_ca": pki.ca}):
        path = write_config(directory, "receiver",
                            receiver_config(directory, listen="0.0.0.0:0", security=security))
        checked = dsamig("receiver", "--config", path, "--check")
        assert checked.returncode == EXIT_OK, checked.stderr
        assert "warning" not in checked.stderr
    # TLS without client certificates encrypts, but lets any sender in.
    path = write_config(directory, "receiver",
                        receiver_config(directory, listen="0.0.0.0:0", security=server))
    assert "does not authenticate senders" in check_and_start("receiver", path)[1]


# -- the shipped examples -----------------------------------------------------------------


def _serve(role: str, path: str, socket_path: str) -> None:
    """Start the daemon on ``path``, wait until it answers, stop it cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "dsamig", role, "--config", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{role} exited {proc.returncode}: {proc.stderr}")
            try:
                return "return" in execute(socket_path, "query-daemon")
            except OSError:
                return False

        wait_for(answers, 15, 0.05, f"{role} to answer")
        proc.terminate()
        assert proc.wait(20) == EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes its pipe


@pytest.mark.parametrize("role", ["receiver", "sender"])
def test_shipped_examples_check_as_they_start(role: str) -> None:
    example = str(ROOT / "configs" / f"{role}.yaml")
    checked = dsamig(role, "--config", example, "--check")
    if checked.returncode == EXIT_OK:  # a host laid out as the example expects
        with open(example) as f:
            _serve(role, example, yaml.safe_load(f)["control_socket"])
    else:
        check_and_start(role, example)


@pytest.mark.parametrize("role", ["receiver", "sender"])
def test_examples_with_their_files_in_place_check_and_start(role: str) -> None:
    with short_dir() as root:
        text = (ROOT / "configs" / f"{role}.yaml").read_text()
        for old, new in (("/etc/dsamig", f"{root}/etc"), ("/var/lib/dsamig", f"{root}/lib"),
                         ("/run/dsamig", f"{root}/run"), ("/var/lib/vms", f"{root}/vms"),
                         (":7780", ":0"), (":9780", ":0"), (":9781", ":0")):
            text = text.replace(old, new)
        for sub in ("etc/tls", "lib/images", "run", "vms"):
            os.makedirs(os.path.join(root, sub))
        make_pki(os.path.join(root, "etc", "tls"))  # ca.pem, receiver.pem/.key, sender.pem/.key
        path = os.path.join(root, f"{role}.yaml")
        with open(path, "w") as f:
            f.write(text)
        checked = dsamig(role, "--config", path, "--check")
        assert checked.returncode == EXIT_OK, checked.stderr
        assert "start-up checks passed" in checked.stdout
        _serve(role, path, f"{root}/run/{role}.sock")
