"""The command line's help: every option explained, examples last, exit codes listed."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsamig import settings
from dsamig.cli import build_parser
from dsamig.settings import EXIT_CODES

README = Path(__file__).resolve().parents[2] / "README.md"


def commands(parser: argparse.ArgumentParser, path: str = "dsamig"
             ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser`` (itself included), with its command line."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


ALL = list(commands(build_parser()))


def test_every_command_is_listed() -> None:
    assert {path for path, _ in ALL} >= {
        "dsamig send", "dsamig receive", "dsamig verify", "dsamig dsa list", "dsamig demo",
        "dsamig make-image", "dsamig receiver", "dsamig sender", "dsamig start",
        "dsamig status", "dsamig stop", "dsamig jobs"}


@pytest.mark.parametrize(("path", "parser"), ALL, ids=[path for path, _ in ALL])
def test_every_option_has_help(path: str, parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, \
            f"{path} {'/'.join(action.option_strings) or action.dest} has no help"


@pytest.mark.parametrize(("path", "parser"), ALL[1:], ids=[path for path, _ in ALL[1:]])
def test_each_command_help_ends_with_examples(path: str, parser: argparse.ArgumentParser) -> None:
    text = parser.format_help().rstrip()
    tail = text[text.rindex("\nexamples:\n"):].splitlines()[2:]
    assert tail, f"{path}: no examples"
    command = path.split()[1]
    for line in tail:
        assert line.startswith(f"  dsamig {command}"), f"{path}: {line!r} is not an example"
    # The examples parse: what the help shows is what the command accepts.
    for line in tail:
        argv = line.split("|")[0].split("#")[0].split()[1:]
        build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [
    ["--log-level", "debug", "jobs"],
    ["jobs", "--log-level", "debug"],
    ["send", "img", "--to", "h:1", "--log-level", "debug"],
    ["dsa", "list", "--log-level", "debug"],
])
def test_log_level_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).log_level == "debug"


def test_log_level_defaults_to_unset() -> None:
    assert not hasattr(build_parser().parse_args(["jobs"]), "log_level")


def test_every_exit_code_is_documented() -> None:
    constants = {value for name, value in vars(settings).items()
                 if name.startswith("EXIT_") and isinstance(value, int)}
    assert constants >= {0, 1, 2, 3, 4, 5, 129, 130}
    listed = {code for code, _ in EXIT_CODES}
    assert listed == constants
    top = build_parser().format_help()
    readme = README.read_text()
    table = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", readme, re.MULTILINE))
    for code, text in EXIT_CODES:
        assert re.search(rf"^  {code}\s+{re.escape(text)}$", top, re.MULTILINE), code
        assert table.get(str(code)) == text, f"exit code {code}: README.md's table differs"


@pytest.mark.parametrize("command", ["send", "demo"])
def test_channels_take_a_count_or_auto(command: str, capsys) -> None:
    extra = ["img", "--to", "h:1"] if command == "send" else []
    parser = build_parser()
    auto = parser.parse_args([command, *extra, "--channels", "auto"])
    assert auto.channels == settings.auto_channels()
    assert parser.parse_args([command, *extra, "--channels", "8"]).channels == 8
    with pytest.raises(SystemExit):
        parser.parse_args([command, *extra, "--channels", "four"])
    assert "channels must be 1..64 or auto, not 'four'" in capsys.readouterr().err
