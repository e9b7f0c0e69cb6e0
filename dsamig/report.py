"""What the one-shot commands print: JSON, a progress bar, a summary table."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

from dsamig.stats import JobStats
from dsamig.units import BYTES, RateUnit, format_bytes, format_rate


def print_json(stats: JobStats, stream: TextIO = sys.stdout) -> None:
    """One JSON object, one line: the job's stats with QEMU names."""
    stream.write(json.dumps(stats.to_dict(), sort_keys=False) + "\n")
    stream.flush()


def summary_table(stats: JobStats) -> str:
    """A human summary of a finished job."""
    d = stats.to_dict()
    seconds = d["total-time"] / 1000
    rows: list[tuple[str, str]] = [
        ("status", d["status"] + (f" — {d['error-desc']}" if "error-desc" in d else "")),
        ("image", f"{format_bytes(d['total'])} ({d['total']} bytes)"),
        ("total time", f"{seconds:.3f} s (setup {d['setup-time']:.1f} ms)"),
        ("on the wire", f"{format_bytes(d['transferred'])} at {d['mbps']:.0f} Mbit/s"),
        ("image rate", f"{format_bytes(d['total'] / max(seconds, 1e-9))}/s"),
        ("zero pages", f"{d['duplicate']} (not sent)"),
        ("normal pages", f"{d['normal']} ({format_bytes(d['normal-bytes'])})"),
        ("pages/s", f"{d['pages-per-second']}"),
        ("channels", ", ".join(
            f"#{c['index']} {format_bytes(c['transferred'])}" for c in d["channel-stats"]
        ) or "-"),
        ("engine", _engine_line(d["engine"])),
        ("CPU", f"{d['cpu-s']:.2f} s total; " + ", ".join(
            f"{name} {sec:.2f} s" for name, sec in d["thread-cpu-s"].items() if sec > 0
        )),
    ]
    width = max(len(k) for k, _ in rows)
    title = f"dsamig {d['role']}"
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def _engine_line(engine: dict[str, Any]) -> str:
    if not engine:
        return "-"
    parts = [str(engine.get("backend", "?"))]
    if "simd" in engine:
        parts.append(str(engine["simd"]))
    if engine.get("threads"):
        parts.append(f"{engine['threads']} thread(s)")
    return ", ".join(parts)


def rate_with_cap(rate: float, unit: RateUnit, cap: float | None) -> str:
    """``612.3 Mbit/s`` or, capped, ``612.3 Mbit/s (cap 800.0 Mbit/s)``."""
    text = format_rate(rate, unit)
    return text if cap is None else f"{text} (cap {format_rate(cap, unit)})"


class ProgressBar:
    """``[#####.....] 1.2 GiB / 2.0 GiB  3.4 GiB/s  ETA 0.3 s`` on a terminal.

    The rate is shown in ``unit``: that of the bandwidth cap when there is one
    (``800Mbit`` gives ``612.3 Mbit/s``), with the cap beside it.
    """

    def __init__(self, stats: JobStats, stream: TextIO = sys.stderr, interval_s: float = 0.2,
                 *, unit: RateUnit = BYTES, cap: float | None = None) -> None:
        self.stats = stats
        self.stream = stream
        self.interval_s = interval_s
        self.unit = unit
        self.cap = cap
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.stream.isatty():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        last_t, last_b = time.monotonic(), 0
        rate = 0.0
        while True:
            await asyncio.sleep(self.interval_s)
            now, done = time.monotonic(), self.stats.counters.done_bytes
            if now > last_t:
                current = (done - last_b) / (now - last_t)
                rate = current if rate == 0 else 0.7 * rate + 0.3 * current
            last_t, last_b = now, done
            self.stream.write("\r" + self.line(done, rate))
            self.stream.flush()

    def line(self, done: int, rate: float) -> str:
        total = max(self.stats.total, 1)
        fraction = min(done / total, 1.0)
        bar = "#" * int(fraction * 30)
        eta = f"ETA {(total - done) / rate:.1f} s" if rate > 0 else "ETA -"
        return (
            f"[{bar:<30}] {format_bytes(done)} / {format_bytes(self.stats.total)}  "
            f"{rate_with_cap(rate, self.unit, self.cap)}  {eta}   "
        )

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()
