"""Live-transfer benchmark: downtime and total time against the writer's dirty rate.

Run by hand (not a test; numpy is not a dependency of dsamig):

    .venv/bin/pip install numpy
    .venv/bin/python benchmarks/live.py --size 2GiB --runs 5
    .venv/bin/python benchmarks/live.py --size 512MiB --runs 5 --rates 0,1000,10000,50000

**dsamig, writer process.**  An image of ``--size`` bytes (``--zero-fraction``
of its pages zero, in runs of 16) lives in ``--dir``.  For each run a
writer process (``benchmarks/live.py writer``, numpy over a MAP_SHARED
mapping) dirties it at the given rate: every millisecond it stamps the next
write numbers into the first 8 bytes of as many uniformly random pages as
are due, so each write changes its page.  ``dsamig receive --once`` and
``dsamig send --live --pause-cmd`` (SIGSTOP, returning once /proc says the
writer stopped; ``--resume-cmd`` SIGCONT) run as separate processes on
127.0.0.1; the writer stays stopped after the commit, and the destination is
compared with the frozen image (``--no-verify`` skips that).  Figures from
the sender's ``--json``: ``downtime`` (pause to COMMIT), ``total-time``,
the number of rounds (round 0 included) and ``transferred``.

**QEMU, the same dirty rate in a guest** (``--qemu``, on when
qemu-system-x86_64 is installed).  A TCG guest with ``--size`` of RAM in a
``memory-backend-file`` (``share=on``) on the same image writes
the same way: it stamps write numbers into uniformly random pages above
16 MiB, paced by the TSC (calibrated once against the wall clock); the rate
it reached is measured from its write counter.  Two ways to move it:

* ``qemu``: QEMU's own pre-copy migration over TCP on 127.0.0.1 into a
  destination QEMU (``-incoming``, RAM from ``memory-backend-ram``),
  ``max-bandwidth`` lifted to 100 GB/s (QEMU's default caps at 128 MiB/s),
  ``downtime-limit`` 300 ms (QEMU's default, dsamig's ``--max-downtime``);
  figures from ``query-migrate``: ``downtime``, ``total-time``,
  ``ram.dirty-sync-count``, ``ram.transferred``.
* ``dsamig+qemu``: ``dsamig send --live --qmp`` of the guest's RAM file,
  then the device state alone with ``x-ignore-shared`` into a destination
  QEMU on the received file; the guest's downtime is dsamig's ``downtime``
  plus the wall time from the commit (starting the destination QEMU on the
  received file, the device-state ``migrate``) to the destination running
  after ``cont``.

The cases run round-robin (each round runs every rate once), so slow
phases of a shared machine hit every case alike; medians per rate are
printed, with every run.  Sizes take KiB/MiB/GiB suffixes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.images import make_image
from dsamig.live.qmp import QmpClient

PAGE = 4096
GiB = 1 << 30
QEMU = "qemu-system-x86_64"
#: Bound of every wait on a process or a migration.
TIMEOUT_S = 300.0
#: The guest's write count (u32): a guest-physical address, and so its
#: offset in the memory file (``pc`` maps low RAM from offset 0).
GUEST_WRITES = 0x200000
#: The guest dirties pages from here on; below: firmware, its code, the count.
GUEST_FIRST_PAGE = (16 << 20) // PAGE

GUEST_ASM = r"""
    .code32
    .text
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010000          # the header gives the load addresses
header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .long header, header, 0, 0, _start # header, load, load end, bss end, entry
_start:
    cli
    movl $0, WRITES
    mov $TICKS, %ecx
    test %ecx, %ecx
    jz idle
    rdtsc                              # edi:esi = when the next write is due
    mov %eax, %esi
    mov %edx, %edi
    mov $0x2545F491, %ebx              # LCG state
wait:
    rdtsc
    sub %esi, %eax
    sbb %edi, %edx
    js wait                            # not due yet
    imul $1664525, %ebx, %ebx          # page = FIRST + lcg % NPAGES
    add $1013904223, %ebx
    mov %ebx, %eax
    xor %edx, %edx
    mov $NPAGES, %ecx
    div %ecx
    add $FIRST, %edx
    shl $12, %edx
    incl WRITES
    mov WRITES, %eax
    mov %eax, (%edx)                   # the page now holds this write's number
    add $TICKS, %esi
    adc $0, %edi
    jmp wait
idle:
    hlt
    jmp idle
"""


def parse_size(text: str) -> int:
    """``2GiB``, ``512MiB``, ``64KiB`` or a byte count."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


# -- the writer process ------------------------------------------------------------------

def writer_main(argv: list[str]) -> int:
    """``live.py writer IMAGE --rate N --counter FILE``: dirty IMAGE at N pages/s."""
    parser = argparse.ArgumentParser(prog="live.py writer")
    parser.add_argument("image")
    parser.add_argument("--rate", type=float, required=True, help="pages per second (0: none)")
    parser.add_argument("--counter", required=True, help="receives the write count (u64)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with open(args.counter, "wb") as f:
        f.write(bytes(8))
    with open(args.image, "r+b") as img, open(args.counter, "r+b") as cnt, \
            mmap.mmap(img.fileno(), 0) as image, mmap.mmap(cnt.fileno(), 8) as counter_map:
        pages = np.frombuffer(image, dtype=np.uint64).reshape(-1, PAGE // 8)
        count = np.frombuffer(counter_map, dtype=np.uint64)
        rng = np.random.default_rng(args.seed)
        print("ready", flush=True)
        start = time.monotonic()
        done = 0
        while True:
            time.sleep(0.001)  # pacing: the writes due are made in a batch each tick
            if args.rate <= 0:
                continue
            due = int(args.rate * (time.monotonic() - start)) - done
            if due <= 0:
                continue
            targets = rng.integers(0, len(pages), size=due)
            pages[targets, 0] = np.arange(done + 1, done + due + 1, dtype=np.uint64)
            done += due
            count[0] = done
        del pages, count
    return 0


class Writer:
    """A running writer process (``live.py writer``)."""

    def __init__(self, image: str, rate: float, workdir: str) -> None:
        self.counter = os.path.join(workdir, "writer.count")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "writer", image, "--rate", str(rate),
             "--counter", self.counter], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise SystemExit(f"the writer did not start: {line!r}")

    def writes(self) -> int:
        with open(self.counter, "rb") as f:
            return int.from_bytes(f.read(8), sys.byteorder)

    def pause_cmd(self) -> str:
        pid = self.proc.pid
        return (f"kill -STOP {pid} && "
                f"while ! grep -q '^State:.*T' /proc/{pid}/status; do :; done")

    def resume_cmd(self) -> str:
        return f"kill -CONT {self.proc.pid}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.wait(TIMEOUT_S)


# -- dsamig ------------------------------------------------------------------------------

def dsamig_send(image: str, dest: str, channels: int, live: list[str]) -> dict[str, Any]:
    """One live transfer through the CLI (two processes); the sender's stats."""
    dsamig = [sys.executable, "-m", "dsamig"]
    receiver = subprocess.Popen(
        [*dsamig, "receive", "--listen", "127.0.0.1:0", "--output", dest, "--once", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert receiver.stderr is not None
    line = receiver.stderr.readline()
    if "listening on" not in line:
        receiver.kill()
        raise SystemExit(f"the receiver did not start: {line}")
    port = int(line.rsplit(":", 1)[1])
    try:
        sent = subprocess.run(
            [*dsamig, "send", image, "--to", f"127.0.0.1:{port}", "--channels", str(channels),
             "--live", *live, "--json"], capture_output=True, text=True, timeout=TIMEOUT_S)
        _, err = receiver.communicate(timeout=TIMEOUT_S)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if sent.returncode or receiver.returncode:
        raise SystemExit(f"the transfer failed: {sent.stderr[-2000:]} {err[-2000:]}")
    stats: dict[str, Any] = json.loads(sent.stdout.splitlines()[-1])
    return stats


def same_files(a: str, b: str) -> bool:
    """Byte equality, 64 MiB at a time."""
    step = 64 << 20
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(step), fb.read(step)
            if x != y:
                return False
            if not x:
                return True


def run_writer_case(args: argparse.Namespace, rate: float) -> dict[str, float]:
    """dsamig --live with a writer process at ``rate`` pages/s, paused by SIGSTOP."""
    dest = os.path.join(args.dir, "live-bench.out")
    with tempfile.TemporaryDirectory(prefix="dsamig-live-") as work:
        writer = Writer(args.image, rate, work)
        try:
            started = time.monotonic()
            stats = dsamig_send(args.image, dest, args.channels, [
                "--pause-cmd", writer.pause_cmd(), "--resume-cmd", writer.resume_cmd(),
                "--max-downtime", args.max_downtime])
            achieved = writer.writes() / (time.monotonic() - started)
            if args.verify and not same_files(args.image, dest):
                raise SystemExit("the destination differs from the frozen image")
        finally:
            writer.close()
            if os.path.exists(dest):
                os.unlink(dest)
    return row(stats, achieved)


def row(stats: dict[str, Any], achieved: float) -> dict[str, float]:
    rounds = stats["rounds"]
    return {
        "downtime-ms": float(stats["downtime"]),
        "total-time-ms": float(stats["total-time"]),
        "rounds": float(len(rounds)),
        "transferred-MiB": stats["transferred"] / (1 << 20),
        "final-round-pages": float(rounds[-1]["pages"]),
        "scan-ms": float(statistics.median(r["scan-ms"] for r in rounds[1:])),
        "achieved-pages/s": achieved,
    }


# -- QEMU ---------------------------------------------------------------------------------

def build_guest(directory: str, ticks_per_write: int, ram_size: int) -> str:
    """The dirtying guest: a multiboot kernel, one write every ``ticks_per_write`` TSC ticks."""
    source = os.path.join(directory, "guest.S")
    obj = os.path.join(directory, "guest.o")
    kernel = os.path.join(directory, "guest.bin")
    npages = ram_size // PAGE - GUEST_FIRST_PAGE
    Path(source).write_text(
        f"    .set WRITES, {GUEST_WRITES:#x}\n    .set FIRST, {GUEST_FIRST_PAGE}\n"
        f"    .set NPAGES, {npages}\n    .set TICKS, {ticks_per_write}\n" + GUEST_ASM)
    for cmd in (["as", "--32", "-o", obj, source],
                ["ld", "-m", "elf_i386", "-Ttext=0x100000", "--oformat=binary", "-e", "_start",
                 "-o", kernel, obj]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return kernel


def guest_writes(mem_path: str) -> int:
    with open(mem_path, "rb") as f, mmap.mmap(f.fileno(), PAGE, offset=GUEST_WRITES,
                                              prot=mmap.PROT_READ) as m:
        return int.from_bytes(m[:4], "little")


class Qemu:
    """A QEMU process (TCG, ``-machine pc``) with RAM from ``memory-backend-*`` id ``mem``."""

    def __init__(self, workdir: str, name: str, size: int, *, mem_path: str | None,
                 kernel: str | None = None, incoming: bool = False) -> None:
        self.sockdir = tempfile.mkdtemp(prefix="dsb-")
        self.qmp = os.path.join(self.sockdir, "qmp")
        self.qmp_other = os.path.join(self.sockdir, "qmp2")
        backend = (f"memory-backend-file,id=mem,size={size},mem-path={mem_path},share=on"
                   if mem_path else f"memory-backend-ram,id=mem,size={size}")
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-accel", "tcg",
               "-machine", "pc,memory-backend=mem", "-m", f"{size >> 20}M",
               "-object", backend, "-serial", "none",
               "-qmp", f"unix:{self.qmp},server=on,wait=off",
               "-qmp", f"unix:{self.qmp_other},server=on,wait=off"]
        if kernel:
            cmd += ["-kernel", kernel]
        if incoming:
            cmd += ["-incoming", "defer"]
        self.log = open(os.path.join(workdir, f"{name}.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT_S
        while not (os.path.exists(self.qmp) and os.path.exists(self.qmp_other)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"QEMU {name} did not start: {Path(self.log.name).read_text()}")
            time.sleep(0.01)

    async def connect(self) -> QmpClient:
        return await QmpClient.connect(self.qmp, timeout_s=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT_S)
        self.log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)


def wait_guest_writes(mem_path: str, at_least: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while guest_writes(mem_path) < at_least:
        if time.monotonic() > deadline:
            raise SystemExit("the guest does not write")
        time.sleep(0.01)


def tsc_hz(args: argparse.Namespace) -> float:
    """TSC ticks per second as the TCG guest sees them (QEMU gives it the host's TSC)."""
    ticks = 1_000_000
    with tempfile.TemporaryDirectory(prefix="dsamig-live-") as work:
        mem = os.path.join(work, "calibrate.mem")
        with open(mem, "wb") as f:
            f.truncate(64 << 20)
        vm = Qemu(work, "calibrate", 64 << 20, mem_path=mem,
                  kernel=build_guest(work, ticks, 64 << 20))
        try:
            wait_guest_writes(mem, 10)
            first, t0 = guest_writes(mem), time.monotonic()
            time.sleep(2.0)  # the calibration's measuring window
            last, t1 = guest_writes(mem), time.monotonic()
        finally:
            vm.close()
    return (last - first) * ticks / (t1 - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_guest(args: argparse.Namespace, work: str, rate: float) -> tuple[Qemu, str]:
    """A dirtying guest with the image as its RAM; returns it once it writes."""
    mem = args.image
    ticks = round(args.tsc_hz / rate) if rate > 0 else 0
    # The image is the RAM of every run's guest: clear the count an earlier
    # guest left, so that "it writes" means this guest booted and writes.
    with open(mem, "r+b") as f:
        f.seek(GUEST_WRITES)
        f.write(bytes(4))
    vm = Qemu(work, "source", args.size, mem_path=mem,
              kernel=build_guest(work, ticks, args.size))
    if rate > 0:
        wait_guest_writes(mem, 1)
    return vm, mem


async def run_qemu_case(args: argparse.Namespace, rate: float) -> dict[str, float]:
    """QEMU's own pre-copy migration of the dirtying guest over TCP on 127.0.0.1."""
    with tempfile.TemporaryDirectory(prefix="dsamig-live-") as work:
        source, mem = start_guest(args, work, rate)
        dest = Qemu(work, "dest", args.size, mem_path=None, incoming=True)
        try:
            uri = f"tcp:127.0.0.1:{free_port()}"
            async with await dest.connect() as dq, await source.connect() as sq:
                await dq.migrate_incoming(uri)
                await sq.execute("migrate-set-parameters", {
                    "max-bandwidth": 100 * 10**9, "downtime-limit": 300})
                # The rate the guest reaches, measured before the migration: once
                # it completes, the source's RAM no longer shows the guest's count.
                w0, t0 = guest_writes(mem), time.monotonic()
                await asyncio.sleep(0.5)
                achieved = (guest_writes(mem) - w0) / (time.monotonic() - t0)
                await sq.migrate(uri)
                info = await sq.wait_migration(timeout_s=TIMEOUT_S)
                await dq.wait_status(True, timeout_s=30)
        finally:
            source.close()
            dest.close()
    ram = info["ram"]
    return {
        "downtime-ms": float(info["downtime"]),
        "total-time-ms": float(info["total-time"]),
        "rounds": float(ram["dirty-sync-count"]),
        "transferred-MiB": ram["transferred"] / (1 << 20),
        "achieved-pages/s": achieved,
    }


async def run_dsamig_qemu_case(args: argparse.Namespace, rate: float) -> dict[str, float]:
    """dsamig --live --qmp of the dirtying guest's RAM, then its device state alone."""
    received = os.path.join(args.dir, "live-bench-guest.out")
    with tempfile.TemporaryDirectory(prefix="dsamig-live-") as work:
        source, mem = start_guest(args, work, rate)
        dest: Qemu | None = None
        try:
            w0, t0 = guest_writes(mem), time.monotonic()
            stats = dsamig_send(mem, received, args.channels, [
                "--qmp", source.qmp_other, "--max-downtime", args.max_downtime])
            achieved = (guest_writes(mem) - w0) / (time.monotonic() - t0)
            if args.verify and not same_files(mem, received):
                raise SystemExit("the received guest RAM differs from the frozen source")
            # The guest stays down until the destination runs: its start-up counts.
            t1 = time.monotonic()
            dest = Qemu(work, "dest", args.size, mem_path=received, incoming=True)
            uri = f"unix:{os.path.join(dest.sockdir, 'migrate')}"
            async with await dest.connect() as dq, await source.connect() as sq:
                for qmp in (dq, sq):
                    await qmp.migrate_set_capabilities({"x-ignore-shared": True})
                await dq.migrate_incoming(uri)
                await sq.migrate(uri)
                await sq.wait_migration(timeout_s=TIMEOUT_S)
                while (await dq.query_status())["status"] == "inmigrate":
                    await asyncio.sleep(0.001)
                await dq.cont()
                device_s = time.monotonic() - t1
            if rate > 0:
                frozen = guest_writes(received)
                wait_guest_writes(received, frozen + 1)  # the guest goes on at the destination
        finally:
            source.close()
            if dest is not None:
                dest.close()
            if os.path.exists(received):
                os.unlink(received)
    figures = row(stats, achieved)
    figures["device-state-ms"] = device_s * 1000
    figures["guest-downtime-ms"] = figures["downtime-ms"] + device_s * 1000
    return figures


# -- the report ---------------------------------------------------------------------------

def report(results: dict[tuple[str, float], list[dict[str, float]]]) -> None:
    for (case, rate), rows in results.items():
        print(f"\n== {case}, {rate:g} pages/s (median of {len(rows)})")
        for key in rows[0]:
            values = [r[key] for r in rows]
            print(f"  {key:<20} {statistics.median(values):12.1f}   runs: "
                  f"{', '.join(f'{v:.1f}' for v in values)}")
    print("\n| case | dirty rate (pages/s) | achieved | downtime ms | total ms | rounds "
          "| MiB sent |")
    print("|---|---|---|---|---|---|---|")
    for (case, rate), rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        downtime = f"{med['downtime-ms']:.0f}"
        if "guest-downtime-ms" in med:
            downtime += f" (guest {med['guest-downtime-ms']:.0f})"
        print(f"| {case} | {rate:g} | {med['achieved-pages/s']:.0f} | {downtime} | "
              f"{med['total-time-ms']:.0f} | {med['rounds']:g} | {med['transferred-MiB']:.0f} |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        return writer_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=2 * GiB, help="image / guest RAM")
    parser.add_argument("--runs", type=int, default=5, help="rounds of the round robin")
    parser.add_argument("--rates", default="0,1000,10000,50000", help="pages per second")
    parser.add_argument("--zero-fraction", type=float, default=0.5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--max-downtime", default="300ms")
    parser.add_argument("--dir", default="/dev/shm", help="where images and copies live")
    parser.add_argument("--qemu", action=argparse.BooleanOptionalAction, default=None,
                        help="also the QEMU cases (default: when QEMU is installed)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="compare every destination with the frozen source")
    args = parser.parse_args()
    if args.size % (2 << 20):
        raise SystemExit("--size must be a multiple of 2 MiB (QEMU's RAM size)")
    rates = [float(r) for r in args.rates.split(",")]
    if args.qemu is None:
        args.qemu = shutil.which(QEMU) is not None
    args.image = os.path.join(args.dir, "live-bench.img")
    make_image(args.image, args.size, args.zero_fraction)
    cases = ["dsamig"]
    if args.qemu:
        args.tsc_hz = tsc_hz(args)
        print(f"guest TSC: {args.tsc_hz / 1e6:.1f} MHz")
        cases += ["qemu", "dsamig+qemu"]
    results: dict[tuple[str, float], list[dict[str, float]]] = {
        (case, rate): [] for case in cases for rate in rates}
    try:
        for run in range(args.runs):
            for rate in rates:
                for case in cases:
                    if case == "dsamig":
                        figures = run_writer_case(args, rate)
                    elif case == "qemu":
                        figures = asyncio.run(run_qemu_case(args, rate))
                    else:
                        figures = asyncio.run(run_dsamig_qemu_case(args, rate))
                    results[(case, rate)].append(figures)
                    print(f"run {run} {case:<12} {rate:>7g} pages/s: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    finally:
        os.unlink(args.image)
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
