"""The software DSA device on its own: raw descriptors in, completion records out.

Each test writes 64-byte descriptors with the hardware layout, submits them
through the emulated portal (ENQCMD, MOVDIR64B or write()) and reads the
32-byte records back, as a program driving a real work queue would.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time

import pytest

from dsamig.native import native as native_mod
from tests.engine.dsa_helpers import (
    DESC,
    F_BOF,
    F_CR,
    F_CRAV,
    F_RCR,
    OP_BATCH,
    OP_COMPARE,
    OP_COMPVAL,
    OP_DRAIN,
    OP_MEMFILL,
    OP_MEMMOVE,
    OP_NOOP,
    PAGE,
    S_BAD_OPCODE,
    S_BATCH_FAIL,
    S_DESC_CNT_ERANGE,
    S_DESCLIST_ALIGN,
    S_INVALID_FLAGS,
    S_NOZERO_RESERVE,
    S_SUCCESS,
    S_SUCCESS_PRED,
    S_XFER_ERANGE,
    Arena,
    desc,
    requires_native,
)

pytestmark = requires_native

EINVAL, EAGAIN, EPERM = 22, 11, 1
OP_TRANSL_FETCH = 0x0A  # DSA 2.0
F_TF_STRIDE = 0x10000  # Translation Fetch: region stride (DSA 2.0)
CR_AT, DATA_AT, LIST_AT = 0, PAGE, 2 * PAGE


@pytest.fixture
def arena():
    a = Arena(16 * PAGE)
    yield a
    a.close()


@pytest.fixture
def swq():
    queues = []

    def make(**kwargs):
        q = native_mod.SoftwareWorkQueue(**kwargs)
        queues.append(q)
        return q

    yield make
    for q in queues:
        q.stop()


def run_one(q, arena: Arena, d: bytes, cr_offset: int = CR_AT) -> dict[str, int]:
    assert q.enqcmd(d) == 0
    return arena.wait_cr(cr_offset)


# ---- validation, one status code at a time ----------------------------------------------


def test_bad_opcode(swq, arena) -> None:
    q = swq()
    rec = run_one(q, arena, desc(0x1F, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), size=64))
    assert rec["status"] == S_BAD_OPCODE


def test_opcode_not_in_op_config(swq, arena) -> None:
    q = swq(op_config=(1 << OP_NOOP) | (1 << OP_BATCH) | (1 << OP_COMPVAL))
    d = desc(OP_MEMMOVE, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT),
             dst=arena.addr(DATA_AT + 2048), size=64)
    assert run_one(q, arena, d)["status"] == S_BAD_OPCODE


@pytest.mark.parametrize(
    "field",
    [{"rsvd1": 1}, {"op_specific": b"\0\0\0\0\0\x01"}, {"int_handle": 0, "rsvd1": 0x8000}],
)
def test_reserved_field_nonzero(swq, arena, field) -> None:
    q = swq()
    d = desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), size=PAGE, **field)
    assert run_one(q, arena, d)["status"] == S_NOZERO_RESERVE


def test_reserved_fields_of_a_noop(swq, arena) -> None:
    q = swq()
    assert run_one(q, arena, desc(OP_NOOP, cr=arena.addr(CR_AT), size=8))["status"] == (
        S_NOZERO_RESERVE
    )


@pytest.mark.parametrize(
    ("opcode", "flags", "bad"),
    [
        (OP_COMPVAL, F_CRAV | F_RCR | 0x40, 0x40),  # bit 6 is reserved
        (OP_COMPVAL, F_CRAV | F_RCR | 0x10000, 0x10000),  # IAA-only bits
        (OP_NOOP, F_CRAV | F_RCR | F_BOF, F_BOF),  # no block-on-fault on a No-op
        (OP_MEMMOVE, F_CRAV | F_RCR | F_CR, F_CR),  # check-result only on compares
    ],
)
def test_invalid_flags(swq, arena, opcode, flags, bad) -> None:
    q = swq()
    if opcode == OP_NOOP:  # a No-op has no addresses or size (reserved)
        d = desc(opcode, flags, cr=arena.addr(CR_AT))
    else:
        d = desc(opcode, flags, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT),
                 dst=arena.addr(DATA_AT + 2048), size=64)
    rec = run_one(q, arena, d)
    assert rec["status"] == S_INVALID_FLAGS
    assert rec["invalid_flags"] == bad


def test_block_on_fault_not_allowed_on_batch(swq, arena) -> None:
    q = swq()
    d = desc(OP_BATCH, F_CRAV | F_RCR | F_BOF, cr=arena.addr(CR_AT), src=arena.addr(LIST_AT),
             size=2)
    rec = run_one(q, arena, d)
    assert (rec["status"], rec["invalid_flags"]) == (S_INVALID_FLAGS, F_BOF)


@pytest.mark.parametrize("size", [0, 4097])
def test_transfer_size_out_of_range(swq, arena, size) -> None:
    q = swq(max_transfer_size=4096)
    d = desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), size=size)
    assert run_one(q, arena, d)["status"] == S_XFER_ERANGE


@pytest.mark.parametrize("count", [0, 1, 9])
def test_batch_count_out_of_range(swq, arena, count) -> None:
    q = swq(max_batch_size=8)
    d = desc(OP_BATCH, cr=arena.addr(CR_AT), src=arena.addr(LIST_AT), size=count)
    assert run_one(q, arena, d)["status"] == S_DESC_CNT_ERANGE


def test_batch_list_misaligned(swq, arena) -> None:
    q = swq()
    d = desc(OP_BATCH, cr=arena.addr(CR_AT), src=arena.addr(LIST_AT + 32), size=2)
    assert run_one(q, arena, d)["status"] == S_DESCLIST_ALIGN


def test_validation_order(swq, arena) -> None:
    """Reserved fields before flags before opcode before size before count."""
    q = swq(max_batch_size=8)
    cr = arena.addr(CR_AT)
    cases = [
        (desc(0x1F, F_CRAV | F_RCR | 0x40, cr=cr, rsvd1=1), S_NOZERO_RESERVE),
        (desc(0x1F, F_CRAV | F_RCR | 0x40, cr=cr), S_INVALID_FLAGS),
        (desc(0x1F, cr=cr, size=0), S_BAD_OPCODE),
        (desc(OP_BATCH, cr=cr, src=arena.addr(LIST_AT + 8), size=1), S_DESC_CNT_ERANGE),
    ]
    for d, status in cases:
        arena.write(CR_AT, bytes(32))
        assert run_one(q, arena, d)["status"] == status


def test_misaligned_record_is_refused_at_submission(swq, arena) -> None:
    shared = swq()
    d = desc(OP_COMPVAL, cr=arena.addr(CR_AT + 8), src=arena.addr(DATA_AT), size=PAGE)
    assert shared.enqcmd(d) == -EINVAL
    assert shared.write(d) == -EINVAL
    dedicated = swq(mode="dedicated", size=4)
    dedicated.movdir64b(d)
    assert shared.counters()["rejected"] == 2
    assert dedicated.counters()["rejected"] == 1
    assert shared.counters()["accepted"] == dedicated.counters()["accepted"] == 0


def test_enqcmd_refuses_pasid_bits(swq, arena) -> None:
    """ENQCMD faults when bits 31:0 of the source are set; the emulated portal refuses."""
    q = swq()
    d = desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), size=PAGE, pasid_word=5)
    assert q.enqcmd(d) == -EINVAL


def test_pasid_bits_through_a_dedicated_portal_are_reserved(swq, arena) -> None:
    q = swq(mode="dedicated", size=4)
    q.movdir64b(desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), size=PAGE,
                     pasid_word=1 << 31))
    assert arena.wait_cr(CR_AT)["status"] == S_NOZERO_RESERVE


# ---- execution -------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [None, 0, 7, 8, 2047, 4095])
def test_compval_against_zero(swq, arena, offset) -> None:
    q = swq()
    if offset is not None:
        arena.write(DATA_AT + offset, b"\x01")
    rec = run_one(q, arena, desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT),
                                 size=PAGE))
    assert rec["status"] == S_SUCCESS
    assert rec["result"] == (offset is not None)
    if offset is not None:
        # Only "no greater than the first difference" is guaranteed.
        assert rec["bytes_completed"] <= offset


def test_compval_with_a_pattern_and_a_short_tail(swq, arena) -> None:
    q = swq()
    pattern = 0x0807060504030201
    arena.write(DATA_AT, pattern.to_bytes(8, "little") * 4 + b"\x01\x02\x03")
    d = desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), dst=pattern, size=35)
    assert run_one(q, arena, d)["result"] == 0
    arena.write(CR_AT, bytes(32))
    arena.write(DATA_AT + 34, b"\x09")
    rec = run_one(q, arena, d)
    assert (rec["result"], rec["bytes_completed"]) == (1, 34)


def test_check_result_flag_gives_success_pred(swq, arena) -> None:
    q = swq()
    arena.write(DATA_AT + 100, b"\x01")
    d = desc(OP_COMPVAL, F_CRAV | F_RCR | F_CR, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT),
             size=PAGE, op_specific=b"\x00")  # expected_res 0, actual 1
    assert run_one(q, arena, d)["status"] == S_SUCCESS_PRED


def test_compare_memmove_memfill(swq, arena) -> None:
    q = swq()
    src, dst = DATA_AT, DATA_AT + 1024
    arena.write(src, bytes(range(256)))
    run_one(q, arena, desc(OP_MEMMOVE, cr=arena.addr(CR_AT), src=arena.addr(src),
                           dst=arena.addr(dst), size=256))
    assert arena.read(dst, 256) == bytes(range(256))
    arena.write(CR_AT, bytes(32))
    rec = run_one(q, arena, desc(OP_COMPARE, cr=arena.addr(CR_AT), src=arena.addr(src),
                                 dst=arena.addr(dst), size=256))
    assert (rec["status"], rec["result"]) == (S_SUCCESS, 0)
    arena.write(CR_AT, bytes(32))
    run_one(q, arena, desc(OP_MEMFILL, cr=arena.addr(CR_AT), src=0xAABB, dst=arena.addr(dst),
                           size=16))
    assert arena.read(dst, 16) == (0xAABB).to_bytes(8, "little") * 2


def test_no_record_for_success_without_rcr(swq, arena) -> None:
    q = swq()
    arena.write(CR_AT, b"\x00" * 32)
    assert q.enqcmd(desc(OP_COMPVAL, F_CRAV, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT),
                         size=PAGE)) == 0
    # A failing descriptor is always written back: use it as a fence.
    assert q.enqcmd(desc(0x1F, F_CRAV, cr=arena.addr(CR_AT + 32))) == 0
    assert arena.wait_cr(CR_AT + 32)["status"] == S_BAD_OPCODE
    assert arena.cr(CR_AT)["status"] == 0


def test_batch_writes_members_then_batch_record(swq, arena) -> None:
    q = swq(max_batch_size=8)
    members = []
    for i in range(4):
        if i == 2:
            arena.write(DATA_AT + i * 256 + 5, b"\x01")
        members.append(desc(OP_COMPVAL, cr=arena.addr(CR_AT + 64 + 32 * i),
                            src=arena.addr(DATA_AT + i * 256), size=256))
    arena.write(LIST_AT, b"".join(members))
    rec = run_one(q, arena, desc(OP_BATCH, cr=arena.addr(CR_AT), src=arena.addr(LIST_AT), size=4))
    assert (rec["status"], rec["bytes_completed"]) == (S_SUCCESS, 4)
    results = [arena.cr(CR_AT + 64 + 32 * i) for i in range(4)]
    assert [r["status"] for r in results] == [S_SUCCESS] * 4
    assert [r["result"] for r in results] == [0, 0, 1, 0]


def test_batch_with_a_bad_member_fails_as_a_whole(swq, arena) -> None:
    q = swq(max_batch_size=8)
    members = [
        desc(OP_COMPVAL, cr=arena.addr(CR_AT + 64), src=arena.addr(DATA_AT), size=64),
        desc(OP_COMPVAL, cr=arena.addr(CR_AT + 96), src=arena.addr(DATA_AT), size=0),
        desc(OP_BATCH, cr=arena.addr(CR_AT + 128), src=arena.addr(LIST_AT), size=2),
        desc(OP_DRAIN, cr=arena.addr(CR_AT + 160)),
        desc(OP_COMPVAL, cr=arena.addr(CR_AT + 192), src=arena.addr(DATA_AT), size=64),
    ]
    arena.write(LIST_AT, b"".join(members))
    rec = run_one(q, arena, desc(OP_BATCH, cr=arena.addr(CR_AT), src=arena.addr(LIST_AT), size=5))
    # No fence: the batch goes on after a failure and counts every member.
    assert (rec["status"], rec["bytes_completed"], rec["result"]) == (S_BATCH_FAIL, 5, 1)
    statuses = [arena.cr(CR_AT + 64 + 32 * i)["status"] for i in range(5)]
    assert statuses == [S_SUCCESS, S_XFER_ERANGE, S_BAD_OPCODE, S_BAD_OPCODE, S_SUCCESS]


# ---- submission semantics ----------------------------------------------------------------


def _slow_queue(swq, arena, submit, **kwargs):
    """A queue whose single engine is busy for seconds with a first page, so
    what comes next stays queued."""
    q = swq(rate=PAGE // 8, **kwargs)  # eight seconds for that page
    submit(q, desc(OP_COMPVAL, cr=arena.addr(CR_AT + 1024), src=arena.addr(DATA_AT), size=PAGE))
    deadline = time.monotonic() + 5
    while q.occupancy:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return q


def test_enqcmd_retries_at_the_threshold(swq, arena) -> None:
    q = _slow_queue(swq, arena, lambda q, d: q.enqcmd(d), size=8, threshold=3)
    d = desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), size=PAGE)
    answers = [q.enqcmd(d) for _ in range(5)]
    assert answers == [0, 0, 0, 1, 1]  # accepted up to the threshold, then "retry"
    assert q.occupancy == 3
    counters = q.counters()
    assert (counters["accepted"], counters["refused"], counters["dropped"]) == (4, 2, 0)
    q.stop()
    assert q.counters()["discarded"] == 3


def test_movdir64b_drops_silently_when_full(swq, arena) -> None:
    q = _slow_queue(swq, arena, lambda q, d: q.movdir64b(d), mode="dedicated", size=2)
    for i in range(5):
        q.movdir64b(desc(OP_COMPVAL, cr=arena.addr(CR_AT + 32 * i), src=arena.addr(DATA_AT),
                         size=PAGE))
    counters = q.counters()
    assert (counters["accepted"], counters["dropped"], counters["refused"]) == (3, 3, 0)
    assert q.occupancy == 2
    q.stop()
    # No record was ever written for a dropped (or discarded) descriptor.
    assert all(arena.cr(CR_AT + 32 * i)["status"] == 0 for i in range(5))


def test_enqcmd_on_a_dedicated_queue_is_not_supported(swq, arena) -> None:
    q = swq(mode="dedicated")
    assert q.enqcmd(desc(OP_NOOP, cr=arena.addr(CR_AT))) < 0


def test_write_method(swq, arena) -> None:
    q = swq()
    ok = [desc(OP_COMPVAL, cr=arena.addr(CR_AT + 32 * i), src=arena.addr(DATA_AT), size=PAGE)
          for i in range(3)]
    assert q.write(b"".join(ok)) == 3
    for i in range(3):
        assert arena.wait_cr(CR_AT + 32 * i)["status"] == S_SUCCESS
    batch = desc(OP_BATCH, cr=arena.addr(CR_AT + 128), src=arena.addr(LIST_AT), size=2)
    assert q.write(batch) == -EINVAL  # no batches through write()
    assert q.write(ok[0] + batch) == 1  # what was accepted before it counts


def test_write_method_gives_eagain_when_full(swq, arena) -> None:
    q = _slow_queue(swq, arena, lambda q, d: q.write(d), size=4, threshold=1)
    d = desc(OP_COMPVAL, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT), size=PAGE)
    assert [q.write(d) for _ in range(2)] == [1, -EAGAIN]
    assert q.counters()["refused"] == 33  # the kernel's 32 retries, then -EAGAIN


def test_wq_full_injection_is_seeded(swq, arena) -> None:
    answers = []
    for _ in range(2):
        q = swq(faults={"wq-full": 0.5, "seed": 11})
        answers.append([q.enqcmd(desc(OP_NOOP, 0)) for _ in range(64)])
        q.stop()
    assert answers[0] == answers[1]
    assert 0 < answers[0].count(1) < 64


def test_status_byte_is_written_last(swq) -> None:
    """A poller that sees a status sees every other field final."""
    for mode in ("shared", "dedicated"):
        q = swq(mode=mode, size=4)
        assert q.probe_cr_order(20000) == 0


def test_out_of_order_engines_complete_everything(swq, arena) -> None:
    q = swq(engines=3, reorder=True, size=64)
    n = 48
    for i in range(n):
        if i % 3 == 0:
            arena.write(DATA_AT + i * 64 + 63, b"\x01")
        assert q.enqcmd(desc(OP_COMPVAL, cr=arena.addr(CR_AT + 32 * i),
                             src=arena.addr(DATA_AT + 64 * i), size=64)) == 0
    for i in range(n):
        rec = arena.wait_cr(CR_AT + 32 * i)
        assert rec["result"] == (i % 3 == 0)


# ---- layout ------------------------------------------------------------------------------


class KernelDesc(ctypes.LittleEndianStructure):
    """struct dsa_hw_desc as linux/idxd.h writes it (bitfields included)."""

    _pack_ = 1
    _fields_ = [
        ("pasid", ctypes.c_uint32, 20),
        ("rsvd", ctypes.c_uint32, 11),
        ("priv", ctypes.c_uint32, 1),
        ("flags", ctypes.c_uint32, 24),
        ("opcode", ctypes.c_uint32, 8),
        ("completion_addr", ctypes.c_uint64),
        ("src_addr", ctypes.c_uint64),
        ("dst_addr", ctypes.c_uint64),
        ("xfer_size", ctypes.c_uint32),
        ("int_handle", ctypes.c_uint16),
        ("rsvd1", ctypes.c_uint16),
        ("op_specific", ctypes.c_uint8 * 24),
    ]


class KernelCr(ctypes.LittleEndianStructure):
    """struct dsa_completion_record."""

    _pack_ = 1
    _fields_ = [
        ("status", ctypes.c_uint8),
        ("result", ctypes.c_uint8),
        ("rsvd", ctypes.c_uint16),
        ("bytes_completed", ctypes.c_uint32),
        ("fault_addr", ctypes.c_uint64),
        ("op_specific", ctypes.c_uint8 * 16),
    ]


# ---- the kernel around the WQ ---------------------------------------------------------


def test_kernel_without_write_method(swq, arena) -> None:
    q = swq(kernel_write=False)
    d = desc(OP_NOOP, cr=arena.addr(CR_AT))
    assert q.write(d) == -EINVAL  # before the 2024 fix: no write() at all
    assert q.map_portal() == 0  # ... and any process may map the portal
    assert run_one(q, arena, d)["status"] == S_SUCCESS


def test_kernel_refusing_the_portal_mapping(swq) -> None:
    assert swq(kernel_mmap="eperm").map_portal() == -EPERM
    assert swq().map_portal() == 0


def test_write_from_a_foreign_address_space(swq, arena) -> None:
    q = swq(foreign_mm=True)
    assert q.write(desc(OP_NOOP, cr=arena.addr(CR_AT))) == -EPERM
    assert q.counters()["accepted"] == 0


# ---- DSA 1.0 (Sapphire Rapids) and DSA 2.0 ----------------------------------------------


def transl_fetch(arena: Arena, flags: int = F_CRAV | F_RCR, stride: int = 0) -> bytes:
    """A Translation Fetch (DSA 2.0): region at src, region_size in xfer_size,
    region_stride at 0x30."""
    return desc(OP_TRANSL_FETCH, flags, cr=arena.addr(CR_AT), src=arena.addr(DATA_AT),
                size=4 * PAGE, op_specific=bytes(8) + stride.to_bytes(4, "little"))


def test_dsa1_does_not_know_translation_fetch(swq, arena) -> None:
    q = swq(model="dsa1")
    assert run_one(q, arena, transl_fetch(arena))["status"] == S_BAD_OPCODE


def test_dsa1_rejects_the_dsa2_stride_flag(swq, arena) -> None:
    q = swq(model="dsa1")
    cr = run_one(q, arena, transl_fetch(arena, F_CRAV | F_RCR | F_TF_STRIDE, stride=PAGE))
    assert (cr["status"], cr["invalid_flags"]) == (S_INVALID_FLAGS, F_TF_STRIDE)


def test_dsa2_executes_translation_fetch_with_its_flag(swq, arena) -> None:
    q = swq(model="dsa2")
    assert run_one(q, arena, transl_fetch(arena))["status"] == S_SUCCESS
    arena.write(CR_AT, bytes(32))
    cr = run_one(q, arena, transl_fetch(arena, F_CRAV | F_RCR | F_TF_STRIDE, stride=PAGE))
    assert cr["status"] == S_SUCCESS


def test_dsa2_flag_is_still_reserved_on_other_operations(swq, arena) -> None:
    q = swq(model="dsa2")
    d = desc(OP_COMPVAL, F_CRAV | F_RCR | F_TF_STRIDE, cr=arena.addr(CR_AT),
             src=arena.addr(DATA_AT), size=PAGE)
    cr = run_one(q, arena, d)
    assert (cr["status"], cr["invalid_flags"]) == (S_INVALID_FLAGS, F_TF_STRIDE)


def test_unknown_model_is_refused(swq) -> None:
    with pytest.raises(ValueError, match="model"):
        swq(model="dsa3")


# ---- residency: mapped in this process, not merely cached ------------------------------


def resident_in_page_cache(view: memoryview) -> bool:
    """mincore(2) on the mapping: whether every page is in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    n = len(view)
    buf = (ctypes.c_char * n).from_buffer(view)
    vec = (ctypes.c_ubyte * ((n + PAGE - 1) // PAGE))()
    try:
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(n), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
    finally:
        del buf
    return all(v & 1 for v in vec)


def test_a_cached_file_page_not_mapped_here_faults(tmp_path) -> None:
    """The device walks this process's page tables: a file page in the page
    cache that this mapping never touched is not there for it.  Only the
    pagemap present bit says so; mincore() calls it resident."""
    import mmap

    from tests.engine.dsa_helpers import assert_oracle, crafted_pages, emulated, run_core

    data = crafted_pages(64, seed=7)
    path = tmp_path / "image"
    path.write_bytes(data)
    with open(path, "r+b") as f:
        assert f.read() == data  # every page in the page cache now
        m = mmap.mmap(f.fileno(), len(data))  # shared, writable (for ctypes), untouched
    view = memoryview(m)
    c = native_mod.DsaEngineCore(emulated(1), prefault=False)
    try:
        assert resident_in_page_cache(view)
        assert_oracle(run_core(c, [view]), [data])
        device = c.wq_stats()[0]["device"]
        assert device["faults-absent"] > 0
        assert c.stats()["page-faults"] == device["faults-absent"]
        # Touched (mapped here), the same pages no longer fault.
        assert bytes(view) == data
        before = device["faults-absent"]
        assert_oracle(run_core(c, [view]), [data])
        assert c.wq_stats()[0]["device"]["faults-absent"] == before
    finally:
        c.close()
        view.release()
        m.close()


def test_layout_matches_the_kernel_structs() -> None:
    layout = native_mod.dsa_layout()
    assert layout["desc_size"] == ctypes.sizeof(KernelDesc) == 64
    assert layout["cr_size"] == ctypes.sizeof(KernelCr) == 32
    for name in ("completion_addr", "src_addr", "dst_addr", "xfer_size", "int_handle", "rsvd1"):
        assert layout["desc"][name] == getattr(KernelDesc, name).offset, name
    assert layout["desc"]["op_specific"] == KernelDesc.op_specific.offset
    assert layout["desc"]["expected_res"] == 0x28
    for name in ("status", "result", "bytes_completed", "fault_addr"):
        assert layout["cr"][name] == getattr(KernelCr, name).offset, name
    assert layout["cr"]["invalid_flags"] == layout["cr"]["crc_val"] == 0x10
    # Our descriptor bytes, read back through the kernel's bitfields.
    raw = desc(OP_COMPVAL, F_CRAV | F_RCR, cr=0x1000, src=0x2000, dst=7, size=4096)
    k = KernelDesc.from_buffer_copy(raw)
    assert (k.opcode, k.flags, k.pasid, k.priv) == (OP_COMPVAL, F_CRAV | F_RCR, 0, 0)
    assert (k.completion_addr, k.src_addr, k.dst_addr, k.xfer_size) == (0x1000, 0x2000, 7, 4096)


PROBE = r"""
#include <linux/idxd.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
int main(void) {
    struct dsa_hw_desc d; unsigned char *b = (unsigned char *)&d; int i;
    memset(&d, 0, sizeof(d));
    d.opcode = DSA_OPCODE_COMPVAL; d.flags = IDXD_OP_FLAG_CRAV | IDXD_OP_FLAG_RCR;
    d.completion_addr = 0x1000; d.src_addr = 0x2000; d.comp_pattern = 7; d.xfer_size = 4096;
    printf("%zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(struct dsa_hw_desc),
           sizeof(struct dsa_completion_record), offsetof(struct dsa_hw_desc, completion_addr),
           offsetof(struct dsa_hw_desc, src_addr), offsetof(struct dsa_hw_desc, comp_pattern),
           offsetof(struct dsa_hw_desc, xfer_size), offsetof(struct dsa_hw_desc, int_handle),
           offsetof(struct dsa_hw_desc, expected_res),
           offsetof(struct dsa_completion_record, result),
           offsetof(struct dsa_completion_record, bytes_completed),
           offsetof(struct dsa_completion_record, fault_addr),
           offsetof(struct dsa_completion_record, crc_val));
    for (i = 0; i < 64; i++) printf("%02x", b[i]);
    printf("\n");
    return 0;
}
"""


@pytest.mark.skipif(
    not os.path.exists("/usr/include/linux/idxd.h") or shutil.which("cc") is None,
    reason="needs linux/idxd.h and a C compiler",
)
def test_layout_against_compiled_linux_header(tmp_path) -> None:
    src = tmp_path / "probe.c"
    src.write_text(PROBE)
    exe = tmp_path / "probe"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, timeout=60)
    sizes, hexbytes = subprocess.run([str(exe)], capture_output=True, text=True, check=True,
                                     timeout=10).stdout.split("\n")[:2]
    layout = native_mod.dsa_layout()
    d, c = layout["desc"], layout["cr"]
    ours = [layout["desc_size"], layout["cr_size"], d["completion_addr"], d["src_addr"],
            d["dst_addr"], d["xfer_size"], d["int_handle"], d["expected_res"], c["result"],
            c["bytes_completed"], c["fault_addr"], c["crc_val"]]
    assert [int(x) for x in sizes.split()] == ours
    assert layout["checked_against_linux_idxd_h"]
    # The same descriptor, built field by field on both sides, is the same 64 bytes.
    assert bytes.fromhex(hexbytes) == desc(OP_COMPVAL, F_CRAV | F_RCR, cr=0x1000, src=0x2000,
                                           dst=7, size=4096)
    assert DESC.size == 64
