"""Bad input: a one-line error naming the problem, an exit code, no final file."""

from __future__ import annotations

import os
import socket
import struct
import threading
import uuid

import pytest

from dsamig.proto import PREAMBLE, Hello, Manifest, encode
from dsamig.settings import EXIT_LOCAL_IO, EXIT_NETWORK, EXIT_TRANSFER, EXIT_USAGE
from tests.integration.helpers import Receiver, dsamig, refused_port


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line]
    assert lines, "no error message"
    assert "Traceback" not in stderr, stderr
    error = lines[-1]
    assert error.startswith("dsamig: error: "), stderr
    for needle in needles:
        assert needle in error, error


def test_port_in_use(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = dsamig("receive", "--listen", f"127.0.0.1:{port}", "--output",
                        str(tmp_path / "x"), "--once")
    assert result.returncode == EXIT_NETWORK
    assert_one_line_error(result.stderr, f"127.0.0.1:{port}", "in use")


def test_receiver_unreachable(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(4096)
    with refused_port() as port:
        result = dsamig("send", image, "--to", f"127.0.0.1:{port}")
    assert result.returncode == EXIT_NETWORK
    assert_one_line_error(result.stderr, f"127.0.0.1:{port}", "refused")


def test_missing_image(tmp_path) -> None:
    result = dsamig("send", str(tmp_path / "nope.img"), "--to", "127.0.0.1:9")
    assert result.returncode == EXIT_LOCAL_IO
    assert_one_line_error(result.stderr, "nope.img", "does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_image(tmp_path) -> None:
    image = tmp_path / "secret.img"
    image.write_bytes(b"x")
    image.chmod(0)
    result = dsamig("send", str(image), "--to", "127.0.0.1:9")
    assert result.returncode == EXIT_LOCAL_IO
    assert_one_line_error(result.stderr, "secret.img", "permission denied")


def test_image_is_a_directory(tmp_path) -> None:
    result = dsamig("send", str(tmp_path), "--to", "127.0.0.1:9")
    assert result.returncode == EXIT_LOCAL_IO
    assert_one_line_error(result.stderr, "is a directory")


def test_missing_output_directory(tmp_path) -> None:
    output = tmp_path / "no" / "such" / "dir" / "out.img"
    result = dsamig("receive", "--listen", "127.0.0.1:0", "--output", str(output), "--once")
    assert result.returncode == EXIT_LOCAL_IO
    assert_one_line_error(result.stderr, "does not exist", str(output.parent))


def test_bad_options(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(4096)
    result = dsamig("send", image, "--to", "127.0.0.1:9", "--channels", "0")
    assert result.returncode == EXIT_USAGE
    assert_one_line_error(result.stderr, "channels must be 1..64")
    result = dsamig("send", image, "--to", "localhost:99999")
    assert result.returncode == EXIT_USAGE
    assert_one_line_error(result.stderr, "port 99999 out of range")
    result = dsamig("send", image, "--to", "127.0.0.1:9", "--packet-size", "12345")
    assert result.returncode == EXIT_USAGE
    assert_one_line_error(result.stderr, "packet_size")


class FakePeer:
    """A TCP server on loopback that plays a scripted receiver."""

    def __init__(self, script) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script) -> None:
        self.sock.settimeout(30)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            script(conn)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(timeout=10)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_receiver_sends_garbage(image_factory) -> None:
    image, _, _ = image_factory(1024 * 1024, seed=1)

    def garbage(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    peer = FakePeer(garbage)
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{peer.port}", "--channels", "1")
    finally:
        peer.close()
    assert result.returncode == EXIT_TRANSFER
    assert_one_line_error(result.stderr, "channel 0")


def test_receiver_closes_mid_transfer(image_factory) -> None:
    image, _, _ = image_factory(8 * 1024 * 1024, seed=1, zero_every=0)

    def welcome_then_close(conn: socket.socket) -> None:
        hello = recv_exact(conn, 8 + 8 + 32 + 32 + 4)  # preamble, header, body, manifest, name
        job_id = hello[8 + 8 + 8 : 8 + 8 + 24]
        body = struct.pack("<HHI", 1, 0, 0) + job_id
        conn.sendall(struct.pack("<BBHI", 0x02, 0, 0, len(body)) + body)
        recv_exact(conn, 300_000)  # part of the data, then hang up

    peer = FakePeer(welcome_then_close)
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{peer.port}", "--channels", "1",
                        "--name", "demo")
    finally:
        peer.close()
    assert result.returncode == EXIT_TRANSFER
    assert_one_line_error(result.stderr, "receiver closed channel 0")


def test_receiver_speaks_another_version(image_factory) -> None:
    image, _, _ = image_factory(4096)

    def error_version(conn: socket.socket) -> None:
        conn.recv(4096)
        message = b"protocol version 1 not supported (this receiver speaks 2)"
        body = struct.pack("<HH", 2, len(message)) + message
        conn.sendall(struct.pack("<BBHI", 0x7F, 0, 0, len(body)) + body)

    peer = FakePeer(error_version)
    try:
        result = dsamig("send", image, "--to", f"127.0.0.1:{peer.port}", "--channels", "1")
    finally:
        peer.close()
    assert result.returncode == EXIT_TRANSFER
    assert_one_line_error(result.stderr, "VERSION", "speaks 2")


def _hello_bytes(version: int = 1, size: int = 4 * 1024 * 1024) -> bytes:
    manifest = Manifest(image_size=size)
    hello = Hello(job_id=uuid.uuid4(), channel_index=0, channel_count=1, manifest=manifest)
    raw = bytearray(encode(hello))
    struct.pack_into("<H", raw, 8, version)  # the version field of the HELLO body
    return PREAMBLE + bytes(raw)


def _receive_answer(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return data


def test_sender_speaks_another_version(tmp_path) -> None:
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output)
    try:
        answer = _receive_answer(receiver.port, _hello_bytes(version=2))
        assert answer[0] == 0x7F  # ERROR
        code = struct.unpack_from("<H", answer, 8)[0]
        assert code == 2  # VERSION
        assert b"protocol version 2 not supported" in answer
        # The receiver is still serving: a good sender can come next.
        assert receiver.proc.poll() is None
    finally:
        receiver.kill()
    assert not os.path.exists(output)
    assert not os.path.exists(output + ".partial")


def test_garbage_on_the_data_port(tmp_path) -> None:
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output)
    try:
        answer = _receive_answer(receiver.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer[0] == 0x7F
        assert b"bad preamble" in answer
        assert receiver.proc.poll() is None
    finally:
        receiver.kill()
    assert not os.path.exists(output)


def test_sender_closes_mid_transfer(tmp_path) -> None:
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", "--json")
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as conn:
            conn.sendall(_hello_bytes())
            assert recv_exact(conn, 8)[0] == 0x02  # WELCOME header
            # A packet header announcing 512 KiB of payload, then only part of it.
            bitmap = bytes(16)
            body = struct.pack("<QQIIIHH", 0, 0, 128, 128 * 4096, 0, 0, 0) + bitmap
            conn.sendall(struct.pack("<BBHI", 0x10, 0, 0, len(body)) + body + b"\x01" * 70000)
        code, _out, err = receiver.finish()
    finally:
        receiver.kill()
    assert code == EXIT_TRANSFER
    assert "mid-transfer" in err or "closed" in err
    assert not os.path.exists(output)
    assert not os.path.exists(output + ".partial")
