"""Links planted in the destination directory are never followed.

Whoever can write into ``storage_dir`` (or the one-shot receiver's output
directory) may put a symbolic link, a hard link or a FIFO under any name the
sink uses: the partial file, the checkpoint, the checkpoint's temporary file,
the final name.  Each test plants one and proves that nothing is written or
read through it: the victim outside keeps its exact bytes, and the sink's
own file is a fresh regular file of mode 0600.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator

import pytest

from dsamig.errors import SinkError
from dsamig.pages import PageSink
from tests.conftest import read_bytes

PAGE = 4096
VICTIM_BYTES = b"precious bytes outside the storage directory\n"


@pytest.fixture
def storage(tmp_path) -> str:
    path = tmp_path / "images"
    path.mkdir()
    return str(path)


@pytest.fixture
def victim(tmp_path) -> str:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM_BYTES)
    return str(path)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """Umask 0: a file created without an explicit mode would be 0666."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def write_page(sink: PageSink, page: int, fill: int) -> bytes:
    data = bytes([fill]) * PAGE
    sink.write_packet(memoryview(data), b"\x00", PAGE, page * PAGE, PAGE)
    return data


def assert_own_file(path: str) -> os.stat_result:
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file"
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_nlink == 1
    return st


@pytest.mark.parametrize("keep_partial", [False, True])
def test_link_at_the_partial_name(storage, victim, loose_umask, keep_partial) -> None:
    sink = PageSink(os.path.join(storage, "vm"), 2 * PAGE)
    os.symlink(victim, sink.partial_path)
    assert sink.open(keep_partial=keep_partial) is False  # never "kept" through a link
    data = write_page(sink, 1, 0xAB)
    assert_own_file(sink.partial_path)
    sink.commit()
    assert read_bytes(victim) == VICTIM_BYTES
    assert read_bytes(sink.path) == bytes(PAGE) + data
    assert_own_file(sink.path)


def test_hard_link_at_the_partial_name_is_not_reused(storage, tmp_path) -> None:
    # Same size as the image, so only the link count tells it apart.
    other = tmp_path / "other"
    other.write_bytes(b"\x11" * PAGE)
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    os.link(other, sink.partial_path)
    assert sink.open(keep_partial=True) is False
    write_page(sink, 0, 0x22)
    sink.abort()
    assert other.read_bytes() == b"\x11" * PAGE
    assert not os.path.lexists(sink.partial_path)


def test_fifo_at_the_partial_name_neither_hangs_nor_is_used(storage) -> None:
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    os.mkfifo(sink.partial_path)
    assert sink.open(keep_partial=True) is False
    assert_own_file(sink.partial_path)
    sink.abort()


def test_links_at_the_checkpoint_names(storage, victim, loose_umask) -> None:
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    sink.open()
    decoy = os.path.join(os.path.dirname(victim), "decoy-record")
    with open(decoy, "wb") as f:
        f.write(b"a record someone else wrote")
    # Loading follows no link: a planted record is not read.
    os.symlink(decoy, sink.progress_path)
    assert sink.load_checkpoint() is None
    # Checkpointing writes neither through the temporary name nor the final one.
    os.symlink(victim, sink.progress_path + ".tmp")
    sink.checkpoint(b"record one")
    assert read_bytes(victim) == VICTIM_BYTES
    assert read_bytes(decoy) == b"a record someone else wrote"
    assert_own_file(sink.progress_path)
    assert not os.path.lexists(sink.progress_path + ".tmp")
    assert sink.load_checkpoint() == b"record one"
    # A link planted after a checkpoint is replaced by the next one, not followed.
    os.unlink(sink.progress_path)
    os.symlink(victim, sink.progress_path)
    assert sink.load_checkpoint() is None
    sink.checkpoint(b"record two")
    assert read_bytes(victim) == VICTIM_BYTES
    assert_own_file(sink.progress_path)
    assert sink.load_checkpoint() == b"record two"
    sink.abort()
    assert sorted(os.listdir(storage)) == []


def test_a_fifo_or_an_oversized_file_is_no_checkpoint(storage) -> None:
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    sink.open()
    os.mkfifo(sink.progress_path)
    assert sink.load_checkpoint() is None  # and did not block on the FIFO
    os.unlink(sink.progress_path)
    with open(sink.progress_path, "wb") as f:
        f.truncate(1 << 20)  # far more than a record of a one-page image holds
    assert sink.load_checkpoint() is None
    sink.abort()


def test_link_at_the_final_name_is_replaced_not_written(storage, victim) -> None:
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    os.symlink(victim, sink.path)
    sink.open()
    data = write_page(sink, 0, 0x5A)
    sink.commit()
    assert read_bytes(victim) == VICTIM_BYTES
    assert_own_file(sink.path)
    assert read_bytes(sink.path) == data


def test_the_directory_swapped_for_a_link_after_open(tmp_path, storage) -> None:
    # Everything after open() happens in the directory that was opened, even
    # if its path now leads elsewhere.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dir_fd = os.open(storage, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sink = PageSink(os.path.join(storage, "vm"), PAGE, dir_fd=dir_fd)
        sink.open()
    finally:
        os.close(dir_fd)  # the sink holds its own descriptor
    moved = str(tmp_path / "moved")
    os.rename(storage, moved)
    os.symlink(elsewhere, storage)
    data = write_page(sink, 0, 0x77)
    sink.checkpoint(b"record")
    sink.commit()
    assert os.listdir(elsewhere) == []
    assert os.listdir(moved) == ["vm"]
    assert read_bytes(os.path.join(moved, "vm")) == data


def test_abort_during_a_checkpoint(storage, monkeypatch) -> None:
    # The receiver may fail a job while a checkpoint runs in a worker thread:
    # the files go at once, the checkpoint must not bring its record back,
    # and the descriptors stay open until the worker is done with them.
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    sink.open()
    entered = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync
    calls = []
    errors: list[BaseException] = []

    def slow_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
        real_fsync(fd)

    def checkpoint() -> None:
        try:
            sink.checkpoint(b"record")
        except SinkError as exc:
            errors.append(exc)

    # A slow disk: the checkpoint's first fsync waits for the test.
    monkeypatch.setattr(os, "fsync", slow_fsync)
    worker = threading.Thread(target=checkpoint)
    worker.start()
    try:
        assert entered.wait(10)
        sink.abort()  # arrives mid-checkpoint
        assert os.listdir(storage) == []
    finally:
        release.set()
        worker.join(10)
    assert not worker.is_alive()
    # Not EBADF: the worker's descriptors were still open when it used them.
    assert [str(e) for e in errors] == [f"{sink.partial_path!r} was discarded during a "
                                        "checkpoint"]
    assert os.listdir(storage) == []
    sink.abort()  # idempotent


def test_abort_kept_for_resume_stops_a_running_checkpoint(storage, monkeypatch) -> None:
    # The file is kept for a later job, which may take it over at once: it
    # reads the checkpoint there was and punches out every packet that one
    # does not cover.  A record landing after that would claim packets the
    # file no longer holds, so the one still being written never lands.
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    sink.open()
    sink.checkpoint(b"earlier record")
    entered = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync
    errors: list[BaseException] = []

    def slow_fsync(fd: int) -> None:
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        real_fsync(fd)

    def checkpoint() -> None:
        try:
            sink.checkpoint(b"later record")
        except SinkError as exc:
            errors.append(exc)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    worker = threading.Thread(target=checkpoint)
    worker.start()
    try:
        assert entered.wait(10)
        sink.abort(keep_for_resume=True)
    finally:
        release.set()
        worker.join(10)
    assert not worker.is_alive()
    assert [str(e) for e in errors] == [f"{sink.partial_path!r} was discarded during a "
                                        "checkpoint"]
    resumed = PageSink(os.path.join(storage, "vm"), PAGE)
    assert resumed.open(keep_partial=True) is True
    assert resumed.load_checkpoint() == b"earlier record"
    assert sorted(os.listdir(storage)) == ["vm.partial", "vm.partial.progress"]
    resumed.abort()


def test_no_commit_after_an_abort(storage, monkeypatch) -> None:
    # A commit still running when its job fails (a commit timeout) must not
    # give the file its final name afterwards.
    sink = PageSink(os.path.join(storage, "vm"), PAGE)
    sink.open()
    write_page(sink, 0, 1)
    entered = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync
    errors: list[BaseException] = []

    def slow_fsync(fd: int) -> None:
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        real_fsync(fd)

    def commit() -> None:
        try:
            sink.commit()
        except SinkError as exc:
            errors.append(exc)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    worker = threading.Thread(target=commit)
    worker.start()
    try:
        assert entered.wait(10)
        sink.abort()
    finally:
        release.set()
        worker.join(10)
    assert not worker.is_alive()
    assert [str(e) for e in errors] == [f"{sink.partial_path!r} was discarded before its "
                                        "commit"]
    assert os.listdir(storage) == []
