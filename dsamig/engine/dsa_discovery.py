"""Finding DSA work queues: sysfs, device nodes, CPU features, permissions.

The idxd driver publishes every device and work queue under
``/sys/bus/dsa/devices`` (``dsa0``, ``wq0.0``, ...) and a character device per
user-type WQ under ``/dev/dsa``.  ``discover()`` reads both and gives each WQ
a verdict: usable (and how descriptors would reach it) or why not.  The roots
are parameters so tests can point them at a fake tree.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from dsamig.native import native

SYSFS_ROOT = "/sys/bus/dsa/devices"
DEV_ROOT = "/dev/dsa"
CAP_SYS_RAWIO = 17
OPCODE_BATCH = 1
OPCODE_COMPVAL = 6

_WQ_NAME = re.compile(r"^wq(\d+)\.(\d+)$")


CPU_FLAGS = ("enqcmd", "movdir64b", "waitpkg")


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """The CPU instructions user-space DSA may use: where CPUID and the
    kernel agree.  ``disagreements`` says where they do not."""

    enqcmd: bool
    movdir64b: bool
    waitpkg: bool
    source: str  # "cpuid+cpuinfo", or "cpuinfo" without the extension
    disagreements: tuple[str, ...] = ()


def kernel_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The first ``flags`` line of ``cpuinfo`` as a set; None if unreadable."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def combine_cpu_features(cpuid: Mapping[str, bool] | None,
                         kernel: set[str] | None) -> CpuFeatures:
    """What may be used: an instruction CPUID reports and the kernel lists.
    The kernel can clear ENQCMD (a user ENQCMD then raises #GP), so CPUID
    alone is not enough; without CPUID (no extension) the kernel's flags are
    all there is."""
    if kernel is None:
        return CpuFeatures(False, False, False, "cpuid+cpuinfo" if cpuid else "cpuinfo",
                           ("the kernel's CPU flags (/proc/cpuinfo) cannot be read: "
                            "no DSA instruction is used",))
    if cpuid is None:
        return CpuFeatures("enqcmd" in kernel, "movdir64b" in kernel, "waitpkg" in kernel,
                           "cpuinfo")
    notes = []
    for name in CPU_FLAGS:
        if cpuid[name] and name not in kernel:
            notes.append(f"CPUID reports {name.upper()} but the kernel cleared it "
                         f"(/proc/cpuinfo): it is not used")
        elif name in kernel and not cpuid[name]:
            notes.append(f"the kernel lists {name} but CPUID does not report it: it is not used")
    def both(name: str) -> bool:
        return bool(cpuid[name]) and name in kernel

    return CpuFeatures(both("enqcmd"), both("movdir64b"), both("waitpkg"), "cpuid+cpuinfo",
                       tuple(notes))


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> CpuFeatures:
    """ENQCMD, MOVDIR64B and WAITPKG support: CPUID (when the extension is
    loaded) and the kernel's flags must agree; the engine decides the same
    way."""
    cpuid = None
    if native is not None and hasattr(native, "dsa_cpu_features"):
        cpuid = native.dsa_cpu_features()["cpuid"]
    return combine_cpu_features(cpuid, kernel_cpu_flags(cpuinfo))


def has_cap_sys_rawio(status_path: str = "/proc/self/status") -> bool:
    """Whether this process holds CAP_SYS_RAWIO (needed to map a portal on
    kernels with the 2024 DSA erratum fix)."""
    try:
        with open(status_path) as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RAWIO & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _int(text: str | None, default: int = 0) -> int:
    if text is None:
        return default
    try:
        return int(text, 0)
    except ValueError:
        return default


def parse_bitmap(text: str | None) -> int | None:
    """A kernel ``%*pb`` bitmap (comma-separated 32-bit hex words, most
    significant first) or a plain hex number, as an int."""
    if not text:
        return None
    try:
        value = 0
        for word in text.replace(" ", "").split(","):
            value = value << 32 | int(word, 16)
        return value
    except ValueError:
        return None


@dataclass
class DeviceInfo:
    """One DSA device (``dsaN``)."""

    name: str
    state: str
    max_batch_size: int
    max_transfer_size: int
    pasid_enabled: bool
    version: str
    numa_node: int


@dataclass
class WqInfo:
    """One work queue and its verdict."""

    name: str  # wq0.0
    device: str  # dsa0
    dev_path: str  # /dev/dsa/wq0.0
    mode: str  # shared | dedicated
    type: str  # user | kernel | none
    state: str  # enabled | disabled | unknown
    wq_name: str  # the "name" attribute given with accel-config
    size: int
    threshold: int
    max_batch_size: int
    max_transfer_size: int
    priority: int
    group_id: int
    block_on_fault: bool
    usable: bool = False
    # portal-enqcmd | portal-movdir64b (the portal is tried first; write() if
    # the kernel refuses the mapping) | write; the engine's probe proves it
    submission: str = ""
    reasons: list[str] = field(default_factory=list)  # why not usable
    notes: list[str] = field(default_factory=list)  # usable, but worth knowing

    def core_spec(self) -> dict[str, Any]:
        """This WQ as a DsaEngineCore work-queue dict."""
        spec: dict[str, Any] = {
            "path": self.dev_path,
            "mode": self.mode,
            "size": max(1, self.size),
            "max_batch_size": self.max_batch_size,
            "max_transfer_size": self.max_transfer_size or 4096,
            "submit": "write" if self.submission == "write" else "portal",
        }
        if self.mode == "shared":
            spec["threshold"] = self.threshold if 0 < self.threshold <= self.size else self.size
        return spec


@dataclass
class Discovery:
    """What ``discover()`` found."""

    sysfs_root: str
    present: bool
    devices: list[DeviceInfo]
    wqs: list[WqInfo]
    cpu: CpuFeatures
    cap_sys_rawio: bool
    message: str

    def usable(self) -> list[WqInfo]:
        """The WQs dsamig can use, in device order."""
        return [wq for wq in self.wqs if wq.usable]

    def find(self, path: str) -> WqInfo | None:
        """The WQ whose device node is ``path`` (resolving symlinks)."""
        for wq in self.wqs:
            if wq.dev_path == os.path.normpath(path):
                return wq
        real = os.path.realpath(path)
        for wq in self.wqs:
            if os.path.realpath(wq.dev_path) == real:
                return wq
        return None

    def why_none(self) -> str:
        """One line saying why no WQ is usable (for errors and reasons)."""
        if not self.present:
            return self.message
        if not self.wqs:
            return f"no work queue is configured under {self.sysfs_root}"
        parts = [f"{wq.device}/{wq.name}: {'; '.join(wq.reasons)}" for wq in self.wqs]
        return "no usable work queue (" + ", ".join(parts) + ")"

    def to_dict(self) -> dict[str, Any]:
        """The ``dsamig dsa list --json`` object."""
        return {
            "sysfs-root": self.sysfs_root,
            "present": self.present,
            "message": self.message,
            "cpu": {"enqcmd": self.cpu.enqcmd, "movdir64b": self.cpu.movdir64b,
                    "waitpkg": self.cpu.waitpkg, "source": self.cpu.source,
                    "disagreements": list(self.cpu.disagreements)},
            "cap-sys-rawio": self.cap_sys_rawio,
            "devices": [asdict(d) for d in self.devices],
            "wqs": [{k.replace("_", "-"): v for k, v in asdict(w).items()} for w in self.wqs],
            "usable": [w.dev_path for w in self.usable()],
        }


def _device(root: str, name: str) -> DeviceInfo:
    base = os.path.join(root, name)
    return DeviceInfo(
        name=name,
        state=_read(os.path.join(base, "state")) or "unknown",
        max_batch_size=_int(_read(os.path.join(base, "max_batch_size"))),
        max_transfer_size=_int(_read(os.path.join(base, "max_transfer_size"))),
        pasid_enabled=_int(_read(os.path.join(base, "pasid_enabled"))) == 1,
        version=_read(os.path.join(base, "version")) or "",
        numa_node=_int(_read(os.path.join(base, "numa_node")), -1),
    )


def _verdict(
    wq: WqInfo, dev: DeviceInfo | None, op_config: int | None, cpu: CpuFeatures, rawio: bool
) -> None:
    if dev is None:
        wq.reasons.append(f"its device {wq.device} is missing from sysfs")
    elif dev.state != "enabled":
        wq.reasons.append(f"device {wq.device} is {dev.state}")
    if wq.state != "enabled":
        wq.reasons.append(f"the work queue is {wq.state} (accel-config enable-wq)")
    if wq.type != "user":
        wq.reasons.append(f"type is {wq.type!r}, not 'user': it is not for user space")
    if wq.mode not in ("shared", "dedicated"):
        wq.reasons.append(f"unknown mode {wq.mode!r}")
    if op_config is not None and not op_config >> OPCODE_COMPVAL & 1:
        wq.reasons.append("COMPVAL (compare pattern) is not enabled in op_config")
    if wq.reasons:
        return
    try:
        st = os.stat(wq.dev_path)
    except FileNotFoundError:
        wq.reasons.append(f"no device node {wq.dev_path}")
        return
    except OSError as exc:
        wq.reasons.append(f"cannot stat {wq.dev_path}: {exc.strerror}")
        return
    if not stat.S_ISCHR(st.st_mode):
        wq.reasons.append(f"{wq.dev_path} is not a character device")
        return
    if not os.access(wq.dev_path, os.R_OK | os.W_OK):
        wq.reasons.append(
            f"permission denied on {wq.dev_path} (owner {st.st_uid}:{st.st_gid}, "
            f"mode {stat.S_IMODE(st.st_mode):o}): add the user to its group or chown /dev/dsa"
        )
        return
    wq.usable = True
    needs = "ENQCMD" if wq.mode == "shared" else "MOVDIR64B"
    has = cpu.enqcmd if wq.mode == "shared" else cpu.movdir64b
    if has:
        # Only the kernel knows whether it maps the portal for us: the engine
        # tries, falls back to write() on a refusal, and probes either way.
        wq.submission = "portal-enqcmd" if wq.mode == "shared" else "portal-movdir64b"
        if not rawio:
            wq.notes.append(
                "no CAP_SYS_RAWIO: kernels with the INTEL-SA-01084 fix (Linux 6.10; 6.9.1, "
                "6.8.10, 6.6.31, 6.1.91) refuse to map the portal, and then write() is used "
                "(no batch descriptors); older kernels map it for anyone"
            )
    else:
        wq.submission = "write"
        wq.notes.append(f"the CPU lacks {needs}: write() on the device node, no batches "
                        "(kernels before the INTEL-SA-01084 fix have no write(): unusable there)")
    if op_config is not None and not op_config >> OPCODE_BATCH & 1 and wq.submission != "write":
        wq.notes.append("BATCH is not in op_config: one descriptor per page")
    if wq.mode == "dedicated":
        wq.notes.append("dedicated: one process at a time can open it")
    if dev is not None and not dev.pasid_enabled:
        wq.notes.append(f"{wq.device} reports pasid_enabled=0")


def discover(
    sysfs_root: str = SYSFS_ROOT,
    dev_root: str = DEV_ROOT,
    *,
    cpu: CpuFeatures | None = None,
    cap_sys_rawio: bool | None = None,
) -> Discovery:
    """Every DSA work queue under ``sysfs_root`` with its verdict."""
    cpu = cpu or cpu_features()
    rawio = has_cap_sys_rawio() if cap_sys_rawio is None else cap_sys_rawio
    try:
        entries = sorted(os.listdir(sysfs_root))
    except FileNotFoundError:
        return Discovery(
            sysfs_root, False, [], [], cpu, rawio,
            f"no DSA devices: {sysfs_root} does not exist (no DSA hardware here, or the idxd "
            "driver is not loaded)",
        )
    except OSError as exc:
        return Discovery(sysfs_root, False, [], [], cpu, rawio,
                         f"cannot read {sysfs_root}: {exc.strerror}")
    devices = {name: _device(sysfs_root, name) for name in entries if re.fullmatch(r"dsa\d+", name)}
    wqs: list[tuple[tuple[int, int], WqInfo]] = []
    for name in entries:
        m = _WQ_NAME.match(name)
        if not m:
            continue
        device = f"dsa{m.group(1)}"
        if device not in devices and os.path.exists(os.path.join(sysfs_root, f"iax{m.group(1)}")):
            continue  # an IAA work queue shares the bus, not our business
        base = os.path.join(sysfs_root, name)

        def attr(key: str, base: str = base) -> str | None:
            return _read(os.path.join(base, key))

        info = WqInfo(
            name=name,
            device=device,
            dev_path=os.path.join(dev_root, name),
            mode=attr("mode") or "unknown",
            type=attr("type") or "none",
            state=attr("state") or "unknown",
            wq_name=attr("name") or "",
            size=_int(attr("size")),
            threshold=_int(attr("threshold")),
            max_batch_size=_int(attr("max_batch_size")),
            max_transfer_size=_int(attr("max_transfer_size")),
            priority=_int(attr("priority")),
            group_id=_int(attr("group_id"), -1),
            block_on_fault=_int(attr("block_on_fault")) == 1,
        )
        _verdict(info, devices.get(device), parse_bitmap(attr("op_config")), cpu, rawio)
        wqs.append(((int(m.group(1)), int(m.group(2))), info))
    wqs.sort(key=lambda item: item[0])
    found = [w for _, w in wqs]
    usable = sum(w.usable for w in found)
    message = (
        f"{len(devices)} DSA device(s), {len(found)} work queue(s), {usable} usable"
        if devices or found
        else f"no DSA devices under {sysfs_root}"
    )
    return Discovery(sysfs_root, True, list(devices.values()), found, cpu, rawio, message)


def format_table(d: Discovery) -> str:
    """``dsamig dsa list`` as text."""
    cpu = ", ".join(
        f"{name} {'yes' if ok else 'no'}"
        for name, ok in (("ENQCMD", d.cpu.enqcmd), ("MOVDIR64B", d.cpu.movdir64b),
                         ("WAITPKG", d.cpu.waitpkg))
    )
    lines = [d.message, f"CPU: {cpu}; CAP_SYS_RAWIO: {'yes' if d.cap_sys_rawio else 'no'}"]
    lines += [f"CPU: note: {text}" for text in d.cpu.disagreements]
    if d.devices:
        lines.append("")
        for dev in d.devices:
            lines.append(
                f"{dev.name}: {dev.state}, max batch {dev.max_batch_size}, max transfer "
                f"{dev.max_transfer_size}, pasid {'on' if dev.pasid_enabled else 'off'}"
            )
    if d.wqs:
        lines.append("")
        header = ("WQ", "MODE", "TYPE", "STATE", "SIZE", "THR", "BATCH", "XFER", "VERDICT")
        rows = [header]
        for w in d.wqs:
            verdict = f"usable ({w.submission})" if w.usable else "not usable"
            rows.append((f"{w.device}/{w.name}", w.mode, w.type, w.state, str(w.size),
                         str(w.threshold), str(w.max_batch_size), str(w.max_transfer_size),
                         verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
        for w in d.wqs:
            for text in w.reasons:
                lines.append(f"  {w.name}: {text}")
            for text in w.notes:
                lines.append(f"  {w.name}: note: {text}")
    return "\n".join(lines)


def list_command(as_json: bool = False, sysfs_root: str = SYSFS_ROOT,
                 dev_root: str = DEV_ROOT) -> int:
    """``dsamig dsa list [--json]``: print what discover() found; always 0,
    since finding no DSA is an answer, not a failure."""
    found = discover(sysfs_root, dev_root)
    if as_json:
        print(json.dumps(found.to_dict(), indent=2))
    else:
        print(format_table(found))
    return 0
