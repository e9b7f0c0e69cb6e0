"""Writer control under failure: a failure in dsamig never leaves the writer paused."""

from __future__ import annotations

import asyncio
import os

import pytest

from dsamig.live.pause import (
    OUTPUT_KEPT_BYTES,
    PausedWriter,
    ShellWriterControl,
    WriterControlError,
    run_command,
)
from tests.live_writer import LiveWriter

PAGE = 4096


def stop_cmd(pid: int) -> str:
    """Pause command that returns only once the process is stopped (SIGSTOP is async)."""
    return (f"kill -STOP {pid} && "
            f"while ! grep -q '^State:.*T' /proc/{pid}/status; do :; done")


def cont_cmd(pid: int) -> str:
    return f"kill -CONT {pid}"


@pytest.fixture
def writer(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(os.urandom(32 * PAGE))
    with LiveWriter(str(path), str(tmp_path / "count"), seed=1, rate=2000) as w:
        w.wait_writes(5)
        yield w


class FakeClock:
    """An injectable clock that advances only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_failure_after_the_pause_resumes_the_writer(writer) -> None:
    control = ShellWriterControl(stop_cmd(writer.pid), cont_cmd(writer.pid))
    clock = FakeClock()
    paused = PausedWriter(control, clock=clock)
    with pytest.raises(RuntimeError, match="final round failed"):
        async with paused:
            assert writer.state() == "T"
            clock.now += 0.25
            raise RuntimeError("final round failed")
    assert writer.state() != "T"
    assert paused.downtime_s == 0.25
    assert paused.resume_error is None
    writer.wait_writes(writer.writes() + 5)


async def test_success_keeps_the_writer_paused_unless_asked(writer) -> None:
    control = ShellWriterControl(stop_cmd(writer.pid), cont_cmd(writer.pid))
    async with PausedWriter(control) as paused:
        pass
    assert writer.state() == "T" and paused.resumed_at is None
    async with PausedWriter(control, keep_paused=False):
        assert writer.state() == "T"
    assert writer.state() != "T"


async def test_cancel_after_the_pause_resumes_the_writer(writer) -> None:
    control = ShellWriterControl(stop_cmd(writer.pid), cont_cmd(writer.pid))
    inside = asyncio.Event()

    async def final_round() -> None:
        async with PausedWriter(control):
            inside.set()
            await asyncio.Event().wait()  # a round that never ends

    task = asyncio.create_task(final_round())
    async with asyncio.timeout(20):
        await inside.wait()
    assert writer.state() == "T"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writer.state() != "T"


async def test_cancel_during_the_resume_still_resumes(writer, tmp_path) -> None:
    """A second cancel while resuming waits for the (bounded) resume, then goes on."""
    gate = tmp_path / "gate"
    resume = f"while [ ! -e {gate} ]; do :; done; {cont_cmd(writer.pid)}"
    control = ShellWriterControl(stop_cmd(writer.pid), resume, timeout_s=20)
    inside = asyncio.Event()

    async def final_round() -> None:
        async with PausedWriter(control):
            inside.set()
            raise RuntimeError("failed")

    task = asyncio.create_task(final_round())
    async with asyncio.timeout(20):
        await inside.wait()
        await asyncio.sleep(0)  # let the task enter the resume
        task.cancel()  # cancelled while the resume command waits for the gate
        await asyncio.sleep(0)
        gate.touch()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert writer.state() != "T"


async def test_a_failed_pause_is_resumed_and_reported_with_its_output(writer, tmp_path) -> None:
    marker = tmp_path / "resumed"
    control = ShellWriterControl(f"{stop_cmd(writer.pid)}; echo vmm says no >&2; exit 3",
                                 f"{cont_cmd(writer.pid)}; touch {marker}")
    with pytest.raises(WriterControlError) as err:
        async with PausedWriter(control):
            pytest.fail("the body must not run when the pause failed")
    assert "--pause-cmd" in str(err.value) and "exited with status 3" in str(err.value)
    assert "vmm says no" in str(err.value)
    assert marker.exists() and writer.state() != "T"


async def test_a_failed_resume_after_a_failure_is_noted(writer) -> None:
    control = ShellWriterControl(stop_cmd(writer.pid), "echo cannot resume; exit 4")
    paused = PausedWriter(control)
    with pytest.raises(RuntimeError) as err:
        async with paused:
            raise RuntimeError("commit failed")
    notes = " ".join(getattr(err.value, "__notes__", []))
    assert "may still be paused" in notes and "cannot resume" in notes
    assert isinstance(paused.resume_error, WriterControlError)
    writer.cont()  # the test's own clean-up of what the failed resume left


async def test_a_command_past_its_timeout_is_killed_with_its_group(tmp_path) -> None:
    pids = tmp_path / "pids"
    with pytest.raises(WriterControlError, match=r"did not finish within 0.5 s and was killed"
                                                 r"; output: started") as err:
        await run_command(f"sleep 60 & echo $! > {pids}; echo started; wait",
                          what="--pause-cmd", timeout_s=0.5)
    assert "--pause-cmd" in str(err.value)
    child = int(pids.read_text())
    try:
        with open(f"/proc/{child}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")  # killed (a zombie until its new parent reaps it)


async def test_command_output_is_bounded_and_ends_the_message() -> None:
    with pytest.raises(WriterControlError) as err:
        await run_command("head -c 100000 /dev/zero | tr '\\0' x; echo END; exit 1",
                          what="--resume-cmd", timeout_s=10)
    message = str(err.value)
    assert message.endswith("END") and len(message) < OUTPUT_KEPT_BYTES + 200


async def test_a_background_child_holding_the_pipe_does_not_block(tmp_path) -> None:
    pids = tmp_path / "pids"
    async with asyncio.timeout(5):
        out = await run_command(f"sleep 30 & echo $! > {pids}; echo paused",
                                what="--pause-cmd", timeout_s=10)
    assert out.strip() == "paused"
    os.kill(int(pids.read_text()), 9)


async def test_signal_death_is_named() -> None:
    with pytest.raises(WriterControlError, match="killed by signal SIGTERM"):
        await run_command("kill -TERM $$", what="--pause-cmd", timeout_s=10)


def test_commands_are_required() -> None:
    with pytest.raises(ValueError, match="both a pause and a resume command"):
        ShellWriterControl("kill -STOP 1", " ")
