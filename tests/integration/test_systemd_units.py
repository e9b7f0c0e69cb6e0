"""The shipped systemd units, and the daemon's side of the notify protocol.

``systemd-analyze verify`` exits 0 on unknown keys and bad values, so these
tests fail on any line it prints.  The units name /opt/dsamig/bin/dsamig,
which must exist for verify: the tests verify copies whose ExecStart points
at this environment's dsamig.
"""

from __future__ import annotations

import configparser
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemon_helpers import Daemon, ok, short_dir

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
SHIPPED_DSAMIG = "/opt/dsamig/bin/dsamig"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                   "(.ci/run installs it: apt-get install systemd)")


def local_dsamig() -> str:
    """An executable dsamig in this environment, for ExecStart= to point at."""
    path = shutil.which("dsamig") or os.path.join(os.path.dirname(sys.executable), "dsamig")
    assert os.access(path, os.X_OK), "dsamig console script not found next to the interpreter"
    return path


def unit_copies(directory: Path, extra: dict[str, str] | None = None) -> list[Path]:
    copies = []
    for unit in UNITS:
        text = unit.read_text().replace(SHIPPED_DSAMIG, local_dsamig())
        for marker, addition in (extra or {}).items():
            text = text.replace(marker, marker + addition)
        copy = directory / unit.name
        copy.write_text(text)
        copies.append(copy)
    return copies


def verify(units: list[Path]) -> tuple[int, list[str]]:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", *map(str, units)],
        capture_output=True, text=True, timeout=60,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, lines


def read_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment]  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_the_three_units_exist() -> None:
    assert [u.name for u in UNITS] == [
        "dsamig-job@.service", "dsamig-receiver.service", "dsamig-sender.service"]


@needs_analyze
def test_systemd_analyze_verify_prints_nothing(tmp_path) -> None:
    code, lines = verify(unit_copies(tmp_path))
    assert code == 0 and lines == [], "\n".join(lines)


@needs_analyze
def test_verify_check_would_catch_a_bad_key(tmp_path) -> None:
    # The guard against a check that cannot fail: verify still exits 0 here,
    # and only the printed warning gives the mistake away.
    code, lines = verify(unit_copies(tmp_path, {"[Service]\n": "DeviceAlow=char-dsa rw\n"}))
    assert code == 0
    assert any("Unknown key 'DeviceAlow'" in line for line in lines), lines


@needs_analyze
def test_exposure_stays_low(tmp_path) -> None:
    for unit in unit_copies(tmp_path):
        if "@" in unit.name:
            instance = unit.with_name(unit.name.replace("@", "@check"))
            instance.write_text(unit.read_text())
            unit = instance
        result = subprocess.run(
            [ANALYZE, "security", "--offline=true", "--threshold=50", str(unit)],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr


@pytest.mark.parametrize("name", ["dsamig-sender.service", "dsamig-receiver.service"])
def test_daemon_units_follow_the_conventions(name: str) -> None:
    service = read_unit(ROOT / "systemd" / name)["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] and service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "dsamig"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["DevicePolicy"] == "closed"
    assert "PrivateDevices" not in service  # it would hide /dev/dsa and drop CAP_SYS_RAWIO
    assert "AF_UNIX" in service["RestrictAddressFamilies"]  # sd_notify and the control socket
    role = name.split("-")[1].split(".")[0]
    assert service["ExecStart"] == f"{SHIPPED_DSAMIG} {role} --config /etc/dsamig/{role}.yaml"
    if role == "sender":
        assert service["DeviceAllow"] == "char-dsa rw"
        assert service["CapabilityBoundingSet"] == "CAP_SYS_RAWIO"
        assert service["AmbientCapabilities"] == "CAP_SYS_RAWIO"
    else:
        assert "/var/lib/dsamig" in service["ReadWritePaths"]


def test_units_run_the_dsamig_the_install_recipe_makes() -> None:
    """Every command line of every unit starts the venv docs/operations.md creates."""
    recipe = (ROOT / "docs" / "operations.md").read_text()
    venv = SHIPPED_DSAMIG.removesuffix("/bin/dsamig")
    assert f"sudo python3 -m venv {venv}\n" in recipe
    assert f"sudo {venv}/bin/pip install " in recipe
    assert "\nsudo pip install" not in recipe  # refused on Debian 12: externally managed
    for unit in UNITS:
        service = read_unit(unit)["Service"]
        for key in ("ExecStartPre", "ExecStart"):
            if key in service:
                assert service[key].startswith(SHIPPED_DSAMIG + " "), (unit.name, key)


def test_job_template_waits_for_the_job() -> None:
    unit = read_unit(ROOT / "systemd" / "dsamig-job@.service")
    assert unit["Service"]["Type"] == "oneshot"
    assert "start --wait" in unit["Service"]["ExecStart"]
    assert "/etc/dsamig/jobs/%i.yaml" in unit["Service"]["ExecStart"]
    assert "dsamig-sender.service" in unit["Unit"]["Requires"]


class NotifyListener:
    """A fake ``$NOTIFY_SOCKET``: collects datagrams with their arrival times."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect_until(self, predicate: Callable[[dict[str, str]], bool],
                      timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such notification; got {self.messages}")
            self.sock.settimeout(left)
            data = self.sock.recv(65536).decode()
            fields = dict(line.split("=", 1) for line in data.split("\n") if line)
            self.messages.append((time.monotonic(), fields))
            if predicate(fields):
                return fields

    def close(self) -> None:
        self.sock.close()


def test_ready_status_watchdog_stopping(tmp_path) -> None:
    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        listener = NotifyListener(os.path.join(directory, "notify"))
        watchdog_usec = 400_000  # pings due every 0.2 s
        daemon = Daemon.start(
            "receiver", directory, {"listen": "127.0.0.1:0", "storage_dir": storage},
            env={"NOTIFY_SOCKET": os.path.join(directory, "notify"),
                 "WATCHDOG_USEC": str(watchdog_usec)},
            wait=False,
        )
        try:
            ready = listener.collect_until(lambda f: f.get("READY") == "1", 15)
            # READY only once everything is bound: both sockets answer at once.
            info = ok(daemon.socket, "query-daemon")
            host, port = info["listen"].rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=2).close()
            assert "receiving" in ready["STATUS"]
            assert len(listener.messages) == 1  # nothing before READY

            start = time.monotonic()
            listener.collect_until(lambda f: time.monotonic() - start > 1.2, 5)
            pings = [t for t, f in listener.messages if f.get("WATCHDOG") == "1"]
            assert len(pings) >= 5, listener.messages
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert max(gaps) < watchdog_usec / 1e6, gaps
            assert any("STATUS" in f for _, f in listener.messages[1:])

            daemon.send_signal(signal.SIGHUP)
            listener.collect_until(lambda f: f.get("RELOADING") == "1", 5)
            listener.collect_until(lambda f: f.get("READY") == "1", 5)

            daemon.send_signal(signal.SIGTERM)
            stopping = listener.collect_until(lambda f: f.get("STOPPING") == "1", 5)
            assert stopping["STATUS"].startswith("stopping")
            assert daemon.stop() == 0
        finally:
            daemon.kill()
            listener.close()
