"""Transfer benchmark: dsamig against floors measured in the same run.

Run by hand (not a test):

    apt-get install iperf3
    .venv/bin/pip install numpy
    .venv/bin/python benchmarks/bench_transfer.py --runs 3

Every figure is a ratio against a floor measured on the same machine in the
same run, because shared virtual machines are noisy and slow to hand out
memory the guest has not touched recently:

* network floor: the image's non-zero bytes / iperf3's one-stream loopback rate
* write floor: pwrite of the image's non-zero pages into a fresh sparse file
* scan floor: a plain numpy read of the image (or of the in-memory buffer)

Images and destinations live in --dir (/dev/shm by default); every
destination is fresh.  Prints medians and the per-run figures.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from images import make_image

from dsamig.native import impl

PAGE = 4096
GiB = 1 << 30
MADV_POPULATE_READ = 22  # Linux 5.14; not in Python 3.11's mmap module


def iperf3_rate(seconds: int = 3) -> float:
    """One-stream loopback TCP rate in bytes/s."""
    if shutil.which("iperf3") is None:
        sys.exit("iperf3 is needed for the network floor: apt-get install iperf3")
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", "5399"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", "5399", "-t", str(seconds), "-J"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        server.wait(timeout=10)
    end = json.loads(out)["end"]["sum_received"]
    return end["bytes"] / end["seconds"]


def normal_runs(path: str) -> tuple[list[tuple[int, int]], int]:
    """Runs of non-zero pages of an image, and its non-zero byte count (untimed prep).

    Read with read(), never through a mapping: a read fault on a tmpfs hole
    allocates a page, and the image must stay as sparse as it was written.
    """
    runs: list[tuple[int, int]] = []
    chunk = 64 * 1024 * 1024
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        base = 0
        while n := f.readinto(buf):
            bitmap, _ = impl.zero_bitmap(memoryview(buf)[:n], PAGE)
            first_page = base // PAGE
            runs += [(first_page + p, c) for p, c in impl.normal_runs(bitmap, -(-n // PAGE))]
            base += n
    return runs, sum(min(c * PAGE, size - f * PAGE) for f, c in runs)


def write_floor(image: str, dest: str, runs: list[tuple[int, int]]) -> float:
    """Seconds to pwrite the non-zero pages into a fresh sparse file."""
    size = os.path.getsize(image)
    with open(image, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        view = memoryview(m)
        for first, count in runs:  # map the source pages: we time the writes only
            m.madvise(MADV_POPULATE_READ, first * PAGE, min(count * PAGE, size - first * PAGE))
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        t = time.perf_counter()
        for first, count in runs:
            os.pwrite(fd, view[first * PAGE : (first + count) * PAGE], first * PAGE)
        elapsed = time.perf_counter() - t
        os.close(fd)
        view.release()
    os.unlink(dest)
    return elapsed


def scan_floor_file(image: str, holes: bool) -> float:
    """Seconds for numpy to read every byte of the image: through a fresh
    mapping (the faster floor), or with read() into a reused 32 MiB buffer
    when the image has holes, since a read fault on a tmpfs hole allocates a
    page and would un-sparse the image."""
    size = os.path.getsize(image)
    if not holes:
        with open(image, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            arr = np.frombuffer(m, dtype=np.uint64, count=size // 8)
            t = time.perf_counter()
            step = 1 << 22
            for i in range(0, arr.size, step):
                arr[i : i + step].any()
            elapsed = time.perf_counter() - t
            del arr
        return elapsed
    buf = np.empty(1 << 22, dtype=np.uint64)
    view = memoryview(buf).cast("B")
    with open(image, "rb", buffering=0) as f:
        t = time.perf_counter()
        while n := f.readinto(view):
            buf[: n // 8].any()
        return time.perf_counter() - t


def run_transfer(
    image: str, dest: str, args: argparse.Namespace, extra: list[str]
) -> dict[str, Any]:
    """One real transfer through the CLI; both sides' JSON stats."""
    dsamig = [sys.executable, "-m", "dsamig"]
    receiver = subprocess.Popen(
        [*dsamig, "receive", "--listen", "127.0.0.1:0", "--output", dest, "--once", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert receiver.stderr is not None
    port = int(receiver.stderr.readline().rsplit(":", 1)[1])
    sent = subprocess.run(
        [*dsamig, "send", image, "--to", f"127.0.0.1:{port}", "--channels", str(args.channels),
         "--json", *extra], capture_output=True, text=True, timeout=600,
    )
    out, err = receiver.communicate(timeout=600)
    if sent.returncode or receiver.returncode:
        raise SystemExit(f"transfer failed: {sent.stderr} {err}")
    s, r = json.loads(sent.stdout.splitlines()[-1]), json.loads(out.splitlines()[-1])
    os.unlink(dest)
    return {"sender": s, "receiver": r}


def warm_memory(directory: str, nbytes: int) -> None:
    """Write and delete a file so the guest has touched the memory tmpfs will use."""
    path = os.path.join(directory, "warm.tmp")
    block = b"\xa5" * (1 << 24)
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
    os.unlink(path)


Check = Callable[[dict[str, float]], str]


def median_report(
    name: str, rows: list[dict[str, float]], checks: dict[str, Check]
) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\n== {name} (median of {len(rows)})")
    for key, value in med.items():
        print(f"  {key:<34} {value:10.3f}   runs: {', '.join(f'{r[key]:.3f}' for r in rows)}")
    for label, check in checks.items():
        print(f"  {label:<34} {check(med)}")
    return {"name": name, "median": med, "runs": rows}


def scenario_transfer(args: argparse.Namespace, label: str, zero_fraction: float, net_rate: float,
                      holes: bool = False, extra: list[str] | None = None) -> dict[str, Any]:
    image = os.path.join(args.dir, f"bench-{label}.img")
    dest = os.path.join(args.dir, f"bench-{label}.out")
    make_image(image, args.size, zero_fraction, holes=holes, run_pages=args.zero_run)
    runs, nonzero = normal_runs(image)
    rows = []
    for _ in range(args.runs):
        warm_memory(args.dir, args.size)
        wf = write_floor(image, dest, runs)
        sf = scan_floor_file(image, holes)
        warm_memory(args.dir, args.size)
        result = run_transfer(image, dest, args, extra or [])
        s, r = result["sender"], result["receiver"]
        total_s = s["total-time"] / 1000
        nf = nonzero / net_rate
        cpu = s["cpu-s"] + r["cpu-s"]
        rows.append({
            "total-time-s": total_s,
            "network-floor-s": nf,
            "write-floor-s": wf,
            "scan-floor-s": sf,
            "ratio-vs-max(net,write)": total_s / max(nf, wf, 1e-9),
            "ratio-vs-scan-floor": total_s / max(sf, 1e-9),
            "cpu-s-per-GiB": cpu / (args.size / GiB),
            "sender-cpu-s": s["cpu-s"],
            "receiver-cpu-s": r["cpu-s"],
            "sender-peak-rss-MiB": s["peak-rss-bytes"] / 2**20,
            "receiver-peak-rss-MiB": r["peak-rss-bytes"] / 2**20,
        })
    os.unlink(image)
    checks = {
        "target total ≤ 1.25× max(net, write)": lambda m: f"{m['ratio-vs-max(net,write)']:.2f}×",
        "target CPU ≤ 0.75 s/GiB (50 % zero)": lambda m: f"{m['cpu-s-per-GiB']:.2f} s/GiB",
    }
    if zero_fraction == 1.0:
        checks = {"target total ≤ 2× scan floor + 50 ms":
                  lambda m: f"{m['total-time-s']:.3f} s vs {2 * m['scan-floor-s'] + 0.05:.3f} s"}
    return median_report(f"{label}: {args.size / GiB:g} GiB, {zero_fraction:.0%} zero "
                         f"in runs of {args.zero_run} pages"
                         f"{' (holes)' if holes else ''}, {args.channels} channels", rows, checks)


def scenario_rss(args: argparse.Namespace) -> dict[str, Any]:
    """Peak resident memory of both sides for a 2 GiB and an 8 GiB image."""
    rows = []
    for _ in range(args.runs):
        row: dict[str, float] = {}
        for gib in (2, 8):
            image = os.path.join(args.dir, f"bench-rss{gib}.img")
            dest = os.path.join(args.dir, f"bench-rss{gib}.out")
            make_image(image, gib * GiB, 0.5, run_pages=args.zero_run)
            result = run_transfer(image, dest, args, [])
            os.unlink(image)
            row[f"sender-peak-rss-MiB-{gib}GiB"] = result["sender"]["peak-rss-bytes"] / 2**20
            row[f"receiver-peak-rss-MiB-{gib}GiB"] = result["receiver"]["peak-rss-bytes"] / 2**20
        row["sender-growth-MiB"] = (
            row["sender-peak-rss-MiB-8GiB"] - row["sender-peak-rss-MiB-2GiB"]
        )
        row["receiver-growth-MiB"] = (
            row["receiver-peak-rss-MiB-8GiB"] - row["receiver-peak-rss-MiB-2GiB"]
        )
        rows.append(row)
    return median_report("rss: 2 GiB vs 8 GiB image, 50% zero", rows,
                         {"target growth ≤ 64 MiB": lambda m:
                          f"sender {m['sender-growth-MiB']:.1f}, "
                          f"receiver {m['receiver-growth-MiB']:.1f} MiB"})


def scenario_scan(args: argparse.Namespace) -> dict[str, Any]:
    """CPU engine on one core over an in-memory all-zero buffer vs a numpy read."""
    buf = np.ones(args.size // 8, dtype=np.uint64)
    buf[:] = 0  # touched, so neither side pays first-touch faults
    rows = []
    for _ in range(args.runs):
        t = time.perf_counter()
        step = 1 << 22
        for i in range(0, buf.size, step):
            buf[i : i + step].any()
        floor = time.perf_counter() - t
        t = time.perf_counter()
        _, zero = impl.zero_bitmap(buf, PAGE, 128)
        engine = time.perf_counter() - t
        assert zero == args.size // PAGE
        rows.append({"scan-floor-GBps": args.size / floor / 1e9,
                     "engine-GBps": args.size / engine / 1e9,
                     "engine/floor rate": floor / engine})
    return median_report(f"scan: {args.size / GiB:g} GiB in-memory zero buffer, one core", rows,
                         {"target ≥ 0.8× the scan floor's rate":
                          lambda m: f"{m['engine/floor rate']:.2f}×"})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--size", type=lambda s: int(float(s) * GiB), default=2 * GiB,
                        help="image size in GiB (default 2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--scenarios", default="scan,half,full,zero,sparse",
                        help="comma list of scan,half,full,zero,sparse,rss")
    parser.add_argument("--zero-run", type=int, default=16,
                        help="zero pages come in runs of this many pages (1: scattered)")
    parser.add_argument("--json", help="also write all figures to this file")
    args = parser.parse_args()
    wanted = args.scenarios.split(",")
    print(f"dsamig {impl.__name__}: simd {impl.simd_level()}, crc {impl.crc32c_impl()}, "
          f"{os.cpu_count()} cores")
    net_rate = iperf3_rate()
    print(f"iperf3 one-stream loopback: {net_rate / 1e9:.2f} GB/s")
    results = []
    if "scan" in wanted:
        results.append(scenario_scan(args))
    if "half" in wanted:
        results.append(scenario_transfer(args, "half", 0.5, net_rate))
    if "full" in wanted:
        results.append(scenario_transfer(args, "full", 0.0, net_rate))
    if "zero" in wanted:
        results.append(scenario_transfer(args, "zero", 1.0, net_rate))
    if "sparse" in wanted:
        results.append(scenario_transfer(args, "sparse", 1.0, net_rate, holes=True))
    if "rss" in wanted:
        results.append(scenario_rss(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"iperf3-Bps": net_rate, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
