"""How a job is shown: JSON, the one summary table, the one progress line,
and the one rate smoother behind every rate a person reads.

The one-shot commands, ``dsamig start --wait``, ``dsamig status`` and the
daemons all use these, so a job looks the same wherever it is shown.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from dsamig.settings import JobState
from dsamig.stats import JobStats
from dsamig.units import BYTES, RateUnit, format_bytes, format_rate

#: Width of the progress bar's ``[####....]``.
BAR_WIDTH = 30


def print_json(stats: JobStats, stream: TextIO = sys.stdout) -> None:
    """One JSON object, one line: the job's stats with QEMU names."""
    stream.write(json.dumps(stats.to_dict(), sort_keys=False) + "\n")
    stream.flush()


class RateMeter:
    """Bytes per second of a growing counter, smoothed over about
    ``smoothing_s`` seconds whatever the sampling interval.

    Feed it the counter with the time of each look (``update``); ``rate`` is
    the smoothed rate, ``last_change`` when the counter last grew (the
    first look counts as growth).  The caller's clock is the only clock.
    """

    def __init__(self, smoothing_s: float = 1.0) -> None:
        self.smoothing_s = smoothing_s
        self.rate = 0.0
        self.last_change: float | None = None
        self._last: tuple[float, int] | None = None
        self._measured = False

    def update(self, counter: int, now: float) -> float:
        """Take one look at ``counter`` at time ``now``; the smoothed rate."""
        if self._last is None:
            self._last = (now, counter)
            self.last_change = now
            return self.rate
        then, before = self._last
        if now <= then:
            return self.rate
        current = max(counter - before, 0) / (now - then)
        if self._measured:
            weight = 1.0 - math.exp(-(now - then) / self.smoothing_s)
            self.rate += weight * (current - self.rate)
        else:
            self.rate = current
            self._measured = True
        if counter > before:
            self.last_change = now
        self._last = (now, counter)
        return self.rate


def rate_with_cap(rate: float, unit: RateUnit, cap: float | None) -> str:
    """``612.3 Mbit/s`` or, capped, ``612.3 Mbit/s (cap 800.0 Mbit/s)``."""
    text = format_rate(rate, unit)
    return text if cap is None else f"{text} (cap {format_rate(cap, unit)})"


def eta_text(remaining: int, rate: float) -> str:
    """``ETA 12.3 s``, or ``ETA -`` while nothing moves."""
    if remaining <= 0:
        return "ETA 0.0 s"
    if rate <= 0:
        return "ETA -"
    return f"ETA {remaining / rate:.1f} s"


def progress_line(done: int, total: int, rate: float, *, unit: RateUnit = BYTES,
                  cap: float | None = None, note: str = "") -> str:
    """``[#####.....] 1.2 GiB / 2.0 GiB  612.3 Mbit/s (cap ...)  ETA 0.3 s  note``:
    the one progress line of ``send``, ``receive`` and ``start --wait``."""
    fraction = min(done / total, 1.0) if total > 0 else 1.0
    bar = "#" * int(fraction * BAR_WIDTH)
    line = (f"[{bar:<{BAR_WIDTH}}] {format_bytes(done)} / {format_bytes(total)}  "
            f"{rate_with_cap(rate, unit, cap)}  {eta_text(total - done, rate)}")
    return f"{line}  {note}" if note else line


def reconnect_note(job: Mapping[str, Any]) -> str:
    """``reconnecting (2 so far)`` or ``3 reconnects`` for a job's JSON form; ``""``
    when it never lost a channel."""
    reconnects = max(int(job.get("sessions", 0)) - 1, 0)
    if job.get("reconnecting"):
        return f"reconnecting ({reconnects} so far)" if reconnects else "reconnecting"
    if reconnects:
        return f"{reconnects} reconnect{'s' if reconnects > 1 else ''}"
    return ""


def live_fields(stats: JobStats) -> dict[str, Any]:
    """What a job's stats tell about it while it runs, beyond ``to_dict``:
    whether it is between sessions, putting its channels back."""
    running = stats.finished is None and stats.status != JobState.SETUP
    return {"reconnecting": running and not stats.channels}


class ProgressBar:
    """:func:`progress_line` redrawn on a terminal while a job runs.

    The rate is the :class:`RateMeter` of the image bytes done, shown in
    ``unit``: that of the bandwidth cap when there is one (``800Mbit`` gives
    ``612.3 Mbit/s``), with the cap beside it.  A job that lost its channels
    says it is reconnecting, and how often it did.
    """

    def __init__(self, stats: JobStats, stream: TextIO = sys.stderr, interval_s: float = 0.2,
                 *, unit: RateUnit = BYTES, cap: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats
        self.stream = stream
        self.interval_s = interval_s
        self.unit = unit
        self.cap = cap
        self.clock = clock
        self.meter = RateMeter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Draw on the loop every ``interval_s``, if the stream is a terminal."""
        if self.stream.isatty():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.stream.write("\r" + self.line())
            self.stream.flush()
            await asyncio.sleep(self.interval_s)

    def line(self) -> str:
        """The line for the job as it is now."""
        stats = self.stats
        done = stats.counters.done_bytes
        rate = self.meter.update(done, self.clock())
        note = reconnect_note({"sessions": stats.counters.sessions, **live_fields(stats)})
        return progress_line(done, stats.total, rate, unit=self.unit, cap=self.cap,
                             note=note) + "   "

    def stop(self) -> None:
        """Stop drawing and clear the line."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()


def summary_table(job: JobStats | Mapping[str, Any]) -> str:
    """The one human table of a job: the one-shot commands' summary, and
    ``dsamig status JOB`` (whose daemon adds identity, live rates, the
    bandwidth share, channels and the queue).  Rows without figures are left out.
    """
    d: Mapping[str, Any] = job.to_dict() if isinstance(job, JobStats) else job
    total = int(d.get("total", 0))
    remaining = int(d.get("remaining", 0))
    seconds = d.get("total-time", 0) / 1000
    status = str(d.get("status", "?"))
    finished = status in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)
    rows: list[tuple[str, str]] = []
    if "id" in d:
        rows.append(("job", f"{d.get('name', '')} ({d['id']})"))
    if d.get("error-desc"):
        status += f" — {d['error-desc']}"
    if d.get("queue-reason"):
        status += f" — {d['queue-reason']}"
    rows.append(("status", status))
    if d.get("peer"):
        rows.append(("peer", str(d["peer"])))
    rows.append(("image", f"{format_bytes(total)} ({total} bytes)"))
    if not finished:
        rate = float(d.get("image-bytes-per-second", 0))
        rows.append(("remaining", f"{format_bytes(remaining)}  {eta_text(remaining, rate)}"))
    rows.append(("time", f"{seconds:.3f} s (setup {d.get('setup-time', 0):.1f} ms)"))
    rows.append(("on the wire", f"{format_bytes(d.get('transferred', 0))} at "
                                f"{d.get('mbps', 0):.0f} Mbit/s"))
    done = total - remaining
    rows.append(("image rate", f"{format_bytes(done / max(seconds, 1e-9))}/s"))
    if not finished and "wire-bytes-per-second" in d:
        rows.append(("rates now", f"wire {format_rate(d['wire-bytes-per-second'])}, image "
                                  f"{format_rate(d.get('image-bytes-per-second', 0))}"))
    if "bandwidth-limit" in d:
        rows.append(("bandwidth", _bandwidth(d)))
    rows.append(("zero pages", f"{d.get('duplicate', 0)} (not sent)"))
    rows.append(("normal pages",
                 f"{d.get('normal', 0)} ({format_bytes(d.get('normal-bytes', 0))})"))
    rows.append(("pages/s", f"{d.get('pages-per-second', 0)}"))
    rows.append(("channels", _channels(d, finished)))
    sessions = int(d.get("sessions", 0))
    if sessions:
        reconnects = sessions - 1
        rows.append(("sessions", f"{sessions} ({reconnects} reconnect"
                                 f"{'' if reconnects == 1 else 's'}), "
                                 f"{format_bytes(d.get('retransmitted-bytes', 0))} sent again"))
    if not finished and d.get("last-data-s") is not None:
        rows.append(("last data", f"{d['last-data-s']:.1f} s ago"))
    live = live_line(d, finished)
    if live:
        rows.append(("live", live))
    refresh = d.get("refresh")
    if isinstance(refresh, Mapping) and "packets-matched" in refresh:
        rows.append(("refresh", f"{refresh['packets-matched']} packets unchanged, "
                                f"{refresh.get('pages-changed', 0)} pages changed"))
    rows.append(("engine", _engine_line(d.get("engine") or {})))
    threads = d.get("thread-cpu-s") or {}
    if "cpu-s" in d and (finished or threads):
        rows.append(("CPU", f"{d['cpu-s']:.2f} s total; " + ", ".join(
            f"{name} {sec:.2f} s" for name, sec in threads.items() if sec > 0)))
    if d.get("path"):
        rows.append(("destination", str(d["path"])))
    width = max(len(k) for k, _ in rows)
    title = f"dsamig {d.get('role', '?')}"
    return "\n".join([title, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def live_line(job: Mapping[str, Any], finished: bool) -> str:
    """A live job's rounds for people: while it runs, the round it is in,
    the dirty rate and the downtime it expects; once finished, how many
    rounds it took and its downtime.  ``""`` for a job that is not live."""
    if "round" not in job and "dirty-sync-count" not in job:
        return ""
    if finished:
        rounds = int(job.get("dirty-sync-count", 0))
        text = f"{rounds} round{'' if rounds == 1 else 's'}"
        if "downtime" in job:
            text += f", downtime {job['downtime']} ms"
        return text
    text = (f"round {job.get('round', 0)}, "
            f"{job.get('dirty-pages-rate', 0)} dirty pages/s")
    if "expected-downtime" in job:
        text += f", expected downtime {job['expected-downtime']} ms"
    return text


def _bandwidth(d: Mapping[str, Any]) -> str:
    """``400.0 MiB/s (its share of the sender's cap; the job's own cap ...)``."""
    limit = d.get("bandwidth-limit")
    own = d.get("max-bandwidth")
    text = "unlimited" if limit is None else f"{format_rate(limit)}"
    if own is not None and limit is not None and limit < own:
        text += f" (a share of the sender's max_bandwidth; the job's own cap is " \
                f"{format_rate(own)})"
    elif own is None and limit is not None:
        text += " (a share of the sender's max_bandwidth)"
    return text


def _channels(d: Mapping[str, Any], finished: bool) -> str:
    per_channel = ", ".join(f"#{c['index']} {format_bytes(c['transferred'])}"
                            for c in d.get("channel-stats", []))
    if finished or "channels-connected" not in d:
        return per_channel or "-"
    wanted = d.get("channels-wanted", d.get("channels", 0))
    text = f"{d['channels-connected']} of {wanted} connected"
    note = reconnect_note(d)
    if note.startswith("reconnecting"):
        text += f", {note}"
    return text + (f"; {per_channel}" if per_channel else "")


def _engine_line(engine: Mapping[str, Any]) -> str:
    if not engine:
        return "-"
    parts = [str(engine.get("backend", "?"))]
    if "simd" in engine:
        parts.append(str(engine["simd"]))
    if engine.get("threads"):
        parts.append(f"{engine['threads']} thread(s)")
    return ", ".join(parts)
