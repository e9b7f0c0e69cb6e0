"""The Grafana dashboard in contrib/: every query names metrics (and labels) that
real daemons export, scraped after a capped job on the software DSA engine."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.daemon_helpers import Daemon, job_document, ok, short_dir, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "dsamig-dashboard.json"
MiB = 1024 * 1024

#: PromQL words that are not metric names.
PROMQL = {"rate", "irate", "increase", "delta", "sum", "max", "min", "avg", "count", "time",
          "by", "on", "and", "or", "unless", "without", "ignoring", "group_left",
          "group_right", "offset", "bool", "histogram_quantile", "clamp_min"}
#: Labels Prometheus adds to every series of a target.
TARGET_LABELS = {"instance", "job"}


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every query of every panel."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"], target.get("legendFormat", "")))
    return out


def parse_query(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression uses."""
    labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*=~?", " ".join(
        re.findall(r"\{([^}]*)\}", expr))))
    for clause in re.findall(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                             expr):
        labels |= {name.strip() for name in clause.split(",") if name.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", expr)
    bare = re.sub(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = {word for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
             if word not in PROMQL}
    return names, labels


def scrape(address: str) -> tuple[set[str], dict[str, set[str]]]:
    """Metric families declared, and the label names seen on each."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    labels: dict[str, set[str]] = {}
    for name, body in re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? \S+$", text,
                                 re.MULTILINE):
        labels.setdefault(name, set()).update(re.findall(r'([a-zA-Z_]\w*)="', body))
    return declared, labels


def test_the_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "dsamig" and dashboard["uid"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    assert len({p["id"] for p in dashboard["panels"]}) == len(titles)
    for wanted in ("Rate per daemon", "Rate per job", "Channels", "Reconnects",
                   "Engine fallbacks to the CPU", "Queue depth and running jobs",
                   "Finished jobs"):
        assert wanted in titles, wanted
    for title, expr, _ in queries(dashboard):
        assert expr.count("(") == expr.count(")"), title
        assert parse_query(expr)[0], f"{title}: no metric in {expr!r}"


def test_every_query_names_exported_metrics(image_factory) -> None:
    image, _, _ = image_factory(4 * MiB, seed=60, zero_every=3)
    declared: set[str] = set()
    labels: dict[str, set[str]] = {}

    def collect(*addresses: str) -> None:
        for address in addresses:
            names, seen = scrape(address)
            declared.update(names)
            for name, found in seen.items():
                labels.setdefault(name, set()).update(found)

    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = Daemon.start("receiver", directory, {
            "listen": "127.0.0.1:0", "storage_dir": storage, "metrics_listen": "127.0.0.1:0"})
        sender = Daemon.start("sender", directory, {"metrics_listen": "127.0.0.1:0",
                                                    "limits": {"max_bandwidth": "1Gbit"}})
        try:
            addresses = (receiver.info["metrics-listen"],
                         ok(sender.socket, "query-daemon")["metrics-listen"])
            job = ok(sender.socket, "job-start", job_document(
                "dashboard", image, receiver.port, max_bandwidth="4MiB/s", channels=2,
                engine={"kind": "dsa", "dsa": {"emulate": {"count": 1}}}))
            # While the job runs: its per-job series, with their labels.
            wait_for(lambda: sender.job(job["id"])["status"] == "active", what="active")
            wait_for(lambda: "dsamig_job_transferred_bytes_total" in scrape(addresses[1])[1],
                     what="per-job series")
            collect(*addresses)
            assert sender.wait_job(job["id"])["status"] == "completed"
            collect(*addresses)
        finally:
            sender.kill()
            receiver.kill()
    dashboard = json.loads(DASHBOARD.read_text())
    for title, expr, legend in queries(dashboard):
        names, used_labels = parse_query(expr)
        for name in names:
            assert name in declared, f"{title}: {name} is not exported ({expr})"
        known = TARGET_LABELS.union(*(labels.get(name, set()) for name in names))
        assert used_labels <= known, f"{title}: labels {used_labels - known} in {expr}"
        for label in re.findall(r"\{\{(\w+)\}\}", legend):
            assert label in known, f"{title}: legend label {label}"
    assert {"job_name", "peer"} <= labels["dsamig_job_transferred_bytes_total"]
    assert labels["dsamig_engine_cpu_fallback_pages_total"] == {"backend"}
