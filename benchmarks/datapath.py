"""Data-path benchmark: dsamig's native paths, its event-loop path and QEMU's multifd
against the write floor, round-robin.

Run by hand (not a test):

    .venv/bin/pip install numpy
    .venv/bin/python benchmarks/datapath.py --runs 5 --json datapath.json
    .venv/bin/python benchmarks/datapath.py --runs 5 --channels-sweep 1,2,4,8
    .venv/bin/python benchmarks/datapath.py --sizes 2GiB,8GiB

**Images** (``--images``, made once each in ``--dir``, ``--size`` bytes):
``half``: 50 % zero pages in runs of 16; ``none``: no zero pages; ``all``:
every page zero, written as zeros.

**Contenders** (``--contenders``), each on a fresh destination in ``--dir``,
deleted after:

* ``floor``: one ``pwrite`` per run of the image's non-zero pages into a
  fresh sparse file, from an already-mapped source (bench_transfer's write
  floor), then an ``fsync`` of it, since dsamig's receiver fsyncs before it
  commits (free on tmpfs, a write-back on a disk file system); for the
  all-zero image, where that writes nothing, the floor is the scan floor
  instead: numpy reading every byte through a fresh mapping.
* ``dsamig-pwrite``, ``dsamig-mmap``: ``dsamig receive --once`` and ``dsamig
  send`` as two processes on 127.0.0.1, the receiver's native threads landing
  payloads with ``pwrite`` or into a mapping (``DSAMIG_RECEIVE_PATH``);
  ``dsamig-loop``: both sides on the event loop (``DSAMIG_DATA_PATH=loop``).
* ``tcp-floor``: the least any TCP transfer into the file does
  (``tcp_floor.c``, built with ``cc`` on first use): two processes with a
  thread per channel on each side; the sender is handed the non-zero pages
  (scans nothing, maps them before its clock starts) and writes each packet's
  runs in one ``sendmsg``, the receiver reads each payload into a buffer,
  ``pwrite``s its runs and ``fsync``s at the end; nothing checksummed,
  recorded or acknowledged on the way. What is left is the socket copies,
  TCP and the write floor's ``pwrite``, sharing the machine's cores: the
  bound for any receiver that lands data with ``pwrite``.
* ``qemu``: QEMU's own multifd migration (``--channels`` channels) of a
  paused TCG guest (``-S``) whose RAM is the image (``memory-backend-file``,
  ``share=on``) into a destination QEMU (``-incoming defer``) whose RAM is a
  fresh sparse file; ``max-bandwidth`` lifted to 100 GB/s (the default caps
  at 128 MiB/s).  Skipped with a note when QEMU is missing (``--no-qemu``).

**Figures.**  Time ends when the destination holds everything: for dsamig
the sender's ``total-time`` (``--json``; it ends at the receiver's commit),
for QEMU from the ``migrate`` command until the destination has left
``inmigrate`` (QEMU's own ``total-time`` from ``query-migrate``, which ends
once the source has sent the last page, is printed beside it).  "Process
wall" is dsamig's sender process from start to exit, Python's start-up
included.  CPU is the job's, both sides: dsamig's
``cpu-s``, QEMU's ``/proc/PID/stat`` over the migration; the processes'
whole-life CPU (``wait4``) is in the raw figures.  Peak RSS is ``VmHWM``
(dsamig's ``peak-rss-bytes``; QEMU's read before it quits); it counts the
pages of mapped files too (a mapped destination, QEMU's guest RAM).  The
kernel's ``ru_maxrss`` is kept in the raw figures only: a child's starts
at its parent's peak, and this process maps whole images.  "Busiest recv
thread" is the largest entry of the receiver's ``thread-cpu-s`` as a share
of its ``cpu-s``.

Every round runs every contender once on the same image, in an order that
rotates from round to round, so slow phases of a shared machine hit all of
them alike; the tables give medians of the per-round ratios (to the floor,
to QEMU) and of the absolute figures.  On tmpfs the memory a run will allocate is
written and freed before it (``--warm``), as bench_transfer does.
``--verify`` compares every destination with the image; by default only
the first round's are compared.

Other modes (given alone, they replace the comparison; add ``--images`` to
run it too): ``--channels-sweep 1,2,4,8`` runs dsamig-pwrite and
dsamig-mmap on the half-zero image per channel count; ``--sizes 2GiB,8GiB``
runs one dsamig-pwrite transfer of a half-zero image per size and reports
both sides' peak RSS (it should not grow with the image).  Sizes take
KiB/MiB/GiB suffixes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_transfer import MADV_POPULATE_READ, PAGE, normal_runs, scan_floor_file, warm_memory
from images import make_image
from live import free_port, parse_size, same_files

from dsamig.live.qmp import QmpClient, QmpError
from dsamig.native import impl
from dsamig.settings import SNAPSHOT_PACKET_SIZE

MiB = 1 << 20
GiB = 1 << 30
QEMU = "qemu-system-x86_64"
#: Images by name: the share of their pages that is zero (in runs of 16).
IMAGES = {"half": 0.5, "none": 0.0, "all": 1.0}
#: dsamig contenders: (receiver's environment, sender's environment).
DSAMIG = {
    "dsamig-pwrite": ({"DSAMIG_RECEIVE_PATH": "pwrite"}, {}),
    "dsamig-mmap": ({"DSAMIG_RECEIVE_PATH": "mmap"}, {}),
    "dsamig-loop": ({"DSAMIG_DATA_PATH": "loop"}, {"DSAMIG_DATA_PATH": "loop"}),
}
CONTENDERS = ("floor", "tcp-floor", *DSAMIG, "qemu")
#: The TCP floor's source, built into a temporary directory on first use.
TCP_FLOOR_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tcp_floor.c")
#: Bound of every wait on a process or a migration (--timeout).
TIMEOUT_S = 600.0


class BenchError(Exception):
    """A contender failed; the message says how."""


# -- processes ----------------------------------------------------------------------------

def cpu_of(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


class Child:
    """A subprocess with its output in files, reaped with ``wait4`` for its rusage."""

    def __init__(self, work: str, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.out_path = os.path.join(work, f"{name}.out")
        self.err_path = os.path.join(work, f"{name}.err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        self.usage: resource.struct_rusage | None = None
        self.wall_s = 0.0

    def output(self) -> str:
        with open(self.out_path, errors="replace") as f:
            return f.read()

    def errors(self) -> str:
        with open(self.err_path, errors="replace") as f:
            return f.read()[-2000:]

    def wait_line(self, marker: str, timeout_s: float) -> str:
        """The first line of stderr holding ``marker`` (bounded; the child must live)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.errors().splitlines():
                if marker in line:
                    return line
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited ({self.proc.returncode}) before "
                                 f"{marker!r}: {self.errors()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {marker!r} after {timeout_s:g} s")
            time.sleep(0.002)

    def wait(self, timeout_s: float) -> int:
        """Reap it (bounded), keeping its rusage; its exit code."""
        deadline = time.monotonic() + timeout_s
        while self.usage is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.wall_s = time.perf_counter() - self.started
                self.usage = usage
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(f"{self.name} still running after {timeout_s:g} s")
            time.sleep(0.001)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """Kill and reap it unless it is reaped already (idempotent)."""
        if self.usage is None and self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait(30)

    def json(self) -> dict[str, Any]:
        lines = [line for line in self.output().splitlines() if line.strip()]
        if not lines:
            raise BenchError(f"{self.name} printed no JSON: {self.errors()}")
        stats: dict[str, Any] = json.loads(lines[-1])
        return stats


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment without inherited data-path knobs, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DSAMIG_RECEIVE_PATH", "DSAMIG_DATA_PATH")}
    return {**env, **extra}


def allocated_mib(path: str) -> float:
    return os.stat(path).st_blocks * 512 / MiB


# -- dsamig -------------------------------------------------------------------------------

class Pair:
    """A receiver and a sender run to the end: their JSON figures, and what
    the destination held (removed after)."""

    def __init__(self, args: argparse.Namespace, contender: str, image: str, dest: str,
                 verify: bool, receiver_cmd: list[str], receiver_env: dict[str, str],
                 sender_cmd: Callable[[str], list[str]], sender_env: dict[str, str]) -> None:
        """Start the receiver, which must print "listening on HOST:PORT" on
        stderr, then the sender given that port; wait for both (bounded)."""
        receiver: Child | None = None
        sender: Child | None = None
        with tempfile.TemporaryDirectory(prefix="dsamig-dp-") as work:
            try:
                receiver = Child(work, "receiver", receiver_cmd, child_env(receiver_env))
                port = receiver.wait_line("listening on", args.timeout).rsplit(":", 1)[1]
                sender = Child(work, "sender", sender_cmd(port), child_env(sender_env))
                if sender.wait(args.timeout):
                    raise BenchError(f"{contender}: the sender failed: {sender.errors()}")
                if receiver.wait(args.timeout):
                    raise BenchError(f"{contender}: the receiver failed: {receiver.errors()}")
                self.sent, self.received = sender.json(), receiver.json()
                self.dest_alloc_mib = allocated_mib(dest)
                self.verified = verify and same_files(image, dest)
                if verify and not self.verified:
                    raise BenchError(f"{contender}: the destination differs from the image")
            finally:
                for child in (sender, receiver):
                    if child is not None:
                        child.kill()
                if os.path.exists(dest):
                    os.unlink(dest)
        assert sender.usage is not None and receiver.usage is not None
        self.sender, self.receiver = sender, receiver


def run_dsamig(args: argparse.Namespace, contender: str, image: str, dest: str,
               channels: int, verify: bool) -> dict[str, Any]:
    """One transfer through the CLI, sender and receiver as separate processes."""
    recv_env, send_env = DSAMIG[contender]
    dsamig = [sys.executable, "-m", "dsamig"]
    pair = Pair(args, contender, image, dest, verify,
                [*dsamig, "receive", "--once", "--json", "--listen", "127.0.0.1:0",
                 "--output", dest], recv_env,
                lambda port: [*dsamig, "send", image, "--to", f"127.0.0.1:{port}",
                              "--channels", str(channels), "--json"], send_env)
    s, r, sender, receiver = pair.sent, pair.received, pair.sender, pair.receiver
    assert sender.usage is not None and receiver.usage is not None
    expected = "loop" if contender == "dsamig-loop" else "native"
    if r.get("data-path") != expected or s.get("data-path") != expected or (
            expected == "native" and r.get("receive-path") != recv_env["DSAMIG_RECEIVE_PATH"]):
        raise BenchError(f"{contender}: ran on sender {s.get('data-path')}, receiver "
                         f"{r.get('data-path')} {r.get('receive-path', '')}")
    dest_alloc, verified = pair.dest_alloc_mib, pair.verified
    threads = r.get("thread-cpu-s") or {}
    busiest = max(threads, key=threads.__getitem__) if threads else ""
    return {
        "time-s": s["total-time"] / 1000,
        "wall-s": sender.wall_s,
        "send-cpu-s": float(s["cpu-s"]),
        "recv-cpu-s": float(r["cpu-s"]),
        "send-proc-cpu-s": cpu_of(sender.usage),
        "recv-proc-cpu-s": cpu_of(receiver.usage),
        "busiest-recv-thread-share": threads.get(busiest, 0.0) / max(r["cpu-s"], 1e-9),
        "recv-threads-share": sum(threads.values()) / max(r["cpu-s"], 1e-9),
        "send-rss-MiB": s["peak-rss-bytes"] / MiB,
        "recv-rss-MiB": r["peak-rss-bytes"] / MiB,
        "send-ru-maxrss-MiB": sender.usage.ru_maxrss / 1024,
        "recv-ru-maxrss-MiB": receiver.usage.ru_maxrss / 1024,
        "dest-alloc-MiB": dest_alloc,
        "verified": float(verified),
        "busiest-recv-thread": busiest,
        "sender": s,
        "receiver": r,
    }


# -- the TCP floor ------------------------------------------------------------------------

def tcp_floor_binary(args: argparse.Namespace) -> str:
    """``tcp_floor.c`` built once per benchmark run (a C compiler is all it needs)."""
    if getattr(args, "tcp_floor_bin", None) is None:
        work = tempfile.mkdtemp(prefix="dsamig-tcp-floor-")
        binary = os.path.join(work, "tcp_floor")
        out = subprocess.run(["cc", "-O2", "-pthread", "-o", binary, TCP_FLOOR_C],
                             capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise BenchError(f"cannot build {TCP_FLOOR_C}: {out.stderr}")
        args.tcp_floor_bin = binary
    return str(args.tcp_floor_bin)


def run_tcp_floor(args: argparse.Namespace, image: str, dest: str, channels: int,
                  verify: bool) -> dict[str, Any]:
    """The least a TCP transfer into the file does (see ``tcp_floor.c``)."""
    binary = tcp_floor_binary(args)
    packet = str(SNAPSHOT_PACKET_SIZE)  # dsamig's packet for a snapshot
    pair = Pair(args, "tcp-floor", image, dest, verify,
                [binary, "recv", dest, str(os.path.getsize(image)), str(channels), packet], {},
                lambda port: [binary, "send", image, port, str(channels), packet], {})
    return {"time-s": pair.sent["time-s"], "send-cpu-s": pair.sent["cpu-s"],
            "recv-cpu-s": pair.received["cpu-s"], "dest-alloc-MiB": pair.dest_alloc_mib,
            "verified": float(pair.verified)}


# -- QEMU ---------------------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    """User + system CPU of a live process, its ended threads included."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mib(pid: int) -> float:
    """Peak resident set (VmHWM) of a live process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class QemuVm:
    """A paused QEMU (TCG, ``-machine pc``, ``-S``) whose RAM is the file ``mem_path``."""

    def __init__(self, work: str, name: str, size: int, mem_path: str,
                 incoming: bool) -> None:
        self.qmp = os.path.join(work, f"{name}.qmp")
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-accel", "tcg",
               "-machine", "pc,memory-backend=mem", "-m", f"{size // MiB}M",
               "-object", f"memory-backend-file,id=mem,size={size},mem-path={mem_path},"
               "share=on", "-serial", "none", "-S",
               "-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if incoming:
            cmd += ["-incoming", "defer"]
        self.child = Child(work, name, cmd, child_env({}))
        deadline = time.monotonic() + 60
        while not os.path.exists(self.qmp):
            if self.child.proc.poll() is not None or time.monotonic() > deadline:
                self.child.kill()
                raise BenchError(f"QEMU {name} did not start: {self.child.errors()}")
            time.sleep(0.005)

    async def connect(self) -> QmpClient:
        return await QmpClient.connect(self.qmp, timeout_s=30)


async def qemu_migrate(args: argparse.Namespace, src: QemuVm, dst: QemuVm,
                       channels: int) -> dict[str, Any]:
    """Multifd migration from ``src`` to ``dst``; figures taken before both quit."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    async with await src.connect() as sq, await dst.connect() as dq:
        for qmp in (sq, dq):
            await qmp.migrate_set_capabilities({"multifd": True})
            await qmp.execute("migrate-set-parameters", {"multifd-channels": channels})
        await sq.execute("migrate-set-parameters", {"max-bandwidth": 100 * 10**9})
        await dq.migrate_incoming(uri)
        pids = (src.child.proc.pid, dst.child.proc.pid)
        cpu0 = [proc_cpu_s(pid) for pid in pids]
        t0 = time.perf_counter()
        await sq.migrate(uri)
        info = await sq.wait_migration(timeout_s=args.timeout, poll_s=0.002)
        # The destination finishes loading after the source reports completion.
        async with asyncio.timeout(args.timeout):
            while (await dq.query_status())["status"] == "inmigrate":
                await asyncio.sleep(0.002)
        wall = time.perf_counter() - t0
        cpu1 = [proc_cpu_s(pid) for pid in pids]
        hwm = [proc_hwm_mib(pid) for pid in pids]
        for qmp in (sq, dq):
            await qmp.execute("quit")
    return {"info": info, "wall-s": wall, "send-cpu-s": cpu1[0] - cpu0[0],
            "recv-cpu-s": cpu1[1] - cpu0[1], "send-rss-MiB": hwm[0], "recv-rss-MiB": hwm[1]}


def run_qemu(args: argparse.Namespace, image: str, dest: str, channels: int,
             verify: bool) -> dict[str, Any]:
    """QEMU's multifd migration of a paused guest whose RAM is the image."""
    size = os.path.getsize(image)
    vms: list[QemuVm] = []
    with tempfile.TemporaryDirectory(prefix="dsq-") as work:
        try:
            with open(dest, "wb") as f:
                f.truncate(size)
            vms.append(QemuVm(work, "src", size, image, incoming=False))
            vms.append(QemuVm(work, "dst", size, dest, incoming=True))
            try:
                figures = asyncio.run(qemu_migrate(args, vms[0], vms[1], channels))
            except QmpError as exc:
                raise BenchError(f"qemu: {exc}; source: {vms[0].child.errors()}; "
                                 f"destination: {vms[1].child.errors()}") from None
            for vm in vms:
                if vm.child.wait(60):
                    raise BenchError(f"QEMU {vm.child.name} failed: {vm.child.errors()}")
            dest_alloc = allocated_mib(dest)
            verified = verify and same_files(image, dest)
            if verify and not verified:
                raise BenchError("qemu: the destination differs from the image")
        finally:
            for vm in vms:
                vm.child.kill()
            if os.path.exists(dest):
                os.unlink(dest)
    info = figures.pop("info")
    usage = [vm.child.usage for vm in vms]
    assert usage[0] is not None and usage[1] is not None
    ram = info.get("ram", {})
    return {
        # QEMU's total-time ends when the source has sent everything; the
        # destination may still be loading then.  dsamig's ends at the
        # receiver's commit, so the two compare on the destination's end.
        "time-s": figures.pop("wall-s"),
        "total-time-s": info["total-time"] / 1000,
        **figures,
        "send-proc-cpu-s": cpu_of(usage[0]),
        "recv-proc-cpu-s": cpu_of(usage[1]),
        "send-ru-maxrss-MiB": usage[0].ru_maxrss / 1024,
        "recv-ru-maxrss-MiB": usage[1].ru_maxrss / 1024,
        "dest-alloc-MiB": dest_alloc,
        "verified": float(verified),
        "duplicate": ram.get("duplicate", 0),
        "normal": ram.get("normal", 0),
        "transferred-MiB": ram.get("transferred", 0) / MiB,
        "query-migrate": info,
    }


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


# -- the runs -----------------------------------------------------------------------------

def write_floor(image: str, dest: str, runs: list[tuple[int, int]]) -> tuple[float, float]:
    """Seconds to pwrite the image's non-zero pages into a fresh sparse file
    (bench_transfer's write floor), then seconds to fsync it: dsamig's
    receiver fsyncs before it commits, which costs nothing on tmpfs but
    writes the data back on a disk file system."""
    size = os.path.getsize(image)
    with open(image, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = memoryview(m)
        for first, count in runs:  # map the source pages: we time the writes only
            m.madvise(MADV_POPULATE_READ, first * PAGE, min(count * PAGE, size - first * PAGE))
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            t0 = time.perf_counter()
            for first, count in runs:
                os.pwrite(fd, view[first * PAGE : (first + count) * PAGE], first * PAGE)
            t1 = time.perf_counter()
            os.fsync(fd)
            t2 = time.perf_counter()
        finally:
            os.close(fd)
            view.release()
            os.unlink(dest)
    return t1 - t0, t2 - t1


def fs_type(path: str) -> str:
    """The file system type of ``path`` (from /proc/self/mountinfo, longest mount point)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mount = left.split()[4]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and \
                    len(mount) >= len(best):
                best, kind = mount, right.split()[0]
    return kind


class Image:
    """A benchmark image in ``--dir``, its runs of non-zero pages, removed on close."""

    def __init__(self, args: argparse.Namespace, name: str, size: int, zero: float) -> None:
        self.name, self.size, self.zero = name, size, zero
        self.path = os.path.join(args.dir, f"datapath-{name}-{size // MiB}M.img")
        self.dest = os.path.join(args.dir, f"datapath-{name}-{size // MiB}M.out")
        self.keep = args.keep
        t = time.perf_counter()
        make_image(self.path, size, zero)
        with open(self.path, "rb") as f:  # written back now, not during the first runs
            os.fsync(f.fileno())
        self.runs, self.nonzero = normal_runs(self.path)
        print(f"image {name}: {size / GiB:g} GiB, {zero:.0%} zero pages, "
              f"made in {time.perf_counter() - t:.1f} s", flush=True)

    def close(self) -> None:
        for path in (self.dest, *(() if self.keep else (self.path,))):
            if os.path.exists(path):
                os.unlink(path)


@contextmanager
def image_of(args: argparse.Namespace, name: str, size: int, zero: float) -> Iterator[Image]:
    image = Image(args, name, size, zero)
    try:
        yield image
    finally:
        image.close()


def run_one(args: argparse.Namespace, contender: str, image: Image, channels: int,
            verify: bool) -> dict[str, Any]:
    """One run of one contender on ``image``: its figures."""
    if args.warm:  # as much as the run allocates: QEMU's destination fills every page
        warm_memory(args.dir, image.size if contender == "qemu" else image.nonzero)
    if contender == "floor":
        writes, fsync = write_floor(image.path, image.dest, image.runs)
        row: dict[str, Any] = {"write-floor-s": writes, "fsync-s": fsync,
                               "time-s": writes + fsync}
        if image.zero == 1.0:
            # An all-zero image writes nothing: its floor is reading it once.
            row["scan-floor-s"] = row["time-s"] = scan_floor_file(image.path, holes=False)
        return row
    if contender == "qemu":
        return run_qemu(args, image.path, image.dest, channels, verify)
    if contender == "tcp-floor":
        return run_tcp_floor(args, image.path, image.dest, channels, verify)
    return run_dsamig(args, contender, image.path, image.dest, channels, verify)


def describe(row: dict[str, Any]) -> str:
    keys = ("time-s", "total-time-s", "wall-s", "write-floor-s", "fsync-s", "scan-floor-s",
            "send-cpu-s", "recv-cpu-s", "busiest-recv-thread-share", "send-rss-MiB", "recv-rss-MiB",
            "dest-alloc-MiB")
    text = ", ".join(f"{k} {row[k]:.3f}" for k in keys if k in row)
    if row.get("busiest-recv-thread"):
        text += f", busiest {row['busiest-recv-thread']}"
    if "duplicate" in row:
        text += f", duplicate {row['duplicate']}, normal {row['normal']}"
    return text + (", verified" if row.get("verified") else "")


def rotated(items: list[str], by: int) -> list[str]:
    by %= max(len(items), 1)
    return items[by:] + items[:by]


Results = dict[str, dict[str, list[dict[str, Any]]]]


def compare(args: argparse.Namespace) -> Results:
    """The main comparison: every contender on every image, round-robin."""
    results: Results = {}
    for name in args.images:
        with image_of(args, name, args.size, IMAGES[name]) as image:
            results[name] = {c: [] for c in args.contenders}
            for run in range(args.runs):
                verify = args.verify if args.verify is not None else run == 0
                for contender in rotated(args.contenders, run):
                    row = run_one(args, contender, image, args.channels, verify)
                    results[name][contender].append(row)
                    print(f"run {run} {name:<4} {contender:<13} {describe(row)}", flush=True)
    return results


def sweep(args: argparse.Namespace) -> Results:
    """dsamig-pwrite and dsamig-mmap on the half-zero image for each channel count."""
    cases = [f"{c}@{n}" for n in args.channels_sweep for c in ("dsamig-pwrite", "dsamig-mmap")]
    results: Results = {"half": {c: [] for c in ["floor", *cases]}}
    with image_of(args, "half", args.size, IMAGES["half"]) as image:
        for run in range(args.runs):
            verify = args.verify if args.verify is not None else run == 0
            for case in rotated(["floor", *cases], run):
                contender, _, channels = case.partition("@")
                row = run_one(args, contender, image, int(channels or args.channels), verify)
                results["half"][case].append(row)
                print(f"run {run} half {case:<16} {describe(row)}", flush=True)
    return results


def sizes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One dsamig-pwrite transfer of a half-zero image per size: both sides' peak RSS."""
    rows = []
    for size in args.sizes:
        with image_of(args, "half", size, IMAGES["half"]) as image:
            row = run_one(args, "dsamig-pwrite", image, args.channels, args.verify is True)
            row["size"] = size
            rows.append(row)
            print(f"size {size / GiB:g} GiB dsamig-pwrite {describe(row)}", flush=True)
    return rows


# -- the report ---------------------------------------------------------------------------

def med(rows: list[dict[str, Any]], key: str | Callable[[dict[str, Any]], float]) -> float:
    values = [key(r) if callable(key) else r[key] for r in rows]
    return float(statistics.median(values)) if values else float("nan")


def ratio_text(values: list[float]) -> str:
    if not values:
        return "–"
    text = f"{statistics.median(values):.2f}×"
    if len(values) > 1:
        text += f" ({min(values):.2f}–{max(values):.2f})"
    return text


def per_round(rows: list[dict[str, Any]], base: list[dict[str, Any]]) -> list[float]:
    """Per-round ratios of ``rows``'s time to ``base``'s (the same rounds)."""
    return [r["time-s"] / max(b["time-s"], 1e-9) for r, b in zip(rows, base, strict=True)]


def report_compare(args: argparse.Namespace, results: Results) -> None:
    print(f"\n### Data paths: {args.size / GiB:g} GiB images in {args.dir} ({args.fs}), "
          f"{args.channels} channels, medians of {args.runs} rounds\n")
    print("| image | contender | time s | × floor | × TCP floor | × QEMU | process wall s "
          "| CPU s send + recv | busiest recv thread | peak RSS MiB send / recv "
          "| destination MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, by in results.items():
        floor, tcp, qemu = by.get("floor"), by.get("tcp-floor"), by.get("qemu")

        def vs(rows: list[dict[str, Any]], base: list[dict[str, Any]] | None,
               contender: str, base_name: str) -> str:
            return ratio_text(per_round(rows, base)) if base and contender != base_name else "–"

        for contender, rows in by.items():
            if contender == "floor":
                what = "scan" if IMAGES[name] == 1.0 else (
                    f"write {med(rows, 'write-floor-s'):.3f} + fsync {med(rows, 'fsync-s'):.3f}")
                print(f"| {name} | floor ({what}) | {med(rows, 'time-s'):.3f} | 1.00× | "
                      f"{vs(rows, tcp, contender, 'tcp-floor')} | "
                      f"{vs(rows, qemu, contender, 'qemu')} | | | | | |")
                continue
            dsamig = contender in DSAMIG
            busiest = f"{med(rows, 'busiest-recv-thread-share'):.0%}" if dsamig else "–"
            time_s = f"{med(rows, 'time-s'):.3f}"
            if contender == "qemu":
                time_s += f" (total-time {med(rows, 'total-time-s'):.3f})"
            wall = f"{med(rows, 'wall-s'):.3f}" if dsamig else "–"
            rss = (f"{med(rows, 'send-rss-MiB'):.0f} / {med(rows, 'recv-rss-MiB'):.0f}"
                   if "send-rss-MiB" in rows[0] else "–")
            print(f"| {name} | {contender} | {time_s} | {vs(rows, floor, contender, 'floor')} "
                  f"| {vs(rows, tcp, contender, 'tcp-floor')} "
                  f"| {vs(rows, qemu, contender, 'qemu')} "
                  f"| {wall} | {med(rows, 'send-cpu-s'):.2f} + {med(rows, 'recv-cpu-s'):.2f} "
                  f"| {busiest} | {rss} | {med(rows, 'dest-alloc-MiB'):.0f} |")


def report_sweep(args: argparse.Namespace, results: Results) -> None:
    by = results["half"]
    floor = by["floor"]
    print(f"\n### Channels: {args.size / GiB:g} GiB, 50 % zero pages, in {args.dir} "
          f"({args.fs}); floor (write + fsync) {med(floor, 'time-s'):.3f} s; "
          f"medians of {args.runs}\n")
    print("| channels | pwrite s | pwrite × floor | pwrite CPU s send + recv "
          "| mmap s | mmap × floor | mmap CPU s send + recv |")
    print("|---|---|---|---|---|---|---|")
    for n in args.channels_sweep:
        cells = []
        for contender in ("dsamig-pwrite", "dsamig-mmap"):
            rows = by[f"{contender}@{n}"]
            cells += [f"{med(rows, 'time-s'):.3f}", ratio_text(per_round(rows, floor)),
                      f"{med(rows, 'send-cpu-s'):.2f} + {med(rows, 'recv-cpu-s'):.2f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")


def report_sizes(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"\n### Peak RSS against image size: dsamig-pwrite, 50 % zero pages, "
          f"{args.channels} channels, in {args.dir} ({args.fs}), one run each\n")
    print("| image | time s | sender peak RSS MiB | receiver peak RSS MiB |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['size'] / GiB:g} GiB | {row['time-s']:.3f} | {row['send-rss-MiB']:.1f} "
              f"| {row['recv-rss-MiB']:.1f} |")
    if len(rows) > 1:
        print(f"\ngrowth from {rows[0]['size'] / GiB:g} to {rows[-1]['size'] / GiB:g} GiB: "
              f"sender {rows[-1]['send-rss-MiB'] - rows[0]['send-rss-MiB']:+.1f} MiB, "
              f"receiver {rows[-1]['recv-rss-MiB'] - rows[0]['recv-rss-MiB']:+.1f} MiB")


# -- main ---------------------------------------------------------------------------------

def comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=2 * GiB, help="image size (2GiB)")
    parser.add_argument("--runs", type=int, default=5, help="rounds of the round robin")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--dir", default="/dev/shm", help="where images and destinations live")
    parser.add_argument("--images", type=comma_list, default=None,
                        help="comma list of half,none,all (default all three)")
    parser.add_argument("--contenders", type=comma_list, default=list(CONTENDERS),
                        help=f"comma list of {','.join(CONTENDERS)}")
    parser.add_argument("--qemu", action=argparse.BooleanOptionalAction, default=None,
                        help="include QEMU (default: when installed)")
    parser.add_argument("--channels-sweep", type=lambda t: [int(n) for n in comma_list(t)],
                        help="e.g. 1,2,4,8: dsamig-pwrite and -mmap per channel count")
    parser.add_argument("--sizes", type=lambda t: [parse_size(s) for s in comma_list(t)],
                        help="e.g. 2GiB,8GiB: peak RSS of one dsamig-pwrite run per size")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="compare destinations with the image (default: first round)")
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=None,
                        help="write and free the memory a run uses first (default: on tmpfs)")
    parser.add_argument("--keep", action="store_true", help="keep the images")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S,
                        help="bound of every wait, seconds")
    parser.add_argument("--json", help="write every raw figure to this file")
    args = parser.parse_args()

    modes = args.channels_sweep is not None or args.sizes is not None
    if args.images is None:
        args.images = [] if modes else list(IMAGES)
    for name in args.images:
        if name not in IMAGES:
            parser.error(f"--images: {name!r} is not one of {', '.join(IMAGES)}")
    for name in args.contenders:
        if name not in CONTENDERS:
            parser.error(f"--contenders: {name!r} is not one of {', '.join(CONTENDERS)}")
    for size in [args.size, *(args.sizes or [])]:
        if size <= 0 or size % (2 * MiB):
            parser.error(f"size {size}: a positive multiple of 2 MiB (QEMU's RAM size)")
    if args.runs < 1 or args.channels < 1:
        parser.error("--runs and --channels must be at least 1")
    if not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: not a directory")
    has_qemu = shutil.which(QEMU) is not None
    if args.qemu is None:
        args.qemu = has_qemu
    if args.qemu and not has_qemu:
        parser.error(f"--qemu: {QEMU} is not installed (apt-get install qemu-system-x86)")
    if "qemu" in args.contenders and not args.qemu:
        print(f"note: QEMU left out ({QEMU} {'not installed' if not has_qemu else 'off'})")
        args.contenders.remove("qemu")
    args.fs = fs_type(args.dir)
    if args.warm is None:
        args.warm = args.fs == "tmpfs"

    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "impl": impl.__name__, "simd": impl.simd_level(), "crc": impl.crc32c_impl(),
            "cores": os.cpu_count(), "dir": args.dir, "fs": args.fs, "size": args.size,
            "runs": args.runs, "channels": args.channels, "warm": args.warm,
            "qemu": qemu_version() if args.qemu else None}
    print(f"dsamig {meta['impl']}: simd {meta['simd']}, crc {meta['crc']}, {meta['cores']} "
          f"cores; {args.dir} is {args.fs}; {meta['qemu'] or 'no QEMU'}", flush=True)
    out: dict[str, Any] = {"meta": meta}
    try:
        if args.images:
            out["compare"] = compare(args)
        if args.channels_sweep:
            out["sweep"] = sweep(args)
        if args.sizes:
            out["sizes"] = sizes(args)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    if "compare" in out:
        report_compare(args, out["compare"])
    if "sweep" in out:
        report_sweep(args, out["sweep"])
    if "sizes" in out:
        report_sizes(args, out["sizes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
