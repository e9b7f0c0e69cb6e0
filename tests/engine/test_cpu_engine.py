"""The asynchronous engine contract on the CPU backend (native and twin)."""

from __future__ import annotations

import asyncio
import mmap
import os
import threading

import pytest

from dsamig import _pure
from dsamig.engine import EngineClosedError, NativeEngine, create_engine
from dsamig.engine.none import NoneEngine
from dsamig.errors import ConfigError
from dsamig.native import native

PAGE = 4096
CORES = [_pure.CpuEngineCore] + ([native.CpuEngineCore] if native is not None else [])


def mixed(pages: int, seed: int = 0) -> bytearray:
    data = bytearray(os.urandom(pages * PAGE))
    for i in range(0, pages, 3):
        data[i * PAGE : (i + 1) * PAGE] = bytes(PAGE)
    return data


@pytest.mark.parametrize("core_cls", CORES, ids=lambda c: c.__module__)
async def test_results_match_oracle(core_cls) -> None:
    engine = NativeEngine(core_cls(2), "cpu")
    try:
        buffers = [mixed(n) for n in (1, 7, 128, 300)]
        results = await asyncio.gather(
            *(engine.submit(memoryview(b), PAGE, 128) for b in buffers)
        )
        for data, result in zip(buffers, results, strict=True):
            bitmaps, zero = _pure.zero_bitmap(data, PAGE, 128)
            assert result.bitmaps == bitmaps
            assert result.zero_pages == zero
            assert result.cpu_pages == len(data) // PAGE
        assert engine.stats()["batches"] == 4
    finally:
        engine.close()


@pytest.mark.parametrize("core_cls", CORES, ids=lambda c: c.__module__)
async def test_close_is_idempotent_and_fails_waiters(core_cls) -> None:
    engine = NativeEngine(core_cls(1), "cpu")
    big = bytearray(64 * 1024 * 1024)
    futures = [engine.submit(memoryview(big), PAGE, 128) for _ in range(4)]
    engine.close()
    engine.close()
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    # Whatever had started finished; the rest failed cleanly.
    for outcome in outcomes:
        assert not isinstance(outcome, BaseException) or isinstance(outcome, EngineClosedError)
    with pytest.raises(EngineClosedError):
        engine.submit(memoryview(big), PAGE, 128)


@pytest.mark.skipif(native is None, reason="needs the extension")
async def test_buffer_pinned_while_in_flight() -> None:
    """A mapped image cannot be unmapped under a batch (no use-after-unmap)."""
    engine = NativeEngine(native.CpuEngineCore(1), "cpu")
    mm = mmap.mmap(-1, 32 * 1024 * 1024)
    future = engine.submit(memoryview(mm), PAGE, 128)
    with pytest.raises(BufferError):
        mm.close()
    await future
    engine.close()
    mm.close()


@pytest.mark.skipif(native is None, reason="needs the extension")
async def test_worker_threads_are_named() -> None:
    engine = NativeEngine(native.CpuEngineCore(2), "cpu")
    await engine.submit(memoryview(bytearray(PAGE)), PAGE, 1)
    names = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            names.add(f.read().strip())
    engine.close()
    assert {"dsamig-cpu-0", "dsamig-cpu-1"} <= names


async def test_completions_arrive_on_the_loop_thread() -> None:
    engine, _ = create_engine("cpu", threads=2)
    seen: list[int] = []
    future = engine.submit(memoryview(mixed(64)), PAGE, 128)
    future.add_done_callback(lambda _: seen.append(threading.get_ident()))
    await future
    engine.close()
    assert seen == [threading.get_ident()]


async def test_none_engine_reports_all_normal() -> None:
    engine = NoneEngine()
    result = await engine.detect(memoryview(bytes(10 * PAGE)), PAGE, 4)
    assert result.bitmaps == bytes(3) and result.zero_pages == 0


async def test_unknown_engine_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'gpu'"):
        create_engine("gpu")
