"""When a live transfer stops iterating: the pre-copy policy, without I/O.

A live job moves the image in rounds while its writer keeps writing (round
0: everything; each later round: the pages that changed since they were
sent). Before each round the sender rescans the image; :class:`LivePolicy`
then predicts how long a final round would take with the writer paused,
and says whether to pause now. The figures use QEMU's ``query-migrate``
names: ``dirty-sync-count``, ``dirty-pages-rate``, ``expected-downtime``,
``downtime``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Final

#: What a final round costs beyond its scan and its bytes: the round barrier,
#: END on every channel, the receiver's fsync and rename, COMMIT.
COMMIT_ALLOWANCE_S: Final = 0.02
#: Rounds that must each find at least this share of the previous round's
#: changes before the dirty rate counts as not converging.
STALL_SHARE: Final = 0.95
STALL_ROUNDS: Final = 3


@dataclass(frozen=True)
class Decision:
    """The policy's answer after a scan."""

    final: bool
    reason: str
    #: Predicted time from the pause to COMMIT if the final round ran now.
    expected_downtime_s: float


@dataclass
class RoundFigures:
    """One round: what its scan found, and what it sent."""

    round: int
    dirty_pages: int
    scan_s: float
    pages: int = 0
    bytes: int = 0
    time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "pages": self.pages, "bytes": self.bytes,
                "time-ms": round(self.time_s * 1000, 3), "dirty-pages": self.dirty_pages,
                "scan-ms": round(self.scan_s * 1000, 3)}


@dataclass
class LivePolicy:
    """Decides, after each scan, whether the next round is the final one.

    The final round runs with the writer paused: it must rescan the whole
    image (content-based change detection) and send what the scan finds,
    so its time is predicted as the scan's time plus the changed bytes at the
    rate the last round achieved. The job pauses when that fits
    ``max_downtime_s``; when the scan found no change (more rounds cannot
    shorten the final one's scan); when ``max_rounds``
    rounds have run; or when the changes stop shrinking (each of the last
    rounds found nearly as much as the one before): iterating on would not
    help.
    """

    max_downtime_s: float = 0.3
    max_rounds: int = 30
    rounds: list[RoundFigures] = field(default_factory=list)
    #: Bytes per second the last round moved (round 0's at first).
    rate: float = 0.0
    expected_downtime_s: float = 0.0
    dirty_pages_rate: float = 0.0

    def round_sent(self, figures: RoundFigures) -> None:
        """A round went out: learn the rate."""
        self.rounds.append(figures)
        if figures.time_s > 0 and figures.bytes:
            self.rate = figures.bytes / figures.time_s

    def decide(self, round_number: int, dirty_pages: int, dirty_bytes: int, scan_s: float,
               since_last_scan_s: float) -> Decision:
        """After the scan before round ``round_number`` (1, 2, ...)."""
        if since_last_scan_s > 0:
            self.dirty_pages_rate = dirty_pages / since_last_scan_s
        send_s = dirty_bytes / self.rate if self.rate > 0 else float("inf") if dirty_bytes else 0
        expected = scan_s + send_s + COMMIT_ALLOWANCE_S
        self.expected_downtime_s = expected
        if expected <= self.max_downtime_s:
            return Decision(True, "the final round fits the downtime budget", expected)
        if dirty_pages == 0:
            # Every round rescans the whole image: with nothing to send, another
            # round would cost a scan and shorten nothing.
            return Decision(True, "nothing changed since the last round", expected)
        if round_number >= self.max_rounds:
            return Decision(True, f"max_rounds ({self.max_rounds}) reached", expected)
        found = [r.dirty_pages for r in self.rounds[-STALL_ROUNDS:]] + [dirty_pages]
        if len(found) > STALL_ROUNDS and all(
            later >= STALL_SHARE * earlier for earlier, later in pairwise(found)
        ):
            return Decision(True, "the dirty rate is not converging", expected)
        return Decision(False, "iterating", expected)

    def to_dict(self) -> dict[str, Any]:
        """The figures, with QEMU's names where it has them."""
        figures: dict[str, Any] = {
            "dirty-sync-count": len(self.rounds),
            "dirty-pages-rate": round(self.dirty_pages_rate),
            "rounds": [r.to_dict() for r in self.rounds],
        }
        # Unknown until a round has measured the link (a resumed round 0 may
        # have sent nothing): left out rather than shown as a number.
        if math.isfinite(self.expected_downtime_s):
            figures["expected-downtime"] = round(self.expected_downtime_s * 1000)
        return figures


__all__ = ["COMMIT_ALLOWANCE_S", "Decision", "LivePolicy", "RoundFigures"]
