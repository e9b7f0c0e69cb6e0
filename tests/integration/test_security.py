"""Mutual TLS and the pre-shared key, end to end through the command line.

Whoever is refused is refused before any page data is accepted, and both
sides say why in one line; the receiver goes on serving and nothing is
written for a refused sender.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from dsamig.errors import TransferError
from dsamig.pages import PageSink, PageSource
from dsamig.proto import Hello
from dsamig.security import SecurityConfig
from dsamig.settings import EXIT_OK, EXIT_TRANSFER, EXIT_USAGE
from dsamig.transport.receiver import ReceiverJob, ReceiverServer
from dsamig.transport.sender import Sender, SendOptions
from tests.conftest import read_bytes
from tests.fault.test_bad_input import assert_one_line_error
from tests.helpers_proxy import Fault, FaultProxy
from tests.helpers_tls import Pki, make_pki
from tests.integration.helpers import TIMEOUT_S, Receiver, dsamig

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def keys(tmp_path) -> tuple[str, str]:
    """Two different 32-byte keys in files of mode 0600."""
    paths = []
    for name in ("key-a", "key-b"):
        path = tmp_path / name
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)
        paths.append(str(path))
    return paths[0], paths[1]


def receiver_tls(pki: Pki) -> list[str]:
    return ["--tls-cert", pki.receiver_cert, "--tls-key", pki.receiver_key, "--tls-ca", pki.ca]


def sender_tls(pki: Pki) -> list[str]:
    return ["--tls-cert", pki.sender_cert, "--tls-key", pki.sender_key, "--tls-ca", pki.ca]


def refusals(receiver: Receiver) -> list[str]:
    """Stop the receiver; its ``dsamig: error:`` lines (one per refused peer)."""
    _, _, err = receiver.stop()
    return [line for line in err.splitlines() if line.startswith("dsamig: error:")]


def nothing_written(directory: str, *keep: str) -> bool:
    return sorted(os.listdir(directory)) == sorted(keep)


# -- TLS ----------------------------------------------------------------------------


def test_mutual_tls_transfer(tmp_path, image_factory, pki) -> None:
    image, _, _ = image_factory(3 * MiB + 123, seed=31)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", *receiver_tls(pki))
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "3",
                        *sender_tls(pki))
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert (result.returncode, code) == (EXIT_OK, EXIT_OK), result.stderr + err
    assert read_bytes(output) == read_bytes(image)


@pytest.mark.parametrize(
    ("who", "sender_says", "receiver_says"),
    [
        ("no certificate", "before answering HELLO", "the peer sent no certificate"),
        ("foreign certificate", "receiver closed channel 0",
         "certificate verify failed: unable to get local issuer certificate"),
        ("unknown receiver",
         "certificate verify failed: self-signed certificate in certificate chain",
         "the peer hung up during the handshake"),
        ("plain sender", "before answering HELLO", "the peer does not speak TLS"),
    ],
)
def test_tls_refusals(tmp_path, image_factory, pki, who, sender_says, receiver_says) -> None:
    image, _, _ = image_factory(MiB, seed=32)
    output = str(tmp_path / "dest.img")
    args = {
        "no certificate": ["--tls-ca", pki.ca],
        "foreign certificate": ["--tls-cert", pki.rogue_cert, "--tls-key", pki.rogue_key,
                                "--tls-ca", pki.ca],
        "unknown receiver": ["--tls-cert", pki.sender_cert, "--tls-key", pki.sender_key,
                             "--tls-ca", pki.rogue_ca],
        "plain sender": [],
    }[who]
    receiver = Receiver.start(output, *receiver_tls(pki))
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "1",
                        "--retry-for", "0", *args)
        assert receiver.proc.poll() is None, "the receiver must go on serving"
    finally:
        errors = refusals(receiver)
        receiver.kill()
    assert result.returncode == EXIT_TRANSFER, result.stderr
    assert_one_line_error(result.stderr, sender_says)
    assert len(errors) == 1, errors
    assert "refused a connection from 127.0.0.1:" in errors[0] and receiver_says in errors[0]
    assert nothing_written(str(tmp_path), os.path.basename(image))


def test_tls_sender_to_a_plain_receiver(tmp_path, image_factory, pki) -> None:
    image, _, _ = image_factory(MiB, seed=33)
    receiver = Receiver.start(str(tmp_path / "dest.img"))
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", *sender_tls(pki))
    finally:
        errors = refusals(receiver)
        receiver.kill()
    assert result.returncode == EXIT_TRANSFER
    assert_one_line_error(result.stderr, "TLS handshake with receiver", "does not speak TLS")
    assert len(errors) == 1 and "a TLS client: is TLS configured on both sides?" in errors[0]


def test_server_name(tmp_path, image_factory, pki) -> None:
    # --tls-server-name replaces the host of --to as the name the receiver's
    # certificate must carry.
    image, _, _ = image_factory(MiB, seed=34)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, *receiver_tls(pki))
    try:
        wrong = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}",
                       "--tls-server-name", "other.test", *sender_tls(pki))
        right = dsamig("send", image, "--to", f"localhost:{receiver.port}", "--channels", "1",
                       "--tls-server-name", "receiver.test", *sender_tls(pki))
    finally:
        receiver.kill()
    assert wrong.returncode == EXIT_TRANSFER
    assert_one_line_error(wrong.stderr, "Hostname mismatch", "other.test")
    assert right.returncode == EXIT_OK, right.stderr
    assert read_bytes(output) == read_bytes(image)


def test_bad_tls_files_are_usage_errors(tmp_path, image_factory, pki) -> None:
    image, _, _ = image_factory(4096)
    missing = dsamig("send", image, "--to", "127.0.0.1:9", "--tls-ca", str(tmp_path / "no.pem"))
    assert missing.returncode == EXIT_USAGE
    assert_one_line_error(missing.stderr, "TLS CA file", "does not exist")
    swapped = dsamig("send", image, "--to", "127.0.0.1:9", "--tls-cert", pki.sender_cert,
                     "--tls-key", pki.receiver_key, "--tls-ca", pki.ca)
    assert swapped.returncode == EXIT_USAGE
    assert_one_line_error(swapped.stderr, "cannot load TLS certificate and key")
    keyless = dsamig("receive", "--listen", "127.0.0.1:0", "--output", str(tmp_path / "x"),
                     "--tls-ca", pki.ca)
    assert keyless.returncode == EXIT_USAGE
    assert_one_line_error(keyless.stderr, "a TLS receiver needs --tls-cert")


def test_an_ip_address_must_be_in_the_certificate(tmp_path, image_factory, pki) -> None:
    # The receiver's certificate names only receiver.test: reached by IP it
    # is refused, whoever signed it, unless --tls-server-name names it.
    image, _, _ = image_factory(MiB + 1, seed=40)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--tls-cert", pki.dns_only_cert, "--tls-key",
                              pki.dns_only_key, "--tls-ca", pki.ca)
    try:
        by_ip = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "1",
                       "--retry-for", "0", *sender_tls(pki))
        assert not os.path.exists(output)
        named = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "1",
                       "--tls-server-name", "receiver.test", *sender_tls(pki))
    finally:
        receiver.kill()
    assert by_ip.returncode == EXIT_TRANSFER
    assert_one_line_error(by_ip.stderr, "IP address mismatch", "127.0.0.1",
                          "or give --tls-server-name")
    assert named.returncode == EXIT_OK, named.stderr
    assert read_bytes(output) == read_bytes(image)


def test_tls_to_an_ip_address_needs_a_ca(tmp_path, image_factory, pki) -> None:
    # The system's CAs do not vouch for private addresses: refused before
    # any connection (nothing listens on port 9), saying what to add.
    image, _, _ = image_factory(4096)
    refused = dsamig("send", image, "--to", "127.0.0.1:9", "--tls-cert", pki.sender_cert,
                     "--tls-key", pki.sender_key)
    assert refused.returncode == EXIT_USAGE
    assert_one_line_error(refused.stderr, "TLS to the IP address 127.0.0.1 needs --tls-ca",
                          "or --tls-server-name")
    # A name to check is enough to go on (and here find nobody listening).
    named = dsamig("send", image, "--to", "127.0.0.1:9", "--tls-server-name", "receiver.test",
                   "--tls-cert", pki.sender_cert, "--tls-key", pki.sender_key)
    assert_one_line_error(named.stderr, "cannot connect to receiver 127.0.0.1:9")


def test_one_shot_receive_warns_when_others_can_reach_it(tmp_path, keys) -> None:
    def warnings(host: str, *args: str) -> list[str]:
        receiver = Receiver.start(str(tmp_path / "x"), *args, host=host)
        receiver.stop()
        return receiver.before

    exposed = warnings("0.0.0.0")
    assert len(exposed) == 1
    assert exposed[0].startswith(
        "dsamig: warning: listening on 0.0.0.0:0 without authenticating senders: anyone who "
        "can reach it can send an image to")
    assert "--psk-file" in exposed[0]
    assert warnings("0.0.0.0", "--psk-file", keys[0]) == []
    assert warnings("127.0.0.1") == []


# -- pre-shared key -------------------------------------------------------------------


def test_hex_and_raw_key_files_hold_the_same_key(tmp_path, image_factory) -> None:
    # One host wrote its key with `openssl rand -hex 32` (a trailing newline
    # included), the other holds the same 32 bytes raw: they agree.
    image, _, _ = image_factory(MiB + 3, seed=41)
    hex_key = tmp_path / "hex.key"
    with open(hex_key, "wb") as f:
        subprocess.run(["openssl", "rand", "-hex", "32"], stdout=f, check=True, timeout=60)
    hex_key.chmod(0o600)
    text = hex_key.read_bytes()
    assert len(text) == 65 and text.endswith(b"\n")
    raw_key = tmp_path / "raw.key"
    raw_key.write_bytes(bytes.fromhex(text.decode()))
    raw_key.chmod(0o600)
    output = str(tmp_path / "out" / "dest.img")
    os.mkdir(os.path.dirname(output))
    receiver = Receiver.start(output, "--once", "--psk-file", str(hex_key))
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}",
                        "--psk-file", str(raw_key))
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert (result.returncode, code) == (EXIT_OK, EXIT_OK), result.stderr + err
    assert read_bytes(output) == read_bytes(image)
    # A key written by `echo` (text and a newline) is refused, saying how to write one.
    echoed = tmp_path / "echoed.key"
    echoed.write_bytes(b"correct horse battery staple, really long\n")
    echoed.chmod(0o600)
    refused = dsamig("send", image, "--to", "127.0.0.1:9", "--psk-file", str(echoed))
    assert refused.returncode == EXIT_USAGE
    assert_one_line_error(refused.stderr, "is text ending in a newline but not hex digits",
                          "head -c 32 /dev/urandom >", "openssl rand -hex 32 >")


def test_psk_transfer(tmp_path, image_factory, keys) -> None:
    image, _, _ = image_factory(2 * MiB + 77, seed=35)
    output = str(tmp_path / "out" / "dest.img")
    os.mkdir(os.path.dirname(output))
    receiver = Receiver.start(output, "--once", "--psk-file", keys[0])
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "4",
                        "--psk-file", keys[0])
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert (result.returncode, code) == (EXIT_OK, EXIT_OK), result.stderr + err
    assert "warning" not in result.stderr + err
    assert read_bytes(output) == read_bytes(image)


@pytest.mark.parametrize(
    ("case", "sender_says", "receiver_says"),
    [
        ("wrong key", "authentication failed: the receiver does not hold this sender's",
         "sender failed the job (AUTH)"),
        ("no key on the sender", "(AUTH)", "this receiver requires a pre-shared key"),
        ("no key on the receiver", "(AUTH)", "but this receiver has none configured"),
    ],
)
def test_psk_refusals(tmp_path, image_factory, keys, case, sender_says, receiver_says) -> None:
    image, _, _ = image_factory(MiB, seed=36)
    output = str(tmp_path / "out" / "dest.img")
    os.mkdir(os.path.dirname(output))
    receiver_key = [] if case == "no key on the receiver" else ["--psk-file", keys[0]]
    sender_key = {"wrong key": ["--psk-file", keys[1]], "no key on the sender": [],
                  "no key on the receiver": ["--psk-file", keys[0]]}[case]
    receiver = Receiver.start(output, *receiver_key)
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "2",
                        "--retry-for", "0", *sender_key)
        assert receiver.proc.poll() is None
    finally:
        errors = refusals(receiver)
        receiver.kill()
    assert result.returncode == EXIT_TRANSFER, result.stderr
    assert_one_line_error(result.stderr, sender_says)
    assert len(errors) == 1, errors
    assert receiver_says in errors[0]
    assert os.listdir(os.path.dirname(output)) == []


def test_psk_file_checks(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(4096)
    short = tmp_path / "short"
    short.write_bytes(b"0123456789")
    result = dsamig("send", image, "--to", "127.0.0.1:9", "--psk-file", str(short))
    assert result.returncode == EXIT_USAGE
    assert_one_line_error(result.stderr, "holds 10 hex digits (5 bytes); a key needs at least 32",
                          "openssl rand -hex 32 >")
    missing = dsamig("send", image, "--to", "127.0.0.1:9", "--psk-file", str(tmp_path / "nope"))
    assert missing.returncode == EXIT_USAGE
    assert_one_line_error(missing.stderr, "PSK file", "does not exist")
    # Readable by others: a warning, then the command goes on (here: nobody listens).
    open_key = tmp_path / "open"
    open_key.write_bytes(os.urandom(48))
    open_key.chmod(0o644)
    warned = dsamig("send", image, "--to", "127.0.0.1:9", "--psk-file", str(open_key))
    assert "dsamig: warning: PSK file" in warned.stderr
    assert "(mode 0644); chmod 600" in warned.stderr
    assert_one_line_error(warned.stderr, "cannot connect")
    assert stat.S_IMODE(os.stat(open_key).st_mode) == 0o644  # we warn, we do not touch


def test_tls_and_psk_together(tmp_path, image_factory, pki, keys) -> None:
    image, _, _ = image_factory(MiB + 5, seed=37)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", "--psk-file", keys[0], *receiver_tls(pki))
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "2",
                        "--psk-file", keys[0], *sender_tls(pki))
        code, _, err = receiver.finish()
    finally:
        receiver.kill()
    assert (result.returncode, code) == (EXIT_OK, EXIT_OK), result.stderr + err
    assert read_bytes(output) == read_bytes(image)


async def test_refused_peer_gets_no_job(tmp_path, image_factory, keys) -> None:
    # In process: a wrong key never reaches the sink factory, so no job and
    # no file exist for it, while a right key goes through on the same server.
    image, _, _ = image_factory(MiB, seed=38)
    made: list[str] = []
    finished: asyncio.Future[ReceiverJob] = asyncio.get_running_loop().create_future()
    refused: list[str] = []

    def sink(hello: Hello) -> PageSink:
        assert hello.manifest is not None
        made.append(hello.name)
        return PageSink(str(tmp_path / hello.name), hello.manifest.image_size)

    server = ReceiverServer("127.0.0.1", 0, sink, security=SecurityConfig(psk_file=keys[0]),
                            on_refused=refused.append,
                            on_job_finished=lambda job: finished.set_result(job))
    _, port = await server.start()
    source = PageSource(image)
    try:
        with pytest.raises(TransferError, match="authentication failed"):
            await Sender(source, SendOptions(host="127.0.0.1", port=port, name="intruder",
                                             retry_for_s=0,
                                             security=SecurityConfig(psk_file=keys[1]))).run()
        await Sender(source, SendOptions(host="127.0.0.1", port=port, name="friend",
                                         security=SecurityConfig(psk_file=keys[0]))).run()
        job = await asyncio.wait_for(finished, TIMEOUT_S)
    finally:
        source.close()
        await server.close()
    assert made == ["friend"]
    assert job.stats.status == "completed"
    assert len(refused) == 1 and "(AUTH)" in refused[0]
    assert read_bytes(str(tmp_path / "friend")) == read_bytes(image)


async def test_psk_on_every_reconnection(tmp_path, image_factory, keys) -> None:
    # A channel cut mid-transfer: the sender reconnects and every new
    # connection authenticates again with fresh nonces before it is resumed.
    image, _, _ = image_factory(8 * MiB, seed=39, zero_every=0)
    output = str(tmp_path / "dest.img")
    finished: asyncio.Future[ReceiverJob] = asyncio.get_running_loop().create_future()

    def sink(hello: Hello) -> PageSink:
        assert hello.manifest is not None
        return PageSink(output, hello.manifest.image_size)

    server = ReceiverServer("127.0.0.1", 0, sink, security=SecurityConfig(psk_file=keys[0]),
                            on_job_finished=lambda job: finished.set_result(job))
    _, port = await server.start()
    proxy = FaultProxy(port, [Fault(cut_after=2 * MiB)])
    proxy_port = await proxy.start()
    source = PageSource(image)
    try:
        sender = Sender(source, SendOptions(host="127.0.0.1", port=proxy_port, channels=2,
                                            security=SecurityConfig(psk_file=keys[0])))
        stats = await asyncio.wait_for(sender.run(), TIMEOUT_S)
        job = await asyncio.wait_for(finished, TIMEOUT_S)
    finally:
        source.close()
        await proxy.close()
        await server.close()
    assert proxy.connections[0].cut
    assert stats.counters.sessions >= 2 and len(proxy.connections) >= 4
    assert job.stats.status == "completed"
    assert read_bytes(output) == read_bytes(image)


# -- the recipes in docs/operations.md ------------------------------------------------------


def recipe(name: str) -> str:
    """The shell block that follows ``<!-- recipe: NAME`` in docs/operations.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    match = re.search(rf"<!-- recipe: {name}\b[^\n]*-->\n```sh\n(.*?)```", text, re.S)
    assert match, f"docs/operations.md has no recipe {name!r}"
    return match.group(1)


def test_the_documented_recipes_work(tmp_path, image_factory) -> None:
    # The CA, certificate and key commands an operator copies, run as they
    # are written (the receiver's example address swapped for loopback).
    pki = recipe("pki").replace("IP:192.0.2.10", "IP:127.0.0.1")
    for block in (pki, recipe("psk")):
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "psk").st_mode) == 0o600

    def path(name: str) -> str:
        return str(tmp_path / name)

    image, _, _ = image_factory(MiB + 9, seed=42)
    for host in ("127.0.0.1", "dest.example.net"):
        output = str(tmp_path / f"dest-{host}.img")
        receiver = Receiver.start(output, "--once", "--tls-cert", path("receiver.pem"),
                                  "--tls-key", path("receiver.key"), "--tls-ca", path("ca.pem"),
                                  "--psk-file", path("psk"))
        try:
            # The example name does not resolve here: connect to the address,
            # and ask for the name.
            name = [] if host == "127.0.0.1" else ["--tls-server-name", host]
            result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", *name,
                            "--tls-cert", path("sender.pem"), "--tls-key", path("sender.key"),
                            "--tls-ca", path("ca.pem"), "--psk-file", path("psk"))
            code, _, err = receiver.finish()
        finally:
            receiver.kill()
        assert (result.returncode, code) == (EXIT_OK, EXIT_OK), result.stderr + err
        assert "warning" not in result.stderr + err
        assert read_bytes(output) == read_bytes(image)
