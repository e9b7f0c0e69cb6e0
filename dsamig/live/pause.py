"""Pausing and resuming the writer of a live image around the final round.

The writer is whatever changes the image: a QEMU guest (``--qmp SOCKET``:
QMP ``stop`` and ``cont``, each proven by ``query-status``) or anything a
shell command can pause (``--pause-cmd CMD`` / ``--resume-cmd CMD``, for
example ``kill -STOP``/``kill -CONT`` or a VMM's own pause call).

The rule: a failure in dsamig must never leave a guest paused.  Run the
final round inside :class:`PausedWriter`::

    async with PausedWriter(control) as paused:
        ...final round, commit...
    stats["downtime"] = paused.downtime_s * 1000

If anything fails or is cancelled after the pause began (the pause itself
included: a command that failed half-way may still have paused), the writer
is resumed before the error goes on, even when the task is cancelled again
while resuming (each resume is bounded by its own timeout).  After a
successful body the writer stays paused (``keep_paused=True``: the guest now
lives at the destination) or is resumed (``keep_paused=False``: a consistent
snapshot of a guest that keeps running).  A resume that fails after a
failure is logged as an error and noted on the exception that goes on; a
process killed with SIGKILL cannot resume anything, which is why the pause
comes as late as possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from dsamig.errors import DsamigError
from dsamig.live.qmp import QmpClient
from dsamig.logs import get_logger

#: Bytes of a command's output kept for its error message (the end of it).
OUTPUT_KEPT_BYTES = 4096


class WriterControlError(DsamigError):
    """The writer could not be paused or resumed: a command failed or timed out,
    or QEMU refused or did not reach the state asked for."""


class WriterControl(Protocol):
    """Pauses and resumes whatever writes to the image."""

    #: For messages: ``--pause-cmd 'kill -STOP 42'``, ``QMP /run/vm.qmp``.
    description: str

    async def pause(self) -> None:
        """Stop the writer; return only once it no longer writes."""
        ...

    async def resume(self) -> None:
        """Let the writer go on; return once it runs again."""
        ...


class ShellWriterControl:
    """Pause and resume with shell commands (``--pause-cmd``/``--resume-cmd``).

    Each command runs through ``/bin/sh -c`` in its own session, with stdin
    from /dev/null and stdout+stderr captured; it must exit 0 within
    ``timeout_s``, else its whole process group is killed and the error
    message carries the end of its output.
    """

    def __init__(self, pause_cmd: str, resume_cmd: str, *, timeout_s: float = 10.0) -> None:
        if not pause_cmd.strip() or not resume_cmd.strip():
            raise ValueError("both a pause and a resume command are needed")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self.pause_cmd = pause_cmd
        self.resume_cmd = resume_cmd
        self.timeout_s = timeout_s
        self.description = f"--pause-cmd {pause_cmd!r}"

    async def pause(self) -> None:
        """Run the pause command."""
        await run_command(self.pause_cmd, what="--pause-cmd", timeout_s=self.timeout_s)

    async def resume(self) -> None:
        """Run the resume command."""
        await run_command(self.resume_cmd, what="--resume-cmd", timeout_s=self.timeout_s)


class QmpWriterControl:
    """Pause and resume a QEMU guest through its QMP socket.

    ``pause`` sends ``stop`` and waits until ``query-status`` says the guest
    is not running; ``resume`` sends ``cont`` and waits until it runs.  A
    guest that was already paused before ``pause`` (by its operator) is left
    paused by ``resume``.  Each operation opens its own connection, so the
    monitor stays free for others in between.
    """

    def __init__(self, socket_path: str, *, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.description = f"QMP {socket_path}"
        self.was_running: bool | None = None

    async def pause(self) -> None:
        """``stop`` the guest and prove it stopped."""
        async with await QmpClient.connect(self.socket_path, timeout_s=self.timeout_s) as qmp:
            self.was_running = (await qmp.query_status())["running"]
            await qmp.stop()

    async def resume(self) -> None:
        """``cont`` the guest (unless it was paused before we paused it)."""
        if self.was_running is False:
            get_logger(component="live").info(
                "writer left paused: it was paused before dsamig paused it",
                writer=self.description)
            return
        async with await QmpClient.connect(self.socket_path, timeout_s=self.timeout_s) as qmp:
            await qmp.cont()


async def run_command(command: str, *, what: str, timeout_s: float) -> str:
    """Run ``command`` through the shell, bounded by ``timeout_s``; return its output.

    A non-zero exit, a signal or the timeout raises :class:`WriterControlError`
    naming ``what`` and the command, with the end of its output.  The command
    is done when its shell exits: a background child that keeps the output
    pipe open does not hold us (we read the pipe ourselves, without waiting
    for its end), and the end of the output is kept, OUTPUT_KEPT_BYTES of it.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_fd, False)  # ours only: the command writes as usual
    output = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                loop.remove_reader(read_fd)
                return
            output.extend(chunk)
            del output[:-OUTPUT_KEPT_BYTES]

    try:
        try:
            proc = await asyncio.create_subprocess_shell(
                command, stdin=asyncio.subprocess.DEVNULL, stdout=write_fd,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise WriterControlError(f"{what} {command!r}: cannot start the shell: "
                                     f"{exc.strerror or exc}") from None
        finally:
            os.close(write_fd)
        loop.add_reader(read_fd, drain)
        try:
            async with asyncio.timeout(timeout_s):
                status = await proc.wait()
        except TimeoutError:
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()
            drain()
            raise WriterControlError(f"{what} {command!r} did not finish within "
                                     f"{timeout_s:g} s and was killed{_tail(output)}") from None
        except BaseException:
            # Cancelled: the command must not outlive the decision to give up on it.
            _kill_group(proc.pid)
            raise
        drain()  # what the command wrote before it exited
    finally:
        loop.remove_reader(read_fd)
        os.close(read_fd)
    if status < 0:
        raise WriterControlError(f"{what} {command!r} was killed by signal "
                                 f"{signal.Signals(-status).name}{_tail(output)}")
    if status != 0:
        raise WriterControlError(f"{what} {command!r} exited with status {status}"
                                 f"{_tail(output)}")
    return output.decode(errors="replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(output: bytes | bytearray) -> str:
    text = bytes(output).decode(errors="replace").strip()
    return f"; output: {text}" if text else "; no output"


class PausedWriter:
    """Async context manager: the writer paused inside, resumed on any failure.

    ``clock`` (monotonic seconds) times the pause for ``downtime_s``.
    """

    def __init__(self, control: WriterControl, *, keep_paused: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.control = control
        self.keep_paused = keep_paused
        self.clock = clock
        self.paused_at: float | None = None
        self.resumed_at: float | None = None
        self.resume_error: BaseException | None = None

    @property
    def downtime_s(self) -> float:
        """Seconds from the pause to the resume, or to now while paused."""
        if self.paused_at is None:
            return 0.0
        end = self.resumed_at if self.resumed_at is not None else self.clock()
        return end - self.paused_at

    async def __aenter__(self) -> PausedWriter:
        self.paused_at = self.clock()
        try:
            await self.control.pause()
        except BaseException as exc:
            # A pause that failed half-way may have paused: resume to be sure.
            await self._resume_after(exc)
            raise
        get_logger(component="live").info("writer paused", writer=self.control.description)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            if not self.keep_paused:
                await self.resume()
            return
        await self._resume_after(exc)

    async def resume(self) -> None:
        """Resume the writer now, even if the calling task is cancelled meanwhile."""
        task = asyncio.ensure_future(self.control.resume())
        cancelled = False
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                cancelled = True  # finish the resume first: it is bounded
        self.resumed_at = self.clock()
        task.result()
        get_logger(component="live").info("writer resumed", writer=self.control.description)
        if cancelled:
            raise asyncio.CancelledError

    async def _resume_after(self, exc: BaseException) -> None:
        try:
            await self.resume()
        except asyncio.CancelledError:
            raise
        except BaseException as failure:
            self.resume_error = failure
            message = (f"the writer may still be paused: resuming it ({self.control.description})"
                       f" failed: {failure}")
            get_logger(component="live").error(
                "writer not resumed", writer=self.control.description, error=str(failure),
                cause=str(exc))
            exc.add_note(message)


__all__ = [
    "OUTPUT_KEPT_BYTES",
    "PausedWriter",
    "QmpWriterControl",
    "ShellWriterControl",
    "WriterControl",
    "WriterControlError",
    "run_command",
]
