"""Long runs of the receive-side fuzz target (not part of the test suite).

The target is tests/protocol/receiver_fuzz.py: a receiving job in memory
(the production ReceiveJobCore, ChannelStates, FrameDecoders, a byte-exact
model of the destination file, the transport's decisions around them) fed
valid and invalid frames in any order, across the channels of a job, with
ACKS, resumes, reconnects, cuts, crashes and time. Every operation is checked
for bounded memory and lines of Python, for never committing anything but
what the accepted frames describe, and for nothing but RemoteProtocolError
coming out of the receiver. tests/protocol/test_receiver_fuzz.py runs a few
hundred operations of it on every ``dev.py test``; this runs millions.

Two drivers:

    # Plain random: one input is one program (an image and --steps operations
    # from a seed), across --jobs processes; findings are printed with their
    # seed, which `replay` runs again with a trace of every operation.
    .venv/bin/python fuzz/fuzz_receiver.py random --programs 1000000 --jobs 2
    .venv/bin/python fuzz/fuzz_receiver.py replay SEED

    # Coverage-guided with atheris (libFuzzer): one input is a byte string
    # that chooses the image and the operations. Every other argument goes to
    # libFuzzer (-runs=N, -max_total_time=S, a corpus directory, a crash file).
    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_receiver.py atheris -max_total_time=600

``--old-defects`` makes the in-memory receiver copy two defects the
transport had (see MemoryReceiver in tests/protocol/pair.py); the target
finds both. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
import traceback
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.protocol.receiver_fuzz import (
    FuzzImage,
    ReceiverFuzz,
    random_operations,
    run_program,
)

#: CPU time one operation may take, whatever its frame declares: a walk in
#: Python over a declared range (131 072 packets at the fuzz limits) takes
#: longer; the slowest legitimate operations take a few milliseconds.
OPERATION_S = 0.1


def run_batch(args: tuple[int, int, int, int, bool]) -> dict[str, object]:
    """Programs ``first .. first+count-1``; what they did and what they found."""
    first, count, steps, measure_every, as_is = args
    result: dict[str, object] = {
        "programs": 0, "operations": 0, "commits": 0, "findings": [],
        "peak_bytes": 0, "peak_lines": 0, "slowest_s": 0.0,
    }
    findings: list[tuple[int, str]] = result["findings"]  # type: ignore[assignment]
    for seed in range(first, first + count):
        measure = measure_every > 0 and seed % measure_every == 0
        try:
            target = run_program(seed, steps=steps, measure=measure, old_defects=as_is)
        except BaseException as exc:
            findings.append((seed, f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            if measure:
                tracemalloc.stop()
        result["programs"] = int(result["programs"]) + 1  # type: ignore[call-overload]
        result["operations"] = int(result["operations"]) + target.ops  # type: ignore[call-overload]
        result["commits"] = int(result["commits"]) + target.commits  # type: ignore[call-overload]
        for key in ("peak_bytes", "peak_lines") + (() if measure else ("slowest_s",)):
            result[key] = max(result[key], getattr(target, key))  # type: ignore[type-var]
        if not measure and target.slowest_s > OPERATION_S:  # tracing slows a measured one
            findings.append((seed, f"an operation took {target.slowest_s:.3f} s"))
    return result


def random_mode(options: argparse.Namespace) -> int:
    batch = 500
    work = [(first, min(batch, options.start + options.programs - first), options.steps,
             options.measure_every, options.old_defects)
            for first in range(options.start, options.start + options.programs, batch)]
    totals: dict[str, float] = {"programs": 0, "operations": 0, "commits": 0,
                                "peak_bytes": 0, "peak_lines": 0, "slowest_s": 0.0}
    findings: list[tuple[int, str]] = []
    started = time.monotonic()
    with multiprocessing.Pool(options.jobs) as pool:
        for done, result in enumerate(pool.imap_unordered(run_batch, work), 1):
            for key in ("programs", "operations", "commits"):
                totals[key] += result[key]  # type: ignore[operator]
            for key in ("peak_bytes", "peak_lines", "slowest_s"):
                totals[key] = max(totals[key], result[key])  # type: ignore[type-var]
            for seed, what in result["findings"]:  # type: ignore[attr-defined]
                findings.append((seed, what))
                print(f"FINDING seed {seed}: {what}", flush=True)
            if done % 20 == 0 or done == len(work):
                elapsed = time.monotonic() - started
                print(f"{int(totals['programs'])} programs, {int(totals['operations'])} "
                      f"operations, {int(totals['commits'])} commits, {len(findings)} findings, "
                      f"{elapsed:.0f} s", flush=True)
    elapsed = time.monotonic() - started
    print(f"done: {int(totals['programs'])} programs ({options.start}.."
          f"{options.start + options.programs - 1}), {int(totals['operations'])} operations, "
          f"{int(totals['commits'])} commits in {elapsed:.0f} s; peak per operation "
          f"{int(totals['peak_bytes'])} bytes, {int(totals['peak_lines'])} lines of dsamig, "
          f"slowest {totals['slowest_s'] * 1000:.1f} ms; {len(findings)} findings")
    return 1 if findings else 0


def replay(options: argparse.Namespace) -> int:
    """Run one program again, printing every operation."""
    original = ReceiverFuzz._run

    def traced(self: ReceiverFuzz, operation):  # type: ignore[no-untyped-def]
        caller = sys._getframe(1)
        arguments = {k: v for k, v in caller.f_locals.items() if k != "self"}
        print(f"{self.ops:4d} {caller.f_code.co_name} {arguments}")
        original(self, operation)

    ReceiverFuzz._run = traced  # type: ignore[method-assign]
    try:
        run_program(options.seed, steps=options.steps, measure=True,
                    old_defects=options.old_defects)
    except BaseException:
        traceback.print_exc()
        return 1
    print("no finding")
    return 0


def atheris_mode(argv: list[str]) -> None:
    import atheris

    # dsamig and the target are imported already: instrument what is loaded.
    atheris.instrument_all()

    def one_input(data: bytes) -> None:
        provider = atheris.FuzzedDataProvider(data)
        seed = provider.ConsumeIntInRange(0, 2**32 - 1)
        rng = random.Random(seed)
        target = ReceiverFuzz(FuzzImage.make(rng))
        # The byte string chooses every operation and its arguments.
        chooser = _ProviderRandom(provider)
        random_operations(target, chooser, steps=provider.ConsumeIntInRange(1, 60))

    atheris.Setup([sys.argv[0], *argv], one_input)
    atheris.Fuzz()


class _ProviderRandom(random.Random):
    """random.Random whose choices come from libFuzzer's bytes, so that
    coverage guidance mutates the program itself; zeros once they run out."""

    def __init__(self, provider) -> None:  # type: ignore[no-untyped-def]
        super().__init__(0)
        self.provider = provider

    def random(self) -> float:
        return self.provider.ConsumeProbability()

    def getrandbits(self, k: int) -> int:
        return self.provider.ConsumeInt(k) & ((1 << k) - 1) if k else 0

    def randbytes(self, n: int) -> bytes:
        return self.provider.ConsumeBytes(n).ljust(n, b"\0")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "atheris":
        atheris_mode(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    rand = sub.add_parser("random", help="random programs from seeds, in parallel")
    rand.add_argument("--programs", type=int, default=100_000)
    rand.add_argument("--start", type=int, default=0, help="first seed")
    rand.add_argument("--jobs", type=int, default=1)
    rand.add_argument("--steps", type=int, default=30, help="operations per program")
    rand.add_argument("--measure-every", type=int, default=16,
                      help="measure memory and lines of every N-th program (0: never)")
    rand.add_argument("--old-defects", action="store_true")
    again = sub.add_parser("replay", help="run one program again, with a trace")
    again.add_argument("seed", type=int)
    again.add_argument("--steps", type=int, default=30)
    again.add_argument("--old-defects", action="store_true")
    options = parser.parse_args()
    if options.mode == "random":
        return random_mode(options)
    return replay(options)


if __name__ == "__main__":
    sys.exit(main())
