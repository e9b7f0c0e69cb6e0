"""When a live job stops iterating: LivePolicy's decisions and figures."""

from __future__ import annotations

import pytest

from dsamig.proto.live import COMMIT_ALLOWANCE_S, LivePolicy, RoundFigures

PAGE = 4096
#: Round 0 moved 100 MiB in a second: the policy's rate is 100 MiB/s.
ROUND0 = RoundFigures(0, 25600, 0.0, 25600, 100 << 20, 1.0)


def policy(**kwargs: float) -> LivePolicy:
    live = LivePolicy(**kwargs)  # type: ignore[arg-type]
    live.round_sent(ROUND0)
    return live


def decide(live: LivePolicy, round_number: int, pages: int, scan_s: float = 0.05,
           since_s: float = 1.0):  # type: ignore[no-untyped-def]
    return live.decide(round_number, pages, pages * PAGE, scan_s, since_s)


def test_a_final_round_that_fits_the_budget_pauses_now() -> None:
    live = policy(max_downtime_s=0.3)
    # 5 000 pages = 19.5 MiB at 100 MiB/s: 0.195 s + 0.05 s scan + allowance.
    decision = decide(live, 1, 5000)
    assert decision.final and decision.reason == "the final round fits the downtime budget"
    assert decision.expected_downtime_s == pytest.approx(
        0.05 + 5000 * PAGE / (100 << 20) + COMMIT_ALLOWANCE_S)
    assert live.dirty_pages_rate == 5000.0


def test_a_scan_that_finds_nothing_pauses_now() -> None:
    # The scan alone (0.4 s) exceeds 0.3 s and found no change: another round
    # would cost a scan and leave the final one as long.
    decision = decide(policy(max_downtime_s=0.3), 1, 0, scan_s=0.4)
    assert decision.final and decision.reason == "nothing changed since the last round"


def test_a_few_changes_are_iterated_on_while_the_scan_exceeds_the_budget() -> None:
    # A round's send rate is only known once one ran: a few pages may cost
    # far more than their bytes suggest, so they do not end the iteration.
    decision = decide(policy(max_downtime_s=0.3), 1, 100, scan_s=0.4)
    assert not decision.final and decision.reason == "iterating"


def test_changes_that_take_long_to_send_are_iterated_on() -> None:
    decision = decide(policy(max_downtime_s=0.3), 1, 50_000, scan_s=0.4)
    assert not decision.final and decision.reason == "iterating"


def test_max_rounds_ends_the_iteration() -> None:
    live = policy(max_downtime_s=0.3, max_rounds=2)
    assert not decide(live, 1, 50_000).final
    live.round_sent(RoundFigures(1, 50_000, 0.05, 50_000, 50_000 * PAGE, 2.0))
    decision = decide(live, 2, 40_000)
    assert decision.final and decision.reason == "max_rounds (2) reached"


def test_changes_that_stop_shrinking_end_the_iteration() -> None:
    live = policy(max_downtime_s=0.3)
    found = [20_000, 19_500, 19_000, 18_800]  # round 0 found 25 600
    for number, pages in enumerate(found[:-1], 1):
        assert not decide(live, number, pages).final
        live.round_sent(RoundFigures(number, pages, 0.05, pages, pages * PAGE, 2.0))
    decision = decide(live, len(found), found[-1])
    assert decision.final and decision.reason == "the dirty rate is not converging"


def test_figures_use_qemus_names() -> None:
    live = policy()
    decide(live, 1, 50_000, since_s=2.0)
    assert live.to_dict() == {
        "dirty-sync-count": 1, "dirty-pages-rate": 25_000,
        "expected-downtime": round(live.expected_downtime_s * 1000),
        "rounds": [{"round": 0, "pages": 25600, "bytes": 100 << 20, "time-ms": 1000.0,
                    "dirty-pages": 25600, "scan-ms": 0.0}],
    }
