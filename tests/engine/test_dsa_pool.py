"""EnginePool: one DSA engine per set of work queues, leased to every job that
asks for them, so a daemon opens a dedicated WQ once for all its jobs."""

from __future__ import annotations

import asyncio

import pytest

from dsamig.dsa_config import DsaConfig
from dsamig.engine import EngineClosedError, EngineLease, EnginePool
from dsamig.errors import EngineError
from tests.engine.dsa_helpers import PAGE, crafted_pages, oracle, requires_native

pytestmark = requires_native

DEDICATED = DsaConfig(emulate=1, emulate_mode="dedicated", emulate_size=16)


@pytest.fixture
def pool():
    p = EnginePool()
    yield p
    p.close()


async def scan(engine, buffers) -> None:
    """Submit every buffer, await all, compare with the CPU oracle."""
    results = await asyncio.wait_for(
        asyncio.gather(*(engine.submit(memoryview(b), PAGE, 128) for b in buffers)), 30)
    for data, result in zip(buffers, results, strict=True):
        assert (result.bitmaps, result.zero_pages) == oracle(data)


async def test_two_jobs_share_one_dedicated_wq(pool) -> None:
    first, why_first = pool.create_engine("dsa", dsa=DEDICATED)
    second, why_second = pool.create_engine("dsa", dsa=DEDICATED)
    assert isinstance(first, EngineLease) and isinstance(second, EngineLease)
    assert pool.open_engines == 1
    assert "shared" not in why_first and "(shared with 1 running job(s))" in why_second
    a = [crafted_pages(700, seed=i) for i in range(4)]
    b = [crafted_pages(300 + i, seed=10 + i) for i in range(5)]
    # Both jobs at once, their batches interleaved on the one WQ.
    await asyncio.gather(scan(first, a), scan(second, b))
    sa, sb = first.stats(), second.stats()
    assert (sa["engine-batches"], sa["pages"]) == (4, 2800)
    assert (sb["engine-batches"], sb["pages"]) == (5, sum(300 + i for i in range(5)))
    assert sa["zero-pages"] == sum(oracle(d)[1] for d in a)
    assert sa["backend"] == sb["backend"] == "dsa" and sa["shared"]["users"] == 2
    assert sa["shared"]["pages"] == 2800 + sb["pages"]  # the engine saw both
    [wq] = sa["wqs"]
    assert wq["method"] == "movdir64b" and wq["jobs"] == 9
    first.close()
    second.close()


async def test_leases_come_and_go_the_engine_stays(pool) -> None:
    lease, _ = pool.create_engine("dsa", dsa=DEDICATED)
    await scan(lease, [crafted_pages(256, seed=1)])
    executed = lease.stats()["wqs"][0]["device"]["executed"]
    lease.close()
    lease.close()  # idempotent
    with pytest.raises(EngineClosedError):
        lease.submit(memoryview(bytearray(PAGE)), PAGE, 128)
    assert pool.open_engines == 1
    again, reason = pool.create_engine("dsa", dsa=DEDICATED)
    assert "shared" not in reason  # nobody else holds it now
    await scan(again, [crafted_pages(256, seed=2)])
    # The same WQ, not probed again: only the new batch's descriptors.
    assert again.stats()["wqs"][0]["device"]["executed"] == executed + 256 + 2
    again.close()
    pool.close()
    pool.close()  # idempotent
    assert pool.open_engines == 0
    with pytest.raises(EngineError, match="closed"):
        pool.create_engine("dsa", dsa=DEDICATED)


async def test_a_lease_closes_after_its_batches_are_back(pool) -> None:
    """A job that stops with a batch still on the device (its future
    cancelled) gives its share back only when the batch is out of the engine;
    the other job goes on."""
    slow = DsaConfig(emulate=1, rate=16 << 20)  # 16 MB/s: 4 MiB takes a quarter second
    leaving, _ = pool.create_engine("dsa", dsa=slow)
    staying, _ = pool.create_engine("dsa", dsa=slow)
    future = leaving.submit(memoryview(crafted_pages(1024, seed=3)), PAGE, 128)
    future.cancel()
    assert leaving._shared.engine._core.in_flight == 1
    leaving.close()  # waits, bounded, for the batch to leave the engine
    assert staying._shared.engine._core.in_flight == 0  # unpinned: back from the device
    shared = staying.stats()["shared"]
    assert shared["engine-batches"] == 0  # cancelled: never counted as a result
    assert shared["users"] == 1
    await scan(staying, [crafted_pages(128, seed=4)])
    staying.close()


async def test_different_wqs_are_different_engines(pool) -> None:
    one, _ = pool.create_engine("dsa", dsa=DsaConfig(emulate=1))
    two, _ = pool.create_engine("dsa", dsa=DsaConfig(emulate=2))
    assert pool.open_engines == 2
    one.close()
    two.close()


async def test_cpu_and_none_are_not_shared(pool) -> None:
    cpu, reason = pool.create_engine("cpu", threads=1)
    try:
        assert cpu.name == "cpu" and not isinstance(cpu, EngineLease)
        assert reason.startswith("engine cpu")
    finally:
        cpu.close()
    none, _ = pool.create_engine("none")
    none.close()
    assert pool.open_engines == 0


async def test_without_dsa_auto_is_the_cpu_and_dsa_an_error(pool) -> None:
    absent = DsaConfig(sysfs_root="/nonexistent/dsa")
    engine, reason = pool.create_engine("auto", dsa=absent)
    try:
        assert engine.name == "cpu" and "DSA not used" in reason
    finally:
        engine.close()
    with pytest.raises(EngineError, match="does not exist"):
        pool.create_engine("dsa", dsa=absent)
    assert pool.open_engines == 0


async def test_an_engine_whose_wqs_are_all_out_is_reopened(pool) -> None:
    lease, _ = pool.create_engine("dsa", dsa=DsaConfig(emulate=1))
    lease._shared.engine._core.fail_completion_thread()
    await scan(lease, [crafted_pages(100, seed=5)])  # on the CPU, still right
    assert lease.stats()["wqs"][0]["state"] == "out"
    broken = lease._shared.engine
    lease.close()
    fresh, _ = pool.create_engine("dsa", dsa=DsaConfig(emulate=1))
    assert fresh._shared.engine is not broken and pool.open_engines == 1
    assert fresh.stats()["wqs"][0]["state"] == "in-service"
    await scan(fresh, [crafted_pages(100, seed=6)])
    assert fresh.stats()["cpu-fallback-pages"] == 0
    fresh.close()
