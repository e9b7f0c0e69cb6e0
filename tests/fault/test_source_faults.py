"""The image shrinks under the sender while it is mapped: a clear error, never a SIGBUS.

Pages past a file's new end cannot be read through its mapping: a CPU access
raises SIGBUS, a kernel copy (``writev``) fails with EFAULT.  The native core
guards every call that touches mapped pages, the sender re-checks the file
size between chunks, and whatever noticed first, the job fails with
"image ... was truncated while being sent" and the receiver keeps nothing.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import uvloop

from dsamig.errors import SourceError
from dsamig.native import native
from dsamig.pages import PageSink, PageSource
from dsamig.proto import Hello
from dsamig.settings import EXIT_LOCAL_IO, EXIT_TRANSFER
from dsamig.transport.common import Timeouts
from dsamig.transport.receiver import ReceiverJob, ReceiverServer
from dsamig.transport.sender import Sender, SenderChannel, SendOptions
from tests.fault.test_bad_input import assert_one_line_error
from tests.integration.helpers import TIMEOUT_S, Receiver, dsamig

MiB = 1 << 20
needs_native = pytest.mark.skipif(native is None, reason="the guard is in the native core")


@pytest.fixture
def truncated(tmp_path):
    """An 8 MiB image mapped, then cut to 1 MiB: (memoryview of the mapping, path)."""
    path = tmp_path / "image.img"
    path.write_bytes(os.urandom(8 * MiB))
    fd = os.open(path, os.O_RDONLY)
    mapping = mmap.mmap(fd, 8 * MiB, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(mapping)
    os.truncate(path, MiB)
    yield view, path
    view.release()
    mapping.close()
    os.close(fd)


# -- the native guard ----------------------------------------------------------------


@needs_native
def test_zero_bitmap_raises_efault(truncated) -> None:
    view, _ = truncated
    assert native is not None
    before = native.zero_bitmap(view[: MiB], 4096)  # the part that still exists
    assert len(before[0]) == 32
    with pytest.raises(OSError) as info:
        native.zero_bitmap(view[MiB : 2 * MiB], 4096)
    assert info.value.errno == errno.EFAULT
    assert "was the file truncated" in str(info.value)


@needs_native
def test_packet_payload_raises_efault(truncated) -> None:
    view, _ = truncated
    assert native is not None
    _, length, _ = native.packet_payload(view[: 512 * 1024], bytes(16), 4096)
    assert length == 512 * 1024
    with pytest.raises(OSError) as info:
        native.packet_payload(view[MiB - 4096 : MiB + 512 * 1024 - 4096], bytes(16), 4096)
    assert info.value.errno == errno.EFAULT


@needs_native
def test_cpu_engine_batch_fails_with_efault(truncated) -> None:
    view, _ = truncated
    assert native is not None
    core = native.CpuEngineCore(2)
    try:
        good = core.submit(view[: MiB], 4096, 128)
        bad = core.submit(view[2 * MiB : 6 * MiB], 4096, 128)
        results: dict[int, int] = {}
        deadline = time.monotonic() + 10
        while len(results) < 2 and time.monotonic() < deadline:
            select.select([core.fileno()], [], [], 1)
            for token, _bitmaps, _zero, status, _pages in core.collect():
                results[token] = status
        assert results == {good: 0, bad: errno.EFAULT}
        # The workers survived the fault: the engine still scans.
        again = core.submit(view[: MiB], 4096, 128)
        select.select([core.fileno()], [], [], 10)
        assert [(t, s) for t, _, _, s, _ in core.collect()] == [(again, 0)]
    finally:
        core.close()
        core.collect()


@needs_native
@pytest.mark.parametrize("faulthandler", [False, True], ids=["default", "faulthandler"])
def test_sigbus_outside_a_guard_still_kills(tmp_path, faulthandler: bool) -> None:
    # The guard must not swallow faults it does not own: after a guarded call
    # installed the handler, an unguarded access dies of SIGBUS as before.
    script = textwrap.dedent(f"""
        import faulthandler, mmap, os
        if {faulthandler}:
            faulthandler.enable()
        from dsamig import _native
        path = {str(tmp_path / "x.img")!r}
        with open(path, "wb") as f:
            f.write(b"x" * 65536)
        fd = os.open(path, os.O_RDONLY)
        m = mmap.mmap(fd, 65536, mmap.MAP_SHARED, mmap.PROT_READ)
        _native.zero_bitmap(m, 4096)  # installs the guard's handler
        os.truncate(path, 0)
        print(m[40000])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == -signal.SIGBUS, result
    if faulthandler:
        assert "Bus error" in result.stderr


# -- the sender ----------------------------------------------------------------------


async def _send_truncated(tmp_path, monkeypatch, engine: str,
                          native: bool | None = None) -> tuple[Exception, ReceiverJob]:
    """Send an image cut to 1 MiB after it was mapped; the size check between
    chunks is disabled so that the layer under test is the one that notices.
    ``native``: the data path (None: the default)."""
    image = tmp_path / "image.img"
    image.write_bytes(os.urandom(8 * MiB))
    output = str(tmp_path / "dest.img")
    finished: asyncio.Future[ReceiverJob] = asyncio.get_running_loop().create_future()

    def sink(hello: Hello) -> PageSink:
        assert hello.manifest is not None
        return PageSink(output, hello.manifest.image_size)

    server = ReceiverServer(
        "127.0.0.1", 0, sink, timeouts=Timeouts(idle_s=10),
        on_job_finished=lambda job: finished.done() or finished.set_result(job),
    )
    _, port = await server.start()
    source = PageSource(str(image))
    monkeypatch.setattr(source, "check_size", lambda: None)
    os.truncate(image, MiB)
    try:
        sender = Sender(source, SendOptions(host="127.0.0.1", port=port, channels=2,
                                            engine=engine, retry_for_s=0, native=native))
        with pytest.raises(SourceError) as info:
            await asyncio.wait_for(sender.run(), TIMEOUT_S)
        job = await asyncio.wait_for(finished, TIMEOUT_S)
    finally:
        source.close()
        await server.close()
    assert not os.path.exists(output)
    assert not os.path.exists(output + ".partial")
    return info.value, job


@needs_native
async def test_engine_fault_becomes_a_source_error(tmp_path, monkeypatch) -> None:
    error, job = await _send_truncated(tmp_path, monkeypatch, "cpu")
    assert "was truncated while being sent (now 1048576 bytes" in str(error)
    # The sender cancels the job: a shrunk image leaves nothing to resume.
    assert job.stats.status == "cancelled"
    assert "truncated" in (job.stats.error or "")


@needs_native
async def test_crc_fault_becomes_a_source_error(tmp_path, monkeypatch) -> None:
    # engine none reports every page normal without reading it: the CRC is the
    # first code that touches the missing pages.
    error, job = await _send_truncated(tmp_path, monkeypatch, "none")
    assert "was truncated while being sent" in str(error)
    assert job.stats.status == "cancelled"


@needs_native
def test_kernel_efault_becomes_a_source_error(tmp_path, monkeypatch) -> None:
    # A page that passed its CRC can vanish before the kernel copies it: the
    # send then fails with EFAULT (no signal in kernel mode).  On uvloop, as
    # the sender runs: it hands the slices to writev without copying them
    # (asyncio's own transports join them in user space, which would fault).
    from dsamig.native import impl

    real = impl.packet_payload

    def unchecked(data, bitmap, page_size):  # type: ignore[no-untyped-def]
        try:
            return real(data, bitmap, page_size)
        except OSError:
            pages = -(-len(data) // page_size)
            views = [data[: pages * page_size]]
            return views, len(views[0]), 0

    monkeypatch.setattr(impl, "packet_payload", unchecked)
    lost: list[Exception | None] = []
    real_lost = SenderChannel.connection_lost

    def record(channel: SenderChannel, exc: Exception | None) -> None:
        lost.append(exc)
        real_lost(channel, exc)

    monkeypatch.setattr(SenderChannel, "connection_lost", record)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        error, _job = runner.run(_send_truncated(tmp_path, monkeypatch, "none", native=False))
    assert "was truncated while being sent" in str(error)
    assert any(isinstance(exc, OSError) and exc.errno == errno.EFAULT for exc in lost), lost


async def test_a_native_sender_reports_a_truncated_image(tmp_path, monkeypatch) -> None:
    # On the native path the sending thread reads the pages under the SIGBUS
    # guard: the vanished page comes back as EFAULT, and the job says why.
    error, job = await _send_truncated(tmp_path, monkeypatch, "none", native=True)
    assert "was truncated while being sent" in str(error)
    assert job.stats.extra["data-path"] == "native"


def test_image_truncated_mid_transfer(tmp_path, image_factory) -> None:
    # The whole thing through the CLI: a paced sender, the image cut half way.
    image, _, _ = image_factory(48 * MiB, seed=5, zero_every=0)
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once")
    stop = threading.Event()

    def cut_once_under_way() -> None:
        # Half way is not a time but a fact: the receiver holds data already.
        while not stop.is_set():
            try:
                if os.stat(output + ".partial").st_blocks * 512 >= 4 * MiB:
                    os.truncate(image, 3 * MiB)
                    return
            except FileNotFoundError:
                pass
            stop.wait(0.01)

    cutter = threading.Thread(target=cut_once_under_way)
    try:
        cutter.start()
        result = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "2",
                        "--max-bandwidth", "16MiB")
        code, _out, err = receiver.finish()
    finally:
        stop.set()
        cutter.join(timeout=10)
        receiver.kill()
    assert result.returncode == EXIT_LOCAL_IO, result.stderr
    assert_one_line_error(result.stderr, repr(image), "was truncated while being sent",
                          "now 3145728 bytes")
    assert code == EXIT_TRANSFER
    assert "truncated" in err
    assert not os.path.exists(output)
    assert not os.path.exists(output + ".partial")
