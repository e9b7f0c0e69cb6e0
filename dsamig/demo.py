"""``dsamig demo`` and ``dsamig make-image``: generate a snapshot, move it over
loopback, prove the copy.

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

from dsamig.errors import ConfigError, SinkError, TransferError
from dsamig.pages.sink import check_output
from dsamig.settings import DEFAULT_ZERO_RATIO, EXIT_OK, EXIT_TRANSFER
from dsamig.units import format_bytes

PAGE = 4096
#: Names of the demo's files in ``--workdir``.
DEMO_IMAGE = "dsamig-demo.img"
DEMO_COPY = "dsamig-demo.received.img"


def generate_image(path: str, size: int, seed: int = 1,
                   zero_ratio: float = DEFAULT_ZERO_RATIO) -> tuple[int, int]:
    """Write a snapshot-like image; return ``(zero_pages, normal_pages)`` it holds.

    Layout, in blocks of 64 pages: some blocks are zero runs (written as
    holes); of the others a quarter hold a single non-zero byte per page at
    offset 0, 2047 or 4095, and the rest are random pages among which some
    are zero.  The share of zero runs and of isolated zero pages is chosen so
    that about ``zero_ratio`` of the pages are zero; the exact counts are
    returned.  The same seed gives the same image.
    """
    if not 0.0 <= zero_ratio <= 1.0:
        raise ConfigError(f"zero ratio must be between 0 and 1, not {zero_ratio:g}")
    # Isolated zero pages appear in 3/4 of the non-run blocks with density
    # `isolated`; runs make up the rest of the ratio.
    isolated = min(1 / 8, zero_ratio * 4 / 3)
    runs = max(0.0, (zero_ratio - 0.75 * isolated) / (1 - 0.75 * isolated))
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
            if rng.random() < runs:  # a zero run: leave the hole
                zero += count
                continue
            if rng.random() < 0.25:  # one byte per page at the edges and in the middle
                block = bytearray(length)
                for i in range(count):
                    offset = i * PAGE + (0, 2047, 4095)[i % 3]
                    if offset < length:
                        block[offset] = 1 + i % 255
                    else:
                        zero += 1  # the short last page kept its zeros
            else:
                block = bytearray(rng.randbytes(length))
                for i in range(count):  # isolated zero pages
                    if rng.random() < isolated:
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
class MakeImageCommand:
    """``dsamig make-image PATH [--size SIZE] [--zero-ratio R] [--seed N]``."""

    path: str
    size: int = 256 * 1024 * 1024
    zero_ratio: float = DEFAULT_ZERO_RATIO
    seed: int = 1
    force: bool = False
    as_json: bool = False

    def run(self) -> int:
        """Write the image and say what it holds; the exit code."""
        check_output(self.path, replace=self.force)
        try:
            zero, normal = generate_image(self.path, self.size, self.seed, self.zero_ratio)
        except OSError as exc:
            raise SinkError(f"cannot write {self.path!r}: {exc.strerror or exc}") from None
        if self.as_json:
            print(json.dumps({"path": os.path.abspath(self.path), "size": self.size,
                              "seed": self.seed, "zero-pages": zero, "normal-pages": normal}),
                  flush=True)
        else:
            print(f"wrote {self.path}: {format_bytes(self.size)} ({self.size} bytes), "
                  f"{zero} zero pages, {normal} normal pages", flush=True)
        return EXIT_OK


@dataclass
class DemoCommand:
    """``dsamig demo [--size SIZE] [--channels N] [--engine E] [--workdir DIR] [--json]``.

    With ``workdir`` the image and its copy stay there (as :data:`DEMO_IMAGE`
    and :data:`DEMO_COPY`); otherwise they live in a temporary directory that
    is removed.  ``--json`` prints one document: both sides' stats and the check.
    """

    size: int = 256 * 1024 * 1024
    channels: int = 4
    engine: str = "auto"
    as_json: bool = False
    workdir: str | None = None

    def run(self) -> int:
        """Generate, move, verify; the exit code."""
        if self.workdir is not None:
            if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
                raise SinkError(f"workdir {self.workdir!r} is not a directory")
            try:
                os.makedirs(self.workdir, exist_ok=True)
            except OSError as exc:
                raise SinkError(f"cannot create workdir {self.workdir!r}: "
                                f"{exc.strerror or exc}") from None
            return self._run(self.workdir)
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        tmp = tempfile.mkdtemp(prefix="dsamig-demo-", dir=base)
        try:
            return self._run(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _say(self, text: str) -> None:
        if not self.as_json:
            print(text, flush=True)

    def _run(self, directory: str) -> int:
        from dsamig.oneshot import SendCommand
        from dsamig.runtime import run_loop
        from dsamig.transport.sender import send_image

        image = os.path.join(directory, DEMO_IMAGE)
        dest = os.path.join(directory, DEMO_COPY)
        for old in (image, dest):  # the demo's own files from an earlier run
            try:
                os.unlink(old)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise SinkError(f"cannot replace {old!r}: {exc.strerror or exc}") from None
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
        sender: dict[str, object] | None = None
        try:
            port = _read_port(receiver)
            self._say(f"receiver listening on 127.0.0.1:{port} (pid {receiver.pid})")
            command = SendCommand(image, f"127.0.0.1:{port}", channels=self.channels,
                                  engine=self.engine, name="demo")
            if self.as_json:  # the sender's stats go into our one document
                sender = run_loop(send_image(image, command.options())).to_dict()
                sent = EXIT_OK
            else:
                sent = command.run()
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
        kept = self.workdir is not None
        if self.as_json:
            print(json.dumps({
                "image": image if kept else None, "copy": dest if kept else None,
                "zero-pages": zero, "normal-pages": normal,
                "sender": sender, "receiver": received, "identical": True,
                "allocated-bytes": allocated,
            }), flush=True)
        else:
            self._say(f"receiver: {received['status']} in {received['total-time']:.0f} ms, "
                      f"{received['duplicate']} zero pages never written")
            self._say(f"verified: destination is byte-identical; it allocates "
                      f"{allocated} bytes for {received['normal-bytes']} bytes of normal pages")
            if kept:
                self._say(f"kept: {image} and its copy {dest}")
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


__all__ = ["EXIT_TRANSFER", "DemoCommand", "MakeImageCommand", "files_identical",
           "generate_image"]
