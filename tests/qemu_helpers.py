"""A real QEMU for the live tests: a tiny guest under TCG with its RAM in a shared file.

The guest is a multiboot kernel assembled here from :data:`GUEST_ASM` (GNU
``as``/``ld``, which come with the C compiler that builds dsamig): it counts
in RAM and in a register and, every 2^20 counts, prints ``tick <count in
hex>`` on the serial port; with each count it rewrites one of 256 pages of
its RAM after checking that the page holds what it wrote there on its last
visit.  It prints ``BAD`` when RAM disagrees with itself or with the
register (which travels with the device state, not with the memory file).
Its code, counter and pages all live in the memory-backend file, so a
destination that goes on printing the next ticks without a ``BAD`` proves
that the file it runs on holds the source's memory as it was at the pause,
not an older copy.

QEMU comes from the distribution (``apt-get install qemu-system-x86``, which
``dev.py test`` does where it may); tests skip only when it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from dsamig.live.qmp import QmpClient

QEMU = "qemu-system-x86_64"
#: Guest RAM: small, so that files copy fast; SeaBIOS and the guest fit easily.
MEM_SIZE = 32 << 20
#: Bound of every wait on QEMU (boot under TCG takes well under a second).
TIMEOUT_S = 30.0
TICK = 1 << 20
#: Where the guest keeps its count (a u32): a guest-physical address, which
#: is also its offset in the memory file (``pc`` maps low RAM from offset 0).
COUNTER_ADDRESS = 0x200000

GUEST_ASM = rf"""
    .code32
    .text
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010000          # the header gives the load addresses
    .set COUNTER, {COUNTER_ADDRESS:#x}
    .set REGION, 0x300000              # 256 pages the guest keeps rewriting
    .set NPAGES, 256
    .set PORT, 0x3f8                   # COM1
header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .long header, header, 0, 0, _start # header, load, load end, bss end, entry
_start:
    cli
    mov $stack_top, %esp
    mov COUNTER, %ebp                  # the count, also kept in a register
next:
    mov COUNTER, %eax
    cmp %eax, %ebp                     # RAM must hold the register's count
    je 4f
    mov $msg_bad, %esi
    call puts
    call puthex
4:  inc %eax
    mov %eax, COUNTER
    mov %eax, %ebp
    mov %eax, %ebx                     # page = REGION + (count % NPAGES) * 4096
    and $(NPAGES - 1), %ebx
    shl $12, %ebx
    add $REGION, %ebx
    xor %edi, %edi                     # it must hold (n, ~n) from its last visit,
    xor %esi, %esi                     # n = count - NPAGES, or (0, 0) before that
    cmp $NPAGES, %eax
    jbe 5f
    lea -NPAGES(%eax), %edi
    mov %edi, %esi
    not %esi
5:  cmp (%ebx), %edi
    jne 6f
    cmp 4(%ebx), %esi
    je store
6:  mov $msg_bad, %esi
    call puts
    call puthex
store:
    mov %eax, (%ebx)
    not %eax
    mov %eax, 4(%ebx)
    not %eax
    test $0xFFFFF, %eax
    jnz next
    mov $msg_tick, %esi
    call puts
    call puthex
    jmp next
puts:
    mov $PORT, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret
puthex:                                # COUNTER in hex and a newline
    mov COUNTER, %ecx
    mov $PORT, %dx
    mov $8, %edi
3:  rol $4, %ecx
    mov %ecx, %eax
    and $15, %eax
    mov hexdigits(%eax), %al
    out %al, %dx
    dec %edi
    jnz 3b
    mov $'\n', %al
    out %al, %dx
    mov COUNTER, %eax
    ret
msg_tick: .asciz "tick "
msg_bad: .asciz "BAD "
hexdigits: .ascii "0123456789abcdef"
    .balign 16
stack: .skip 4096
stack_top:
"""


def require_qemu() -> str:
    """The QEMU binary, or skip the test when it is not installed."""
    path = shutil.which(QEMU)
    if path is None:
        pytest.skip(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    return path


def build_guest(directory: str) -> str:
    """Assemble the guest kernel into ``directory``; return its path."""
    source = os.path.join(directory, "guest.S")
    obj = os.path.join(directory, "guest.o")
    kernel = os.path.join(directory, "guest.bin")
    Path(source).write_text(GUEST_ASM)
    for cmd in (["as", "--32", "-o", obj, source],
                ["ld", "-m", "elf_i386", "-Ttext=0x100000", "--oformat=binary", "-e", "_start",
                 "-o", kernel, obj]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=TIMEOUT_S)
    return kernel


def make_memory_file(path: str, size: int = MEM_SIZE) -> str:
    """A sparse file of ``size`` bytes for a memory backend."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class QemuVm:
    """One QEMU process: RAM in ``mem_path`` (``share=on``), serial to a file,
    two QMP monitors (``qmp`` for the harness, ``qmp_other`` for the code
    under test: a monitor serves one client at a time).

    ``kernel``: boot it (``paused``: stay in prelaunch, ``-S``); ``incoming``:
    wait for a migration instead (``-incoming defer``).
    """

    def __init__(self, workdir: str, name: str, mem_path: str, *, kernel: str | None = None,
                 incoming: bool = False, paused: bool = False, mem_size: int = MEM_SIZE) -> None:
        self.name = name
        # Unix socket paths are short (108 bytes): keep them in a short directory.
        self.sockdir = tempfile.mkdtemp(prefix="dsq-")
        self.qmp = os.path.join(self.sockdir, "qmp")
        self.qmp_other = os.path.join(self.sockdir, "qmp2")
        self.serial = os.path.join(workdir, f"{name}.serial")
        self.mem_path = mem_path
        cmd = [
            require_qemu(), "-nodefaults", "-no-user-config", "-display", "none",
            "-accel", "tcg", "-machine", "pc,memory-backend=mem", "-m", f"{mem_size >> 20}M",
            "-object", f"memory-backend-file,id=mem,size={mem_size},mem-path={mem_path},share=on",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-qmp", f"unix:{self.qmp_other},server=on,wait=off",
        ]
        if kernel is not None:
            cmd += ["-kernel", kernel]
        if paused:
            cmd.append("-S")
        if incoming:
            cmd += ["-incoming", "defer"]
        self.log = open(os.path.join(workdir, f"{name}.log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait(lambda: os.path.exists(self.qmp) and os.path.exists(self.qmp_other),
                   "its QMP sockets")

    def _wait(self, condition: Any, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU {self.name} exited ({self.proc.returncode}) "
                                     f"waiting for {what}: {self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"QEMU {self.name}: no {what} after {TIMEOUT_S} s")
            time.sleep(0.01)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def serial_text(self) -> str:
        try:
            return Path(self.serial).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ticks(self) -> list[int]:
        """The counts of the complete tick lines printed so far."""
        return [int(t, 16) for t in re.findall(r"tick ([0-9a-f]{8})\n", self.serial_text())]

    def wait_ticks(self, at_least: int) -> list[int]:
        """Poll (bounded) until ``at_least`` complete ticks are printed."""
        self._wait(lambda: len(self.ticks()) >= at_least, f"{at_least} ticks on its serial port")
        return self.ticks()

    async def connect(self) -> QmpClient:
        """The harness's QMP connection."""
        return await QmpClient.connect(self.qmp, timeout_s=TIMEOUT_S)

    def close(self) -> None:
        """Kill and reap QEMU (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT_S)
        self.log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def __enter__(self) -> QemuVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def migrate_device_state(source: QemuVm, dest: QemuVm) -> dict[str, Any]:
    """Migrate only the device state from ``source`` to ``dest`` (``-incoming defer``):
    ``x-ignore-shared`` on both leaves the shared RAM out, so ``dest`` runs on
    whatever its memory file holds.  Returns the source's ``query-migrate``."""
    uri = f"unix:{os.path.join(dest.sockdir, 'migrate')}"
    async with await dest.connect() as dq, await source.connect() as sq:
        await dq.migrate_set_capabilities({"x-ignore-shared": True})
        await dq.migrate_incoming(uri)
        await sq.migrate_set_capabilities({"x-ignore-shared": True})
        await sq.migrate(uri)
        info = await sq.wait_migration(timeout_s=TIMEOUT_S)
        # The destination finishes loading after the source reports completion.
        async with asyncio.timeout(TIMEOUT_S):
            while (await dq.query_status())["status"] == "inmigrate":
                await asyncio.sleep(0.01)
    return info


def assert_ticks_continue(source: QemuVm, dest: QemuVm, more: int = 2) -> list[int]:
    """The destination goes on counting where the source stopped: the two serial
    logs together are one unbroken tick sequence, ``more`` ticks past the
    source's, and the guest never saw a page lose its content."""
    before = len(source.ticks())
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        text = source.serial_text() + dest.serial_text()
        ticks = [int(t, 16) for t in re.findall(r"tick ([0-9a-f]{8})\n", text)]
        if len(ticks) >= before + more:
            break
        if dest.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the destination printed no more ticks: {dest.serial_text()!r}"
                                 f" {dest.output()}")
        time.sleep(0.01)
    assert "BAD" not in text, text
    assert ticks == [TICK * (i + 1) for i in range(len(ticks))], ticks
    return ticks


@contextlib.contextmanager
def guest_kernel() -> Any:
    """The guest kernel, built once into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="dsamig-guest-") as tmp:
        yield build_guest(tmp)
