"""DSA work-queue discovery against fake sysfs trees, and ``dsamig dsa list``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsamig.dsa_config import DsaConfig
from dsamig.engine.dsa_discovery import (
    CpuFeatures,
    combine_cpu_features,
    cpu_features,
    discover,
    format_table,
    has_cap_sys_rawio,
    kernel_cpu_flags,
    parse_bitmap,
)
from dsamig.engine.select import create_engine
from dsamig.errors import ConfigError, EngineError
from tests.engine.dsa_helpers import requires_native

ALL_CPU = CpuFeatures(enqcmd=True, movdir64b=True, waitpkg=True, source="test")
NO_CPU = CpuFeatures(enqcmd=False, movdir64b=False, waitpkg=False, source="test")
SPR_OP_CONFIG = "0000007b,00bf07ff"  # a Sapphire Rapids WQ's op_config


def make_tree(tmp_path, wqs: dict[str, dict[str, str]], devices: dict[str, dict[str, str]]
              | None = None, nodes: dict[str, str] | None = None) -> tuple[str, str]:
    """A fake /sys/bus/dsa/devices and /dev/dsa.  ``nodes`` maps a WQ name to
    "char" (a character device: a link to /dev/null) or "file"."""
    sysfs = tmp_path / "sys"
    dev = tmp_path / "dev"
    sysfs.mkdir()
    dev.mkdir()
    devices = devices if devices is not None else {"dsa0": {}}
    for name, attrs in devices.items():
        d = sysfs / name
        d.mkdir()
        base = {"state": "enabled", "max_batch_size": "1024", "max_transfer_size": "2147483648",
                "pasid_enabled": "1", "version": "0x100", "numa_node": "0"}
        for key, value in {**base, **attrs}.items():
            (d / key).write_text(value + "\n")
    for name, attrs in wqs.items():
        d = sysfs / name
        d.mkdir()
        base = {"mode": "shared", "type": "user", "state": "enabled", "name": "zeroscan",
                "size": "16", "threshold": "15", "max_batch_size": "32",
                "max_transfer_size": "2097152", "priority": "10", "group_id": "0",
                "block_on_fault": "0", "op_config": SPR_OP_CONFIG}
        for key, value in {**base, **attrs}.items():
            (d / key).write_text(value + "\n")
    for name, kind in (nodes or {}).items():
        if kind == "char":
            os.symlink("/dev/null", dev / name)
        else:
            (dev / name).write_text("")
    return str(sysfs), str(dev)


def test_no_dsa_at_all(tmp_path) -> None:
    found = discover(str(tmp_path / "absent"), str(tmp_path / "dev"), cpu=NO_CPU)
    assert not found.present and found.wqs == [] and found.usable() == []
    assert "does not exist" in found.message
    assert "does not exist" in found.why_none()
    assert "no DSA devices" in format_table(found)


def test_shared_and_dedicated_user_queues(tmp_path) -> None:
    sysfs, dev = make_tree(
        tmp_path,
        {"wq0.0": {}, "wq0.1": {"mode": "dedicated", "threshold": "0", "size": "8"}},
        nodes={"wq0.0": "char", "wq0.1": "char"},
    )
    found = discover(sysfs, dev, cpu=ALL_CPU, cap_sys_rawio=True)
    shared, dedicated = found.wqs
    assert (shared.name, shared.mode, shared.usable, shared.submission) == (
        "wq0.0", "shared", True, "portal-enqcmd")
    assert (dedicated.mode, dedicated.usable, dedicated.submission) == (
        "dedicated", True, "portal-movdir64b")
    assert (shared.size, shared.threshold, shared.max_batch_size) == (16, 15, 32)
    assert shared.max_transfer_size == 2 * 1024 * 1024 and shared.wq_name == "zeroscan"
    assert any("one process" in note for note in dedicated.notes)
    spec = shared.core_spec()
    assert spec == {"path": os.path.join(dev, "wq0.0"), "mode": "shared", "size": 16,
                    "threshold": 15, "max_batch_size": 32, "max_transfer_size": 2097152,
                    "submit": "portal"}
    assert "threshold" not in dedicated.core_spec()
    assert found.find(os.path.join(dev, "wq0.1")) is dedicated


def test_without_cap_sys_rawio_the_portal_is_still_tried(tmp_path) -> None:
    """Only the kernel knows whether it maps the portal for this process:
    before the INTEL-SA-01084 fix anyone may, and write() does not exist.
    Discovery does not decide for it; the engine maps first and falls back
    to write() on a refusal."""
    sysfs, dev = make_tree(tmp_path, {"wq0.0": {}}, nodes={"wq0.0": "char"})
    no_cap = discover(sysfs, dev, cpu=ALL_CPU, cap_sys_rawio=False).wqs[0]
    assert no_cap.usable and no_cap.submission == "portal-enqcmd"
    assert no_cap.core_spec()["submit"] == "portal"
    [note] = [n for n in no_cap.notes if "CAP_SYS_RAWIO" in n]
    assert "INTEL-SA-01084" in note and "6.1.91" in note and "write()" in note
    no_insn = discover(sysfs, dev, cpu=NO_CPU, cap_sys_rawio=True).wqs[0]
    assert no_insn.usable and no_insn.submission == "write"
    assert no_insn.core_spec()["submit"] == "write"
    assert any("ENQCMD" in note for note in no_insn.notes)


@pytest.mark.parametrize(
    ("wq_attrs", "dev_attrs", "nodes", "reason"),
    [
        ({"state": "disabled"}, {}, {"wq0.0": "char"}, "disabled"),
        ({"type": "kernel"}, {}, {"wq0.0": "char"}, "not for user space"),
        ({}, {"state": "disabled"}, {"wq0.0": "char"}, "device dsa0 is disabled"),
        ({}, {}, {}, "no device node"),
        ({}, {}, {"wq0.0": "file"}, "not a character device"),
        ({"op_config": "00000000,00000001"}, {}, {"wq0.0": "char"}, "COMPVAL"),
    ],
)
def test_unusable_queues_say_why(tmp_path, wq_attrs, dev_attrs, nodes, reason) -> None:
    sysfs, dev = make_tree(tmp_path, {"wq0.0": wq_attrs}, {"dsa0": dev_attrs}, nodes)
    found = discover(sysfs, dev, cpu=ALL_CPU, cap_sys_rawio=True)
    [wq] = found.wqs
    assert not wq.usable
    assert any(reason in r for r in wq.reasons), wq.reasons
    assert found.usable() == []
    assert reason in found.why_none()
    assert reason in format_table(found)


def test_permission_denied(tmp_path, monkeypatch) -> None:
    sysfs, dev = make_tree(tmp_path, {"wq0.0": {}}, nodes={"wq0.0": "char"})
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    [wq] = discover(sysfs, dev, cpu=ALL_CPU, cap_sys_rawio=True).wqs
    assert not wq.usable and "permission denied" in wq.reasons[0]


def test_iaa_queues_and_ordering(tmp_path) -> None:
    sysfs, dev = make_tree(
        tmp_path, {"wq2.0": {}, "wq0.10": {}, "wq0.2": {}, "wq1.0": {}},
        {"dsa0": {}, "iax1": {}, "dsa2": {}},
        nodes={"wq2.0": "char", "wq0.10": "char", "wq0.2": "char"},
    )
    found = discover(sysfs, dev, cpu=ALL_CPU, cap_sys_rawio=True)
    assert [w.name for w in found.wqs] == ["wq0.2", "wq0.10", "wq2.0"]  # the IAA one skipped
    assert [d.name for d in found.devices] == ["dsa0", "dsa2"]
    data = found.to_dict()
    assert data["present"] and len(data["usable"]) == 3
    json.dumps(data)


def test_bitmaps_and_capabilities(tmp_path) -> None:
    assert parse_bitmap(SPR_OP_CONFIG) == 0x7B_00BF07FF
    assert parse_bitmap("0x41") == 0x41 and parse_bitmap("") is None
    assert parse_bitmap("zz") is None
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000020000\n")
    assert has_cap_sys_rawio(str(status))
    status.write_text("CapEff:\t0000000000000000\n")
    assert not has_cap_sys_rawio(str(status))
    features = cpu_features()
    assert isinstance(features.enqcmd, bool)


CPUID_ALL = {"enqcmd": True, "movdir64b": True, "waitpkg": True}
CPUID_NONE = {"enqcmd": False, "movdir64b": False, "waitpkg": False}


def test_cpu_features_need_cpuid_and_the_kernel_to_agree() -> None:
    """The kernel can clear ENQCMD; a user ENQCMD then raises #GP."""
    cleared = combine_cpu_features(CPUID_ALL, {"fpu", "movdir64b", "waitpkg"})
    assert (cleared.enqcmd, cleared.movdir64b, cleared.waitpkg) == (False, True, True)
    assert cleared.disagreements == (
        "CPUID reports ENQCMD but the kernel cleared it (/proc/cpuinfo): it is not used",)
    both = combine_cpu_features(CPUID_ALL, {"enqcmd", "movdir64b", "waitpkg"})
    assert (both.enqcmd, both.movdir64b, both.source, both.disagreements) == (
        True, True, "cpuid+cpuinfo", ())
    odd = combine_cpu_features(CPUID_NONE, {"enqcmd"})
    assert not odd.enqcmd and "CPUID does not report it" in odd.disagreements[0]
    unreadable = combine_cpu_features(CPUID_ALL, None)
    assert not (unreadable.enqcmd or unreadable.movdir64b or unreadable.waitpkg)
    assert "cannot be read" in unreadable.disagreements[0]
    # Without the extension there is no CPUID: the kernel's view alone.
    assert combine_cpu_features(None, {"movdir64b", "enqcmd"}) == CpuFeatures(
        True, True, False, "cpuinfo")


def test_a_cleared_flag_is_a_note_of_dsa_list(tmp_path) -> None:
    sysfs, dev = make_tree(tmp_path, {"wq0.0": {}}, nodes={"wq0.0": "char"})
    cleared = combine_cpu_features(CPUID_ALL, {"movdir64b", "waitpkg"})
    found = discover(sysfs, dev, cpu=cleared, cap_sys_rawio=True)
    assert found.wqs[0].submission == "write"
    assert "CPUID reports ENQCMD but the kernel cleared it" in format_table(found)
    assert found.to_dict()["cpu"]["disagreements"] == list(cleared.disagreements)


def test_the_kernel_flags_are_read_from_cpuinfo(tmp_path) -> None:
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor: 0\nflags\t\t: fpu sse2 movdir64b enqcmd\n"
                     "processor: 1\nflags\t\t: fpu\n")
    assert kernel_cpu_flags(str(flags)) == {"fpu", "sse2", "movdir64b", "enqcmd"}
    assert kernel_cpu_flags(str(tmp_path / "absent")) is None


@requires_native
def test_the_extension_reads_cpuinfo_the_same_way(tmp_path) -> None:
    """The engine's own view (it decides in C): the same file, ANDed with CPUID."""
    from dsamig.native import native

    flags = tmp_path / "cpuinfo"
    flags.write_text("processor: 0\nflags\t\t: fpu sse2 movdir64b enqcmd\n"
                     "processor: 1\nflags\t\t: fpu\n")
    seen = native.dsa_cpu_features(str(flags))
    assert seen["kernel"] == {"enqcmd": True, "movdir64b": True, "waitpkg": False}
    for name in ("enqcmd", "movdir64b", "waitpkg"):
        assert seen[name] == (seen["cpuid"][name] and seen["kernel"][name])
    missing = native.dsa_cpu_features(str(tmp_path / "absent"))
    assert missing["kernel"] is None and missing["kernel-error"]
    assert not (missing["enqcmd"] or missing["movdir64b"] or missing["waitpkg"])


async def test_engine_selection_with_a_fake_tree(tmp_path) -> None:
    """auto falls back to the CPU and says why; dsa refuses to."""
    sysfs, dev = make_tree(tmp_path, {"wq0.0": {"type": "kernel"}}, nodes={"wq0.0": "char"})
    config = DsaConfig(sysfs_root=sysfs, dev_root=dev)
    engine, reason = create_engine("auto", dsa=config)
    try:
        assert engine.name == "cpu"
        assert "not for user space" in reason
    finally:
        engine.close()
    with pytest.raises(EngineError, match="not for user space"):
        create_engine("dsa", dsa=config)
    with pytest.raises(EngineError, match="is not a DSA work queue"):
        create_engine("dsa", dsa=DsaConfig(wqs=[str(tmp_path)], sysfs_root=sysfs, dev_root=dev))
    with pytest.raises(ConfigError, match="not both"):
        create_engine("dsa", dsa=DsaConfig(wqs=["/dev/dsa/wq0.0"], emulate=1))


def test_automatic_choice_prefers_shared_queues(tmp_path) -> None:
    """Only one process can open a dedicated WQ: chosen automatically, the
    shared ones are taken when there are any."""
    from dsamig.engine.select import resolve_dsa

    sysfs, dev = make_tree(
        tmp_path,
        {"wq0.0": {"mode": "dedicated", "threshold": "0"}, "wq0.1": {}},
        nodes={"wq0.0": "char", "wq0.1": "char"},
    )
    specs, reason = resolve_dsa(DsaConfig(sysfs_root=sysfs, dev_root=dev))
    assert specs is not None and [s["path"] for s in specs] == [os.path.join(dev, "wq0.1")]
    assert "dedicated WQs left alone" in reason and "wq0.0" in reason
    # Asked for by path, a dedicated WQ is used.
    specs, _ = resolve_dsa(DsaConfig(wqs=[os.path.join(dev, "wq0.0")], sysfs_root=sysfs,
                                     dev_root=dev))
    assert specs is not None and specs[0]["mode"] == "dedicated"
    # With only dedicated ones, those.
    (tmp_path / "only").mkdir()
    only, onlydev = make_tree(tmp_path / "only", {"wq1.0": {"mode": "dedicated"}},
                              {"dsa1": {}}, nodes={"wq1.0": "char"})
    specs, reason = resolve_dsa(DsaConfig(sysfs_root=only, dev_root=onlydev))
    assert specs is not None and specs[0]["mode"] == "dedicated"
    assert "left alone" not in reason


async def test_auto_picks_emulated_queues_when_asked() -> None:
    engine, reason = create_engine("auto", dsa=DsaConfig(emulate=1))
    try:
        assert engine.name == "dsa" and "software work queue" in reason
    finally:
        engine.close()


async def test_auto_without_dsa_here() -> None:
    engine, reason = create_engine("auto", dsa=DsaConfig(sysfs_root="/nonexistent/dsa"))
    try:
        assert engine.name == "cpu"
        assert "DSA not used" in reason and "does not exist" in reason
    finally:
        engine.close()


def test_config_from_a_job_mapping() -> None:
    config = DsaConfig.from_mapping({
        "wqs": [{"path": "/dev/dsa/wq0.0"}, {"path": "/dev/dsa/wq2.0"}],
        "timeout-s": 0.5,
    })
    assert config.wqs == ["/dev/dsa/wq0.0", "/dev/dsa/wq2.0"] and config.timeout_s == 0.5
    config = DsaConfig.from_mapping({"emulate": {"count": 2, "mode": "dedicated", "size": 8,
                                                 "faults": {"hang": 0.01, "seed": 3}}})
    assert (config.emulate, config.emulate_mode, config.emulate_size) == (2, "dedicated", 8)
    assert config.emulate_faults is not None and config.emulate_faults.hang == 0.01
    for bad, word in [({"wq": []}, "unknown key 'wq'"), ({"wqs": ["/dev/dsa/wq0.0"]}, "path"),
                      ({"emulate": {"count": 2, "faults": {"hangs": 1}}}, "hangs"),
                      ({"emulate": {"mode": "fast"}}, "shared or dedicated"),
                      ({"timeout-s": "1"}, "timeout-s"), ({"emulate": 99}, "emulate")]:
        with pytest.raises(ConfigError, match=word):
            DsaConfig.from_mapping(bad)


def test_emulated_kernel_and_model_in_a_job_mapping() -> None:
    config = DsaConfig.from_mapping({"emulate": {
        "count": 1, "model": "dsa2", "kernel-mmap": "eperm", "kernel-write": False,
        "foreign-mm": True}})
    assert (config.emulate_model, config.emulate_kernel_mmap) == ("dsa2", "eperm")
    assert config.emulate_kernel_write is False and config.emulate_foreign_mm is True
    [spec] = config.core_specs()
    assert (spec["model"], spec["kernel_mmap"], spec["kernel_write"], spec["foreign_mm"]) == (
        "dsa2", "eperm", False, True)
    assert DsaConfig.from_mapping(config.to_mapping()) == config
    for bad, word in [({"model": "dsa3"}, "dsa1 or dsa2"), ({"kernel-mmap": "no"}, "eperm"),
                      ({"kernel-write": "yes"}, "true or false")]:
        with pytest.raises(ConfigError, match=word):
            DsaConfig.from_mapping({"emulate": {"count": 1, **bad}})


def test_dsa_list_here_exits_zero_and_says_so() -> None:
    run = subprocess.run([sys.executable, "-m", "dsamig", "dsa", "list", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert set(data) >= {"present", "message", "cpu", "wqs", "usable"}
    if not os.path.exists("/sys/bus/dsa/devices"):
        assert data["present"] is False and data["usable"] == []
        assert "no DSA devices" in data["message"]
    text = subprocess.run([sys.executable, "-m", "dsamig", "dsa", "list"],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and "CPU: ENQCMD" in text.stdout


def test_config_converter_for_the_job_schema() -> None:
    from dsamig.dsa_config import dsa_config_converter
    from dsamig.jobs.schema import load_yaml_text

    doc = load_yaml_text("engine:\n  dsa:\n    emulate: {count: 2, sise: 8}\n", "job.yaml")
    where = doc.root.child("engine").child("dsa")
    with pytest.raises(ConfigError, match=r"^job.yaml:\d: engine.dsa.emulate: unknown key 'sise'"):
        dsa_config_converter(doc.data["engine"]["dsa"], where)
    good = load_yaml_text("engine:\n  dsa:\n    wqs: [{path: /dev/dsa/wq0.0}]\n", "job.yaml")
    config = dsa_config_converter(good.data["engine"]["dsa"],
                                  good.root.child("engine").child("dsa"))
    assert config.wqs == ["/dev/dsa/wq0.0"]
