"""``dsamig demo``: generate a snapshot, move it over loopback, prove the copy.

The receiver runs as a real ``dsamig receive`` subprocess; the sender runs in
this process.  The generated image has long zero runs, isolated zero pages,
random pages and pages whose only non-zero byte sits at offset 0, 2047 or
4095, so every path of the zero-page logic is exercised.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from dsamig.errors import EXIT_OK, EXIT_TRANSFER, SinkError, TransferError
from dsamig.oneshot import SendCommand
from dsamig.transport.sender import SendOptions

PAGE = 4096


def generate_image(path: str, size: int, seed: int = 1) -> tuple[int, int]:
    """Write a snapshot-like image; return ``(zero_pages, normal_pages)`` it holds.

    Layout, in blocks of 64 pages: about a third are zero runs, a sixth hold
    a single non-zero byte per page at 0, 2047 or 4095, the rest are random
    pages with every eighth page zero.  Zero runs are written as holes.
    """
    rng = random.Random(seed)
    pages = -(-size // PAGE)
    zero = 0
    block_pages = 64
    with open(path, "wb") as f:
        f.truncate(size)
        for first in range(0, pages, block_pages):
            count = min(block_pages, pages - first)
            start = first * PAGE
            length = min(count * PAGE, size - start)
            kind = rng.random()
            if kind < 0.33:  # a zero run: leave the hole
                zero += count
                continue
            if kind < 0.5:  # one byte per page at the edges and in the middle
                block = bytearray(length)
                for i in range(count):
                    offset = i * PAGE + (0, 2047, 4095)[i % 3]
                    if offset < length:
                        block[offset] = 1 + i % 255
                    else:
                        zero += 1  # the short last page kept its zeros
            else:
                block = bytearray(rng.randbytes(length))
                for i in range(0, count, 8):  # isolated zero pages
                    block[i * PAGE : min((i + 1) * PAGE, length)] = bytes(
                        min(PAGE, length - i * PAGE)
                    )
                    zero += 1
            f.seek(start)
            f.write(block)
    return zero, pages - zero


def files_identical(a: str, b: str, chunk: int = 1 << 24) -> bool:
    """Byte-for-byte comparison."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


@dataclass
class DemoCommand:
    """``dsamig demo [--size SIZE] [--channels N] [--engine E] [--json]``."""

    size: int = 256 * 1024 * 1024
    channels: int = 4
    engine: str = "auto"
    as_json: bool = False
    workdir: str | None = None

    def run(self) -> int:
        base = self.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        tmp = tempfile.mkdtemp(prefix="dsamig-demo-", dir=base)
        try:
            return self._run(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _say(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def _run(self, tmp: str) -> int:
        image = os.path.join(tmp, "guest-ram.img")
        dest = os.path.join(tmp, "received.img")
        t0 = time.monotonic()
        zero, normal = generate_image(image, self.size)
        self._say(
            f"generated {image}: {self.size} bytes, {zero} zero pages, {normal} normal pages "
            f"({time.monotonic() - t0:.1f} s)"
        )
        receiver = subprocess.Popen(
            [sys.executable, "-m", "dsamig", "receive", "--listen", "127.0.0.1:0",
             "--output", dest, "--once", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            port = _read_port(receiver)
            self._say(f"receiver listening on 127.0.0.1:{port} (pid {receiver.pid})")
            options = SendOptions(host="127.0.0.1", port=port, channels=self.channels,
                                  engine=self.engine, name="demo")
            sent = SendCommand(image, options, as_json=self.as_json).run()
            out, err = receiver.communicate(timeout=60)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        if receiver.returncode != 0 or sent != EXIT_OK:
            raise TransferError(f"receiver exited with {receiver.returncode}: {err.strip()}")
        received = json.loads(out.strip().splitlines()[-1])
        if not files_identical(image, dest):
            raise TransferError(f"{dest} differs from {image}")
        if received["duplicate"] != zero or received["normal"] != normal:
            raise TransferError(
                f"page counts differ: expected {zero} zero / {normal} normal, receiver saw "
                f"{received['duplicate']} / {received['normal']}"
            )
        allocated = os.stat(dest).st_blocks * 512
        if self.as_json:
            print(json.dumps({"receiver": received, "identical": True,
                              "allocated-bytes": allocated}))
        else:
            self._say(f"receiver: {received['status']} in {received['total-time']:.0f} ms, "
                      f"{received['duplicate']} zero pages never written")
            self._say(f"verified: destination is byte-identical; it allocates "
                      f"{allocated} bytes for {received['normal-bytes']} bytes of normal pages")
        return EXIT_OK


def _read_port(receiver: subprocess.Popen[str]) -> int:
    assert receiver.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = receiver.stderr.readline()
        if not line:
            break
        if "listening on" in line:
            return int(line.rsplit(":", 1)[1])
    receiver.kill()
    rest = receiver.stderr.read() if receiver.stderr else ""
    raise SinkError(f"demo receiver did not start: {rest.strip() or 'no output'}")


__all__ = ["EXIT_TRANSFER", "DemoCommand", "files_identical", "generate_image"]
