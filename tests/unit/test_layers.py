"""The import graph of dsamig: every edge points down the layers, and no cycle.

The layers and their order are docs/architecture.md's ("Layers"); each
module's imports are read from its source (module level and inside
functions alike: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dsamig"

#: Bottom to top.  A name ending in ".*" is a package with everything in it.
#: A module may import its own layer and the layers below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", ("dsamig", "dsamig.settings", "dsamig.runtime", "dsamig.errors",
                "dsamig.units", "dsamig.logs", "dsamig.dsa_config")),
    ("native", ("dsamig.native", "dsamig._pure", "dsamig._native", "dsamig.checksum")),
    ("proto", ("dsamig.proto.*",)),
    ("shared values", ("dsamig.stats", "dsamig.report", "dsamig.security")),
    ("pages", ("dsamig.pages.*",)),
    ("engine", ("dsamig.engine.*",)),
    ("live", ("dsamig.live.*",)),
    ("transport", ("dsamig.transport.*",)),
    ("jobs", ("dsamig.jobs.*",)),
    ("control", ("dsamig.control.*",)),
    ("daemon", ("dsamig.daemon.*",)),
    ("commands", ("dsamig.oneshot", "dsamig.demo", "dsamig.verify")),
    ("cli", ("dsamig.cli", "dsamig.__main__")),
)
#: Lower layers a layer must not import although they lie below it: the job
#: model, the control API and their commands (`dsamig status`, `stop`,
#: `jobs`) never load the engine, the transport or the files.
FORBIDDEN = {
    "jobs": {"native", "pages", "engine", "transport"},
    "control": {"native", "pages", "engine", "transport"},
}
#: The leaves of the leaves: they import no part of dsamig at all.
ROOTS = ("dsamig.settings", "dsamig.logs", "dsamig")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The dsamig modules ``name`` imports, wherever in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "dsamig")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "dsamig":
                continue
            for alias in node.names:
                # `from dsamig import _pure` imports a module, not a name.
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known or sub == "dsamig._native" else base)
    out.discard(name)
    return out


def layer_of(name: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if name == member or (member.endswith(".*") and
                                  (name == member[:-2] or name.startswith(member[:-1]))):
                return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and to "
                         "docs/architecture.md")


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def test_every_module_has_a_layer() -> None:
    for name in graph():
        layer_of(name)


def test_no_edge_points_up() -> None:
    upward = []
    for name, targets in sorted(graph().items()):
        here = layer_of(name)
        for target in sorted(targets):
            there = layer_of(target)
            banned = FORBIDDEN.get(LAYERS[here][0], set())
            if there > here or LAYERS[there][0] in banned:
                upward.append(f"{name} ({LAYERS[here][0]}) imports {target} "
                              f"({LAYERS[there][0]})")
    assert not upward, "\n".join(upward)


def test_the_roots_import_nothing_of_dsamig() -> None:
    edges = graph()
    for name in ROOTS:
        assert not edges[name], f"{name} imports {sorted(edges[name])}"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return None

    for name in sorted(edges):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def test_no_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("source, words", [
    ("import dsamig.transport.sender\n", "imports dsamig.transport.sender (transport)"),
    ("from dsamig.engine import create_engine\n", "imports dsamig.engine (engine)"),
    ("from dsamig.daemon.base import Daemon\n", "imports dsamig.daemon.base (daemon)"),
])
def test_the_check_catches_a_bad_edge(tmp_path, monkeypatch, source: str, words: str) -> None:
    """The checker is not vacuous: a job-model module that reached for the
    transport, the engine or the daemon would fail it."""
    real = modules()
    bad = tmp_path / "bad.py"
    bad.write_text(source)

    def with_bad() -> dict[str, Path]:
        return {**real, "dsamig.jobs.bad": bad}

    monkeypatch.setattr(__import__(__name__, fromlist=["modules"]), "modules", with_bad)
    with pytest.raises(AssertionError, match=words.replace("(", r"\(").replace(")", r"\)")):
        test_no_edge_points_up()
