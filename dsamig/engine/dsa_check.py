"""``dsamig dsa check``: prove every usable work queue on this host.

For each WQ it opens an engine of its own (which probes the submission
method), times NOOPs, runs COMPVAL on a test buffer of crafted pages, once
descriptor by descriptor and once as a BATCH (where the WQ takes batches),
and compares every answer with the CPU.  Then it starts the engine and
measures throughput through the same path a transfer takes, checking those
bitmaps against the CPU too.  ``dsa list`` only reads sysfs; this submits.
"""

from __future__ import annotations

import json
import os
import select
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from dsamig.dsa_config import DsaConfig
from dsamig.engine.dsa import dsa_available
from dsamig.engine.dsa_discovery import DEV_ROOT, SYSFS_ROOT, Discovery, discover
from dsamig.native import impl, native

PAGE = 4096
CHUNK_PAGES = 1024  # a sender chunk: 8 packets of 128 pages
IN_FLIGHT = 8  # chunks the throughput run keeps in the engine
DEFAULT_THROUGHPUT_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 1.0
#: What a WQ given by path but not listed in sysfs is assumed to be.
UNLISTED_SPEC = {"mode": "shared", "size": 32, "threshold": 32, "max_batch_size": 32,
                 "max_transfer_size": 2 << 20}


@dataclass
class Target:
    """One WQ to check: its name, its DsaEngineCore spec, and what to say."""

    name: str
    spec: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def targets_for(paths: list[str], emulate: int, discovery: Discovery) -> list[Target]:
    """The WQs to check: the paths given, or ``emulate`` software WQs, or every
    usable WQ that discovery found."""
    if emulate:
        return [Target(f"emulated:{i}", spec)
                for i, spec in enumerate(DsaConfig(emulate=emulate).core_specs())]
    if not paths:
        return [Target(f"{wq.device}/{wq.name}", wq.core_spec(), list(wq.notes))
                for wq in discovery.usable()]
    out = []
    for path in paths:
        info = discovery.find(path)
        if info is not None:
            out.append(Target(path, info.core_spec(), list(info.notes) + [
                f"not usable: {why}" for why in info.reasons]))
        else:
            out.append(Target(path, {"path": path, **UNLISTED_SPEC},
                              [f"not listed under {discovery.sysfs_root}: assumed a shared WQ "
                               "of 32 entries, batches of 32"]))
    return out


def crafted_chunk(index: int) -> bytearray:
    """A sender-sized chunk of mostly zero pages with non-zero ones of every
    kind (first, middle, last byte, full) spread through it."""
    data = bytearray(CHUNK_PAGES * PAGE)
    for p in range(index % 7, CHUNK_PAGES, 7):
        base = p * PAGE
        kind = (p // 7) % 4
        if kind == 0:
            data[base] = 1
        elif kind == 1:
            data[base + PAGE // 2] = 0x80
        elif kind == 2:
            data[base + PAGE - 1] = 1
        else:
            data[base:base + PAGE] = bytes(range(256)) * (PAGE // 256)
    return data


def measure_throughput(core: Any, total_bytes: int, timeout_s: float) -> dict[str, Any]:
    """Run ``total_bytes`` of crafted chunks through the started engine core,
    up to IN_FLIGHT chunks at a time; every bitmap is compared with the CPU."""
    chunks = [crafted_chunk(i) for i in range(7)]
    expected = [impl.zero_bitmap(c, PAGE, 128) for c in chunks]
    count = max(1, total_bytes // (CHUNK_PAGES * PAGE))
    before = core.stats()
    pending: dict[int, int] = {}
    mismatches = done = submitted = 0
    deadline = time.monotonic() + timeout_s * count + 30
    start = time.perf_counter()
    while done < count:
        while submitted < count and len(pending) < IN_FLIGHT:
            pending[core.submit(chunks[submitted % 7], PAGE, 128)] = submitted % 7
            submitted += 1
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{count - done} chunks never came back")
        select.select([core.fileno()], [], [], min(left, 0.5))
        for token, bitmap, zero, status, _cpu in core.collect():
            which = pending.pop(token)
            done += 1
            if status != 0 or (bitmap, zero) != expected[which]:
                mismatches += 1
    seconds = time.perf_counter() - start
    after = core.stats()
    nbytes = count * CHUNK_PAGES * PAGE
    return {
        "bytes": nbytes,
        "seconds": round(seconds, 4),
        "gb-per-s": round(nbytes / seconds / 1e9, 2),
        "descriptors": after["descriptors"] - before["descriptors"],
        "batches": after["batches"] - before["batches"],
        "cpu-fallback-pages": after["cpu-fallback-pages"] - before["cpu-fallback-pages"],
        "mismatches": mismatches,
    }


def check_target(target: Target, *, timeout_s: float, noops: int, pages: int,
                 throughput_bytes: int) -> dict[str, Any]:
    """Everything ``dsa check`` says about one WQ."""
    result: dict[str, Any] = {"name": target.name, "mode": target.spec.get("mode", "shared"),
                              "notes": target.notes, "ok": False, "error": ""}
    path = target.spec.get("path")
    if path is not None:
        try:
            if not stat.S_ISCHR(os.stat(path).st_mode):
                result["error"] = f"{path} is not a character device"
                return result
        except OSError as exc:
            result["error"] = f"cannot stat {path}: {exc.strerror}"
            return result
    assert native is not None
    try:
        core = native.DsaEngineCore([target.spec], timeout_s=timeout_s, start=False)
    except OSError as exc:
        result["error"] = exc.strerror or str(exc)
        return result
    try:
        [wq] = core.wq_stats()
        result.update({
            "method": wq["method"], "portal-note": wq["portal-note"],
            "max-batch": wq["max-batch"], "batch-note": wq["batch-note"],
            "probe-us": wq["probe-us"],
        })
        found = core.check(0, noops, pages)
        error = found.pop("error")
        result.update(found)
        if error:
            result["error"] = error
            return result
        core.start()
        result["throughput"] = measure_throughput(core, throughput_bytes, timeout_s)
        health = core.wq_stats()[0]
        if result["throughput"]["mismatches"]:
            result["error"] = (f"{result['throughput']['mismatches']} chunks disagree with "
                               "the CPU")
        elif health["state"] != "in-service":
            result["error"] = f"taken out of service during the run: {health['reason']}"
        else:
            result["ok"] = True
        return result
    finally:
        core.close()
        core.collect()


def run_check(paths: list[str] | None = None, emulate: int = 0, *,
              sysfs_root: str = SYSFS_ROOT, dev_root: str = DEV_ROOT,
              timeout_s: float = DEFAULT_TIMEOUT_S, noops: int = 32, pages: int = 64,
              throughput_bytes: int = DEFAULT_THROUGHPUT_BYTES) -> dict[str, Any]:
    """The ``dsamig dsa check --json`` object."""
    discovery = discover(sysfs_root, dev_root)
    report: dict[str, Any] = {"ok": False, "message": "", "wqs": [],
                              "cpu": discovery.to_dict()["cpu"]}
    why_not = dsa_available()
    if why_not is not None:
        report["message"] = f"cannot check: {why_not}"
        return report
    targets = targets_for(list(paths or []), emulate, discovery)
    if not targets:
        report["message"] = f"nothing to check: {discovery.why_none()}"
        return report
    report["wqs"] = [check_target(t, timeout_s=timeout_s, noops=noops, pages=pages,
                                  throughput_bytes=throughput_bytes) for t in targets]
    passed = sum(w["ok"] for w in report["wqs"])
    report["ok"] = passed == len(targets)
    report["message"] = f"{passed} of {len(targets)} work queue(s) passed"
    return report


def format_report(report: dict[str, Any]) -> str:
    """``dsamig dsa check`` as text."""
    lines = [report["message"]]
    for wq in report["wqs"]:
        method = wq.get("method")
        how = f"{wq['mode']}, {method}" if method else wq["mode"]
        lines.append("")
        lines.append(f"{wq['name']} ({how}): {'ok' if wq['ok'] else 'FAILED'}")
        if wq["error"]:
            lines.append(f"  error: {wq['error']}")
        for key in ("portal-note", "batch-note"):
            if wq.get(key):
                lines.append(f"  note: {wq[key]}")
        for text in wq["notes"]:
            lines.append(f"  note: {text}")
        noop = wq.get("noop")
        if noop and noop["count"]:
            lines.append(f"  probe {wq['probe-us']} us; NOOP median {noop['median-us']} us "
                         f"(min {noop['min-us']}, max {noop['max-us']}, {noop['count']} runs)")
        compval = wq.get("compval")
        if compval and compval["pages"]:
            agree = ("all agree with the CPU" if not compval["mismatches"]
                     else f"{compval['mismatches']} disagree with the CPU")
            lines.append(f"  COMPVAL on {compval['pages']} test pages: {agree}, median "
                         f"{compval['median-us']} us")
        batch = wq.get("batch")
        if batch and batch["ok"] is not None:
            agree = ("all agree with the CPU" if not batch["mismatches"]
                     else f"{batch['mismatches']} disagree with the CPU")
            lines.append(f"  BATCH of {batch['pages']} COMPVALs: {agree}, {batch['us']} us")
        elif batch:
            lines.append("  BATCH: not used on this WQ (one descriptor per page)")
        speed = wq.get("throughput")
        if speed:
            lines.append(
                f"  throughput: {speed['bytes'] >> 20} MiB in {speed['seconds']} s = "
                f"{speed['gb-per-s']} GB/s ({speed['descriptors']} descriptors, "
                f"{speed['batches']} batches, {speed['cpu-fallback-pages']} pages on the CPU)")
    return "\n".join(lines)


def check_command(as_json: bool = False, paths: list[str] | None = None, emulate: int = 0,
                  timeout_s: float = DEFAULT_TIMEOUT_S,
                  throughput_bytes: int = DEFAULT_THROUGHPUT_BYTES,
                  sysfs_root: str = SYSFS_ROOT, dev_root: str = DEV_ROOT) -> int:
    """``dsamig dsa check [--json]``: 0 when every WQ checked passed, 1 when
    one failed or there was nothing to check (the message says why)."""
    report = run_check(paths, emulate, sysfs_root=sysfs_root, dev_root=dev_root,
                       timeout_s=timeout_s, throughput_bytes=throughput_bytes)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0 if report["ok"] else 1
