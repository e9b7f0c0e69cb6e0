"""The live-test writer: reproducible by seed, paced, stoppable with SIGSTOP/SIGCONT."""

from __future__ import annotations

import os

import pytest

from tests.live_writer import DATA, POKE, ZERO, LiveWriter, plan, replay, writes_due

PAGE = 4096


@pytest.fixture
def image(tmp_path):
    """A 64-page image, the odd pages zero."""
    path = tmp_path / "image"
    content = b"".join(bytes(PAGE) if i % 2 else os.urandom(PAGE) for i in range(64))
    path.write_bytes(content)
    return str(path), content


def test_plan_is_fixed_by_the_seed_and_moves_pages_both_ways() -> None:
    first = [w for _, w in zip(range(300), plan(5, 64 * PAGE), strict=False)]
    again = [w for _, w in zip(range(300), plan(5, 64 * PAGE), strict=False)]
    other = [w for _, w in zip(range(300), plan(6, 64 * PAGE), strict=False)]
    assert first == again and first != other
    assert {w.kind for w in first} == {ZERO, DATA, POKE}
    assert all(w.payload[0] & 1 for w in first if w.kind == POKE)  # never a no-op poke


def test_replay_sends_pages_to_zero_and_from_zero() -> None:
    initial = b"".join(bytes(PAGE) if i % 2 else b"\x07" * PAGE for i in range(64))
    after = replay(initial, 5, 200)
    pages = [(initial[i * PAGE:(i + 1) * PAGE], after[i * PAGE:(i + 1) * PAGE])
             for i in range(64)]
    assert any(a.count(0) == PAGE and b.count(0) != PAGE for a, b in pages)  # from zero
    assert any(a.count(0) != PAGE and b.count(0) == PAGE for a, b in pages)  # to zero


def test_writes_due() -> None:
    assert writes_due(1000, 0.5) == 500
    assert writes_due(0, 0.001) > 10**12


def test_writer_matches_its_replay(image, tmp_path) -> None:
    path, content = image
    with LiveWriter(path, str(tmp_path / "count"), seed=3, max_writes=500) as writer:
        assert writer.wait() == 0
        assert writer.writes() == 500
    with open(path, "rb") as f:
        assert f.read() == replay(content, 3, 500)


def test_sigstop_freezes_the_image_and_sigcont_goes_on(image, tmp_path) -> None:
    path, content = image
    with LiveWriter(path, str(tmp_path / "count"), seed=9, rate=2000) as writer:
        writer.wait_writes(20)
        done = writer.stop()
        with open(path, "rb") as f:
            frozen = f.read()
        # Stopped between writes, or inside write number `done`: every other
        # page is exactly as the plan says.
        half = writer.next_write(done).page
        want = writer.expected(content, done)
        for page in range(64):
            if page != half:
                assert frozen[page * PAGE:(page + 1) * PAGE] == want[page * PAGE:(page + 1) * PAGE]
        assert writer.writes() == done
        writer.cont()
        writer.wait_writes(done + 20)
