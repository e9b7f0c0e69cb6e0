"""DSA engine benchmark, on the software DSA device at an unlimited rate.

Run by hand (not a test):

    .venv/bin/pip install numpy
    .venv/bin/python benchmarks/bench_dsa.py --runs 3

Three figures, each a median of --runs runs:

* path cost: CPU time of the DSA path per page (submit, the completion
  thread's building, submitting, polling and finishing, the hand-off through
  the eventfd and collect()) with the software device completing as fast as
  it can, for batches of 128 pages (one BATCH descriptor each) and for the
  sender's 1024-page chunks (eight of them), with and without prefaulting.
  The device's own threads are the "hardware" and are not counted.
* completion thread: its CPU seconds per GiB scanned.
* recovery: two software WQs with hardware errors on one descriptor in 500
  (``hw-error=0.002``), against the same run without faults: throughput,
  the share of pages that ended on the CPU, quarantines and re-admissions.
* transfer: ``dsamig send --engine dsa --dsa-emulate 2`` against
  ``--engine cpu`` on the same image, total time and sender CPU.

Absolute numbers on shared virtual machines move from run to run (a system
call costs about 2 us on the development VMs); compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from images import make_image

from dsamig.native import native

PAGE = 4096
GiB = 1 << 30


def path_cost(job_pages: int, prefault: bool, total_bytes: int, depth: int) -> dict[str, float]:
    """Drive a DsaEngineCore with one software WQ directly, no event loop:
    ``depth`` batches of ``job_pages`` pages in flight, half of the pages zero."""
    assert native is not None
    core = native.DsaEngineCore([{"size": 64, "max_batch_size": 128}], prefault=prefault)
    buffers = []
    for _ in range(depth):
        b = bytearray(job_pages * PAGE)
        for p in range(1, job_pages, 2):
            b[p * PAGE + 7] = 1
        buffers.append(b)
    pages_total = total_bytes // PAGE
    done = submitted = inflight = i = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    while done < pages_total:
        while inflight < depth and submitted < pages_total:
            core.submit(buffers[i % depth], PAGE, 128)
            i += 1
            inflight += 1
            submitted += job_pages
        select.select([core.fileno()], [], [], 1.0)
        for _token, _bitmap, zero, status, _cpu in core.collect():
            assert status == 0 and zero == job_pages // 2
            inflight -= 1
            done += job_pages
    wall = time.perf_counter() - t0
    caller = time.thread_time() - c0
    stats = core.stats()
    core.close()
    completion = stats["completion-thread-cpu-s"]
    jobs = done // job_pages
    return {
        "sleeps-per-batch": stats["sleeps"] / jobs,
        "wakeups-per-batch": stats["wakeups"] / jobs,
        "caller-ns-per-page": caller / done * 1e9,
        "completion-ns-per-page": completion / done * 1e9,
        "total-ns-per-page": (caller + completion) / done * 1e9,
        "completion-cpu-s-per-GiB": completion / (done * PAGE / GiB),
        "GBps": done * PAGE / wall / 1e9,
    }


def recovery(hw_error: float, total_bytes: int, seed: int) -> dict[str, float]:
    """1024-page chunks (eight in flight) on two software WQs that fail one
    descriptor in 1/hw_error with a hardware error: how much reaches the CPU."""
    assert native is not None
    faults = {"hw-error": hw_error, "seed": seed} if hw_error else {}
    core = native.DsaEngineCore([{"faults": faults}, {"faults": faults}])
    chunk = bytearray(1024 * PAGE)
    for p in range(1, 1024, 2):
        chunk[p * PAGE + 7] = 1
    pages_total = total_bytes // PAGE
    done = submitted = inflight = 0
    t0 = time.perf_counter()
    while done < pages_total:
        while inflight < 8 and submitted < pages_total:
            core.submit(chunk, PAGE, 128)
            inflight += 1
            submitted += 1024
        select.select([core.fileno()], [], [], 1.0)
        for _token, _bitmap, zero, status, _cpu in core.collect():
            assert status == 0 and zero == 512
            inflight -= 1
            done += 1024
    wall = time.perf_counter() - t0
    stats = core.stats()
    core.close()
    return {
        "GBps": done * PAGE / wall / 1e9,
        "cpu-page-share-%": 100 * stats["cpu-fallback-pages"] / done,
        "errors": stats["errors"],
        "quarantines": stats["quarantines"],
        "readmissions": stats["readmissions"],
        "wqs-out": stats["wqs-out"],
    }


def syscall_ns(n: int = 20000) -> float:
    """What one system call costs here (an eventfd write and read, halved):
    the DSA path makes a few per batch, so this sets its floor."""
    fd = os.eventfd(0)
    try:
        t = time.perf_counter()
        for _ in range(n):
            os.eventfd_write(fd, 1)
            os.eventfd_read(fd)
        return (time.perf_counter() - t) / n / 2 * 1e9
    finally:
        os.close(fd)


def run_transfer(image: str, dest: str, channels: int, extra: list[str]) -> dict[str, Any]:
    """One transfer through the CLI; the sender's JSON stats."""
    dsamig = [sys.executable, "-m", "dsamig"]
    receiver = subprocess.Popen(
        [*dsamig, "receive", "--listen", "127.0.0.1:0", "--output", dest, "--once", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert receiver.stderr is not None
    port = int(receiver.stderr.readline().rsplit(":", 1)[1])
    sent = subprocess.run(
        [*dsamig, "send", image, "--to", f"127.0.0.1:{port}", "--channels", str(channels),
         "--json", *extra], capture_output=True, text=True, timeout=600,
    )
    _out, err = receiver.communicate(timeout=600)
    if sent.returncode or receiver.returncode:
        raise SystemExit(f"transfer failed: {sent.stderr} {err}")
    os.unlink(dest)
    return dict(json.loads(sent.stdout.splitlines()[-1]))


def report(name: str, rows: list[dict[str, float]]) -> dict[str, Any]:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"\n== {name} (median of {len(rows)})")
    for key, value in med.items():
        runs = ", ".join(f"{r[key]:.3f}" for r in rows)
        print(f"  {key:<30} {value:10.3f}   runs: {runs}")
    return {"name": name, "median": med, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scan-gib", type=float, default=1.0,
                        help="bytes scanned per path-cost run, in GiB (default 1)")
    parser.add_argument("--size", type=lambda s: int(float(s) * GiB), default=GiB // 2,
                        help="transfer image size in GiB (default 0.5)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--json", help="also write every figure to this file")
    args = parser.parse_args()
    if native is None or not hasattr(native, "DsaEngineCore"):
        sys.exit("the native extension with the DSA engine is needed")
    print(f"{os.cpu_count()} cores; CPU features {native.dsa_cpu_features()}; "
          f"a system call costs {syscall_ns():.0f} ns here")
    results = []
    scan = int(args.scan_gib * GiB)
    for job_pages, depth in ((128, 8), (1024, 4)):
        for prefault in (True, False):
            rows = [path_cost(job_pages, prefault, scan, depth) for _ in range(args.runs)]
            results.append(report(
                f"path cost: {job_pages}-page batches ({depth} in flight), BATCH of 128, "
                f"prefault {'on' if prefault else 'off'}", rows))

    for hw_error in (0.0, 1 / 500):
        rows = [recovery(hw_error, scan, seed) for seed in range(args.runs)]
        results.append(report(
            f"recovery: 1024-page chunks on 2 WQs, hw-error {hw_error:g}", rows))

    image = os.path.join(args.dir, "bench-dsa.img")
    dest = os.path.join(args.dir, "bench-dsa.out")
    make_image(image, args.size, 0.5, run_pages=16)
    rows = []
    for _ in range(args.runs):
        cpu = run_transfer(image, dest, args.channels, ["--engine", "cpu"])
        dsa = run_transfer(image, dest, args.channels, ["--engine", "dsa", "--dsa-emulate", "2"])
        engine = dsa["engine"]
        threads = dsa.get("thread-cpu-s", {})
        rows.append({
            "cpu-engine-total-s": cpu["total-time"] / 1000,
            "dsa-emulated-total-s": dsa["total-time"] / 1000,
            "time-ratio-dsa/cpu": dsa["total-time"] / cpu["total-time"],
            "cpu-engine-sender-cpu-s": cpu["cpu-s"],
            "dsa-sender-cpu-s": dsa["cpu-s"],
            "dsa-device-threads-cpu-s": sum(v for k, v in threads.items()
                                            if k.startswith("dsamig-swdsa")),
            "dsa-completion-cpu-s-per-GiB": engine["completion-thread-cpu-s"]
            / (args.size / GiB),
        })
    os.unlink(image)
    results.append(report(f"transfer: {args.size / GiB:g} GiB, 50% zero, {args.channels} "
                          "channels, emulated DSA (2 WQs, unlimited rate) vs CPU engine", rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
