"""The receive-side fuzz target (receiver_fuzz.py) as a hypothesis state machine.

Every rule is one operation of :class:`ReceiverFuzz`; the target checks its
rules after each (bounded memory and lines of Python per frame, nothing
committed but what the accepted frames describe, nothing but a
RemoteProtocolError out of the receiver). The examples are bounded so that
the suite stays fast; fuzz/fuzz_receiver.py runs the same target for long.
"""

from __future__ import annotations

import os
import random
import tracemalloc

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from dsamig import _pure
from dsamig.proto import LocalProtocolError
from tests.protocol.receiver_fuzz import (
    LINE_BUDGET,
    MEMORY_BOUND,
    BudgetExceeded,
    Finding,
    FuzzImage,
    LineCounter,
    ReceiverFuzz,
    run_program,
)

cuts = st.lists(st.integers(0, 255), max_size=3).map(tuple)


class ReceiverMachine(RuleBasedStateMachine):
    """Operations on one receiver in memory, in any order."""

    target: ReceiverFuzz

    @initialize(seed=st.integers(0, 2**32 - 1), whole=st.booleans(), channels=st.integers(0, 2))
    def start(self, seed: int, whole: bool, channels: int) -> None:
        self.target = ReceiverFuzz(FuzzImage.make(random.Random(seed)), measure=True)
        if whole:
            self.target.valid_job(channels)

    # Hypothesis picks rules evenly; most of them leave the job alive, so that
    # examples get deep (commits, resumes), and one rule holds every frame
    # that breaks a rule.

    @rule(choices=st.lists(st.integers(0, 2**16), min_size=1, max_size=24))
    def correct_sender(self, choices: list[int]) -> None:
        for choice in choices:
            self.target.sender_step(choice)

    @rule(position=st.integers(0, 7), n=st.integers(0, 1 << 10),
          kind=st.sampled_from(["valid", "other", "zeros"]), pieces=cuts)
    def any_packet(self, position: int, n: int, kind: str, pieces: tuple[int, ...]) -> None:
        self.target.packet(position, n, kind, pieces)

    @rule(channels=st.integers(0, 2), index=st.integers(0, 7),
          kind=st.sampled_from(ReceiverFuzz.HELLO_KINDS), pieces=cuts)
    def hello(self, channels: int, index: int, kind: str, pieces: tuple[int, ...]) -> None:
        self.target.hello(channels, index, kind, pieces)

    @rule(layout=st.integers(0, 4))
    def foreign_job(self, layout: int) -> None:
        self.target.foreign_job(layout)

    @rule(data=st.data(), position=st.integers(0, 7))
    def broken_frame(self, data: st.DataObject, position: int) -> None:
        target = self.target
        kind = data.draw(st.sampled_from(["packet", "zero_range", "end", "commit_request",
                                          "other_frame"]))
        if kind == "packet":
            target.packet(position, data.draw(st.integers(0, 1 << 10)),
                          data.draw(st.sampled_from(ReceiverFuzz.PACKET_KINDS)), data.draw(cuts))
        elif kind == "zero_range":
            target.zero_range(position, data.draw(st.integers(0, 1 << 10)),
                              data.draw(st.integers(0, 63)),
                              data.draw(st.sampled_from(ReceiverFuzz.ZERO_KINDS)))
        elif kind == "end":
            target.end(position, data.draw(st.sampled_from([0, 1, -1])))
        elif kind == "commit_request":
            target.commit_request(position, data.draw(st.sampled_from(ReceiverFuzz.REQUEST_KINDS)))
        else:
            target.other_frame(position, data.draw(st.sampled_from(ReceiverFuzz.OTHER_KINDS)),
                               data.draw(st.binary(min_size=1, max_size=64)))

    @rule(position=st.integers(0, 7), how=st.sampled_from(["reset", "eof"]),
          partial=st.integers(0, 1 << 16))
    def cut(self, position: int, how: str, partial: int) -> None:
        self.target.cut(position, how, partial)

    @rule()
    def land(self) -> None:
        self.target.land()

    @rule(seconds=st.sampled_from([0.01, 0.3, 2.0, 11.0]))
    def advance(self, seconds: float) -> None:
        self.target.advance(seconds)

    @rule(garbage=st.integers(0, 2**30), damage=st.integers(-1, 1 << 16))
    def crash(self, garbage: int, damage: int) -> None:
        self.target.crash(garbage, damage)

    def teardown(self) -> None:
        tracemalloc.stop()  # only while the machine runs: it slows everything
        if hasattr(self, "target"):  # --hypothesis-show-statistics says how deep it went
            event(f"commits: {min(self.target.commits, 3)}")


# DSAMIG_FUZZ_EXAMPLES raises the count, as for test_fuzz.py.
ReceiverMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("DSAMIG_FUZZ_EXAMPLES", "400")) // 8,
    stateful_step_count=40,
    deadline=None,
    # The target counts lines with sys.settrace; the explain phase traces too.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestReceiverMachine = ReceiverMachine.TestCase


def test_random_programs() -> None:
    """The long-run driver's programs (fuzz/fuzz_receiver.py), a few of them."""
    commits = 0
    try:
        for seed in range(60):
            target = run_program(seed, measure=seed % 3 == 0)
            commits += target.commits
            assert target.peak_bytes <= MEMORY_BOUND and target.peak_lines <= LINE_BUDGET
    finally:
        tracemalloc.stop()
    assert commits > 60  # most programs reach a commit or two: rule (b) is exercised


def late_checkpoint(old_defects: bool) -> ReceiverFuzz:
    """A job's checkpoint is still being written when a restarted sender's new
    job takes its partial file over; then the receiver dies, and the sender
    resumes once more."""
    target = ReceiverFuzz(FuzzImage.make(random.Random(3)), old_defects=old_defects)
    count = target.manifest.packet_count
    target.hello(0, 0, "resume")  # one channel
    target.packet(0, 0, "valid")
    target.advance(0.3)
    target.land()  # checkpoint: packet 0
    for n in range(1, count):
        target.packet(0, n, "valid")
    target.end(0, 0)
    target.advance(0.01)  # checkpoint of every packet begins, not yet durable
    target.cut(0, "reset", 0)
    target.hello(0, 0, "new_job")  # takes the file over from packet 0's checkpoint
    target.land()  # the old job's checkpoint lands, if it may
    target.crash(garbage=1)
    target.hello(0, 0, "resume")
    target.end(0, 0)
    target.commit_request(0, "image")
    return target


def test_the_target_sees_a_checkpoint_landing_late() -> None:
    # PageSink let a checkpoint of a file kept for resume land after its job
    # failed, even after another job took the file over and punched out what
    # its own checkpoint did not cover: the late record then claims packets
    # the file does not hold, with the image's records, and the job commits
    # the wrong bytes. A defect the transport had, copied when asked.
    assert FuzzImage.make(random.Random(3)).manifest.packet_count > 2
    with pytest.raises(Finding, match="do not have the digest"):
        late_checkpoint(old_defects=True)
    target = late_checkpoint(old_defects=False)
    assert target.commits == 0  # resumed from packet 0 only: the rest is missing
    for choice in range(40):
        target.sender_step(choice)
    assert target.commits == 1


def stale_commit(old_defects: bool) -> ReceiverFuzz:
    """Channel 0 ENDs and asks to commit while channel 1 still streams; the
    sender reconnects; the new session ends without asking again yet."""
    target = ReceiverFuzz(FuzzImage.make(random.Random(7)), old_defects=old_defects)
    target.hello(1, 0, "resume")
    target.hello(1, 1, "join")
    for n in range(target.manifest.packet_count):
        target.packet(0, n, "valid")
    target.end(0, 0)
    target.commit_request(0, "image")
    target.hello(1, 0, "resume")  # a new session
    target.hello(1, 1, "join")
    target.end(2, 0)
    target.end(3, 0)
    return target


def test_a_commit_request_belongs_to_its_session() -> None:
    # The transport kept the old session's COMMIT_REQUEST: once the new
    # session's channels ENDed it committed and answered COMMIT on a channel 0
    # that never asked (a LocalProtocolError in the commit task).
    with pytest.raises(LocalProtocolError, match="cannot send COMMIT in state ENDED"):
        stale_commit(old_defects=True)
    target = stale_commit(old_defects=False)
    assert target.live is not None and not target.live.finished
    target.commit_request(2, "image")  # the new session asks: now it commits
    assert target.commits == 1


def test_the_line_counter_stops_a_loop_per_page() -> None:
    # The pure twin's normal_runs walks pages in Python: 10 000 pages are
    # more lines than an operation may run.
    with pytest.raises(BudgetExceeded, match="lines of dsamig's Python"), LineCounter(LINE_BUDGET):
        _pure.normal_runs(bytes(1250), 10_000)
    with LineCounter(LINE_BUDGET) as counter:
        _pure.normal_runs(bytes(2), 16)
    assert 16 <= counter.lines < 200
