"""The examples in configs/ validate, and every schema key is shown and documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dsamig.jobs import load_job, load_receiver_config, load_sender_config
from dsamig.jobs.config import JOB_SCHEMA, RECEIVER_SCHEMA, SENDER_SCHEMA
from dsamig.jobs.schema import iter_keys, load_yaml_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "configs").glob("*.yaml"))
KINDS = {
    "receiver": (load_receiver_config, RECEIVER_SCHEMA),
    "sender": (load_sender_config, SENDER_SCHEMA),
    "job": (load_job, JOB_SCHEMA),
}


def kind_of(path: Path) -> str:
    return next(kind for kind in KINDS if path.stem.startswith(kind))


def test_there_is_an_example_of_each_kind() -> None:
    assert {kind_of(p) for p in EXAMPLES} == set(KINDS)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(example: Path) -> None:
    load, _ = KINDS[kind_of(example)]
    load(str(example))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_example_shows_every_key(kind: str) -> None:
    _, schema = KINDS[kind]
    doc = load_yaml_file(str(ROOT / "configs" / f"{kind}.yaml"))
    shown = {".".join(str(p) for p in path) for path in doc.lines if path}
    missing = [dotted for dotted, _ in iter_keys(schema) if dotted not in shown]
    assert not missing, f"configs/{kind}.yaml does not show {missing}"
    text = (ROOT / "configs" / f"{kind}.yaml").read_text()
    for dotted, _ in iter_keys(schema):
        key = dotted.rsplit(".", 1)[-1]
        # A comment right above the key says what it is.
        assert re.search(rf"#[^\n]*\n(\s*#[^\n]*\n)*\s*{key}:", text), f"{dotted} has no comment"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_reference_documents_every_key(kind: str) -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    _, schema = KINDS[kind]
    for dotted, key in iter_keys(schema):
        assert f"`{dotted}`" in reference, f"docs/configuration.md lacks {kind} key {dotted}"
        assert key.help, f"{dotted} has no help text"
