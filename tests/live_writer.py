"""A writer that dirties a MAP_SHARED image at a controlled rate, for live-transfer tests.

Run as a process (``python tests/live_writer.py IMAGE --seed 1 --rate 5000``)
and steer it with :class:`LiveWriter`.  Its writes follow :func:`plan`, a
sequence fixed by the seed alone, so :func:`replay` rebuilds the image after
any number of writes, whatever the timing was.  Each write picks a random
page and either zeroes it (data to zero), writes a whole page of random
bytes, or pokes 8 random non-zero bytes into it (zero to data when the page
was zero).  After each write the process stores its count of finished
writes in the counter file (a native-endian u64).

The process prints ``ready`` once the image is mapped, stops after
``--max-writes`` writes (exit 0), and is paused and continued with
SIGSTOP/SIGCONT by the tests and by ``--pause-cmd``/``--resume-cmd``.
Standard library only: it runs under any Python 3.11.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

ZERO, DATA, POKE = "zero", "data", "poke"


@dataclass(frozen=True, slots=True)
class Write:
    """One write of the plan: ``payload`` goes at byte ``offset`` of page ``page``."""

    page: int
    kind: str
    offset: int
    payload: bytes


def plan(seed: int, image_size: int, page_size: int = 4096, *, zero_fraction: float = 0.2,
         poke_fraction: float = 0.3) -> Iterator[Write]:
    """The writes of a writer with ``seed``, in order, without end."""
    rng = random.Random(seed)
    pages = -(-image_size // page_size)
    while True:
        page = rng.randrange(pages)
        length = min(page_size, image_size - page * page_size)
        roll = rng.random()
        if roll < zero_fraction:
            yield Write(page, ZERO, 0, bytes(length))
        elif roll < zero_fraction + poke_fraction and length >= 8:
            offset = rng.randrange(length // 8) * 8
            payload = bytearray(rng.randbytes(8))
            payload[0] |= 1
            yield Write(page, POKE, offset, bytes(payload))
        else:
            yield Write(page, DATA, 0, rng.randbytes(length))


def apply(buf: bytearray | mmap.mmap, write: Write, page_size: int) -> None:
    """Apply one write of the plan to ``buf``."""
    start = write.page * page_size + write.offset
    buf[start : start + len(write.payload)] = write.payload


def replay(initial: bytes, seed: int, writes: int, page_size: int = 4096, **fractions: float
           ) -> bytearray:
    """The image after the first ``writes`` writes of the plan, from ``initial``."""
    image = bytearray(initial)
    steps = plan(seed, len(image), page_size, **fractions)
    for _ in range(writes):
        apply(image, next(steps), page_size)
    return image


def writes_due(rate: float, elapsed_s: float) -> int:
    """Writes a writer at ``rate`` per second owes after ``elapsed_s`` (0: no limit)."""
    return int(rate * elapsed_s) if rate > 0 else sys.maxsize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--counter", required=True, help="file that receives the write count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0, help="writes per second (0: no limit)")
    parser.add_argument("--page-size", type=int, default=4096)
    parser.add_argument("--zero-fraction", type=float, default=0.2)
    parser.add_argument("--poke-fraction", type=float, default=0.3)
    parser.add_argument("--max-writes", type=int, default=0, help="stop after N (0: never)")
    args = parser.parse_args(argv)
    with open(args.counter, "wb") as f:
        f.write(bytes(8))
    with open(args.image, "r+b") as img, open(args.counter, "r+b") as cnt, \
            mmap.mmap(img.fileno(), 0) as image, mmap.mmap(cnt.fileno(), 8) as counter:
        steps = plan(args.seed, len(image), args.page_size, zero_fraction=args.zero_fraction,
                     poke_fraction=args.poke_fraction)
        print("ready", flush=True)
        start = time.monotonic()
        done = 0
        while not args.max_writes or done < args.max_writes:
            due = writes_due(args.rate, time.monotonic() - start)
            if done >= due:
                time.sleep(0.001)  # pacing the writer itself, not synchronisation
                continue
            apply(image, next(steps), args.page_size)
            done += 1
            counter[:8] = struct.pack("=Q", done)
    return 0


class LiveWriter:
    """A running writer process over ``image`` (the tests' handle on it)."""

    def __init__(self, image: str, counter: str, *, seed: int = 0, rate: float = 0,
                 page_size: int = 4096, max_writes: int = 0, zero_fraction: float = 0.2,
                 poke_fraction: float = 0.3, timeout_s: float = 20.0) -> None:
        self.image = image
        self.counter = counter
        self.seed = seed
        self.page_size = page_size
        self.fractions = {"zero_fraction": zero_fraction, "poke_fraction": poke_fraction}
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), image, "--counter", counter,
             "--seed", str(seed), "--rate", str(rate), "--page-size", str(page_size),
             "--max-writes", str(max_writes), "--zero-fraction", str(zero_fraction),
             "--poke-fraction", str(poke_fraction)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"the writer did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def writes(self) -> int:
        """Writes finished so far."""
        with open(self.counter, "rb") as f:
            return int(struct.unpack("=Q", f.read(8))[0])

    def wait_writes(self, at_least: int) -> int:
        """Poll (bounded) until ``at_least`` writes are done; return the count."""
        deadline = time.monotonic() + self.timeout_s
        while (n := self.writes()) < at_least:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the writer did {n} of {at_least} writes")
            time.sleep(0.005)
        return n

    def state(self) -> str:
        """The process state letter from /proc (``T``: stopped)."""
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def wait_state(self, stopped: bool) -> None:
        """Poll (bounded) until the process is (not) stopped."""
        deadline = time.monotonic() + self.timeout_s
        while (self.state() == "T") != stopped:
            if time.monotonic() > deadline:
                raise AssertionError(f"the writer's state is still {self.state()}")
            time.sleep(0.002)

    def stop(self) -> int:
        """SIGSTOP the writer, wait until it is stopped; return its write count."""
        os.kill(self.pid, signal.SIGSTOP)
        self.wait_state(True)
        return self.writes()

    def cont(self) -> None:
        """SIGCONT the writer."""
        os.kill(self.pid, signal.SIGCONT)
        self.wait_state(False)

    def expected(self, initial: bytes, writes: int) -> bytearray:
        """The image after ``writes`` writes of this writer's plan."""
        return replay(initial, self.seed, writes, self.page_size, **self.fractions)

    def next_write(self, writes: int) -> Write:
        """Write number ``writes`` of the plan (0-based): the one that may be half done."""
        with open(self.image, "rb") as f:
            size = os.fstat(f.fileno()).st_size
        steps = plan(self.seed, size, self.page_size, **self.fractions)
        for _ in range(writes):
            next(steps)
        return next(steps)

    def wait(self) -> int:
        """Wait (bounded) for the process to exit; return its status."""
        return self.proc.wait(self.timeout_s)

    def close(self) -> None:
        """Kill and reap the process (idempotent)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
                os.kill(self.pid, signal.SIGCONT)
        self.proc.wait(self.timeout_s)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> LiveWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
