"""A small declarative schema for YAML (and JSON) documents, with located errors.

A document is loaded once into plain Python values plus a table of the line
each key path came from (read from PyYAML's node marks).  A schema is a tree
of converters: each takes a value and a :class:`Where` (the document and the
key path), returns the converted value or fails with a :class:`ConfigError`
whose message names the file, the line, the key path and what is allowed::

    job.yaml:7: destination.port: must be an integer 1..65535, not 'http'
    job.yaml:4: chanels: unknown key (allowed: name, source, destination, ...)

Nothing here does I/O at import; :func:`load_yaml_file` reads one file when
called.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import yaml

from dsamig.errors import ConfigError
from dsamig.settings import MAX_CHANNELS, auto_channels
from dsamig.units import parse_duration, parse_rate, parse_size

#: Configuration files are short; a bigger one is a mistake (or an attack on
#: the YAML parser), refused before parsing.
MAX_DOCUMENT_BYTES = 1024 * 1024

Path = tuple[str | int, ...]
Converter = Callable[[Any, "Where"], Any]


@dataclass
class Document:
    """Loaded data plus where each key path came from."""

    source: str  # a file name, or a label such as "job-start" for control requests
    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    #: Relative paths in the document are relative to this directory (the
    #: file's); None means the document has no directory and paths must be
    #: absolute.
    base_dir: str | None = None

    @classmethod
    def from_object(cls, data: Any, source: str) -> Document:
        """A document that did not come from a file (no lines, no directory)."""
        return cls(source, data)

    @property
    def root(self) -> Where:
        """The position of the whole document."""
        return Where(self, ())


@dataclass(frozen=True)
class Where:
    """A position in a document: used to convert a value and to blame it."""

    doc: Document
    path: Path

    def child(self, key: str | int) -> Where:
        """The position of ``key`` (or list index) below this one."""
        return Where(self.doc, (*self.path, key))

    @property
    def dotted(self) -> str:
        """The key path as error messages write it: ``limits.max_jobs``, ``dirs[1]``."""
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
        return out

    def line(self) -> int | None:
        """The line of this key, or of the nearest enclosing key that has one."""
        path = self.path
        while True:
            if path in self.doc.lines:
                return self.doc.lines[path]
            if not path:
                return None
            path = path[:-1]

    def describe(self, message: str) -> str:
        """``FILE:LINE: key.path: message``."""
        line = self.line()
        where = f"{self.doc.source}:{line}" if line is not None else self.doc.source
        return f"{where}: {self.dotted}: {message}" if self.path else f"{where}: {message}"

    def fail(self, message: str) -> NoReturn:
        """Raise ConfigError with :meth:`describe`'s text."""
        raise ConfigError(self.describe(message))


@dataclass(frozen=True)
class Key:
    """One key of a mapping: its converter, whether it is required, its default.

    ``default`` is given in converted form; ``help`` is the one-line meaning
    that the documentation expands on.
    """

    name: str
    convert: Converter
    required: bool = False
    default: Any = None
    help: str = ""
    #: For a required key: what to write, said when the key is missing.
    missing: str = ""


def show(value: Any) -> str:
    """A value as an error message quotes it: short, unambiguous."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- loading ---------------------------------------------------------------

def load_yaml_text(text: str, source: str, base_dir: str | None = None) -> Document:
    """Parse one YAML document into a :class:`Document` with line numbers.

    Only plain data is accepted (the safe loader: no Python objects); keys must
    be strings and may not repeat.  An empty document is an empty mapping.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_DOCUMENT_BYTES} bytes")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[Path, int] = {}
        data = {} if node is None else _construct(loader, node, (), lines, source)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "not valid YAML"
        raise ConfigError(f"{source}{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return Document(source, data, lines, base_dir)


def load_yaml_file(path: str) -> Document:
    """Read and parse the YAML file at ``path`` (errors name the file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return load_yaml_text(text, path, os.path.dirname(os.path.abspath(path)))


def _construct(
    loader: yaml.SafeLoader, node: yaml.Node, path: Path, lines: dict[Path, int], source: str
) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                where = Where(Document(source, None, {path: line}), path)
                where.fail(f"key {show(key)} is not a string")
            if key in out:
                where = Where(Document(source, None, {(*path, key): line}), (*path, key))
                where.fail("duplicate key")
            lines[(*path, key)] = line
            out[key] = _construct(loader, value_node, (*path, key), lines, source)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _construct(loader, item, (*path, i), lines, source) for i, item in enumerate(node.value)
        ]
    return loader.construct_object(node, deep=True)


# --- converters --------------------------------------------------------------

def mapping(keys: Sequence[Key]) -> Converter:
    """A mapping with exactly these keys: unknown keys and missing required ones fail."""
    by_name = {k.name: k for k in keys}
    allowed = ", ".join(by_name)

    def convert(value: Any, where: Where) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            where.fail(f"must be a mapping with keys {allowed}, not {show(value)}")
        for name in value:
            if name not in by_name:
                where.child(name).fail(f"unknown key (allowed: {allowed})")
        out: dict[str, Any] = {}
        for key in keys:
            if key.name in value:
                out[key.name] = key.convert(value[key.name], where.child(key.name))
            elif key.required:
                hint = f": {key.missing}" if key.missing else ""
                where.fail(f"missing required key {key.name!r}{hint}")
            else:
                out[key.name] = key.default
        return out

    convert.keys = tuple(keys)  # type: ignore[attr-defined]  # read by iter_keys()
    return convert


def optional(inner: Converter) -> Converter:
    """``null`` (or ``~``) means "not set": None; anything else goes to ``inner``."""

    def convert(value: Any, where: Where) -> Any:
        return None if value is None else inner(value, where)

    convert.inner = inner  # type: ignore[attr-defined]
    return convert


def list_of(item: Converter, max_items: int = 256, *, min_items: int = 0,
            too_few: str = "") -> Converter:
    """A list whose every item passes ``item``; ``too_few`` says what a list
    shorter than ``min_items`` lacks."""

    def convert(value: Any, where: Where) -> list[Any]:
        if not isinstance(value, list):
            where.fail(f"must be a list, not {show(value)}")
        if len(value) < min_items:
            where.fail(too_few or f"must have at least {min_items} items")
        if len(value) > max_items:
            where.fail(f"at most {max_items} items, not {len(value)}")
        return [item(v, where.child(i)) for i, v in enumerate(value)]

    convert.inner = item  # type: ignore[attr-defined]
    return convert


def integer(lo: int, hi: int) -> Converter:
    """An integer in ``lo..hi``."""

    def convert(value: Any, where: Where) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            where.fail(f"must be an integer {lo}..{hi}, not {show(value)}")
        return value

    return convert


def channel_count() -> Converter:
    """A job's channels: an integer 1..64, or ``auto`` (resolved here, by
    :func:`dsamig.settings.auto_channels`)."""

    def convert(value: Any, where: Where) -> int:
        if value == "auto":
            return auto_channels()
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 1 <= value <= MAX_CHANNELS:
            where.fail(f"must be an integer 1..{MAX_CHANNELS} or auto, not {show(value)}")
        return value

    return convert


def boolean() -> Converter:
    """``true`` or ``false`` (YAML's yes/no/on/off are not accepted as strings)."""

    def convert(value: Any, where: Where) -> bool:
        if not isinstance(value, bool):
            where.fail(f"must be true or false, not {show(value)}")
        return value

    return convert


def string(pattern: str | None = None, hint: str = "", max_length: int = 4096) -> Converter:
    """A non-empty string, optionally matching ``pattern`` (``hint`` says what that allows)."""
    compiled = re.compile(pattern) if pattern else None

    def convert(value: Any, where: Where) -> str:
        if not isinstance(value, str) or not value:
            where.fail(f"must be a non-empty string, not {show(value)}")
        if len(value) > max_length:
            where.fail(f"longer than {max_length} characters")
        if compiled is not None and not compiled.fullmatch(value):
            where.fail(f"{show(value)} is not allowed ({hint})")
        return value

    return convert


def choice(options: Callable[[], Sequence[str]] | Sequence[str]) -> Converter:
    """One of ``options`` (a sequence, or a function giving one at validation time)."""

    def convert(value: Any, where: Where) -> str:
        allowed = options() if callable(options) else options
        if value not in allowed:
            where.fail(f"must be one of {', '.join(allowed)}, not {show(value)}")
        return str(value)

    return convert


def size(lo: int = 0, hi: int = 2**62) -> Converter:
    """A byte count: an integer or a string with a unit (``512KiB``, ``2GiB``, ``1GB``)."""

    def convert(value: Any, where: Where) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            where.fail(f"must be a size such as 4096, 512KiB or 2GiB, not {show(value)}")
        try:
            nbytes = parse_size(value)
        except ConfigError as exc:
            where.fail(str(exc))
        if not lo <= nbytes <= hi:
            where.fail(f"must be between {lo} and {hi} bytes, not {show(value)}")
        return nbytes

    return convert


def rate() -> Converter:
    """Bytes per second: a number, or bits (``10Gbit/s``, ``800Mbps``) or bytes
    (``500MB/s``, ``1GiB``); the rules are in :func:`dsamig.units.parse_rate`."""

    def convert(value: Any, where: Where) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            where.fail(f"must be a bandwidth such as 10Gbit/s or 500MB/s, not {show(value)}")
        try:
            bytes_per_s = parse_rate(value)
        except ConfigError as exc:
            where.fail(str(exc))
        if not math.isfinite(bytes_per_s) or bytes_per_s <= 0:
            where.fail(f"must be a positive bandwidth, not {show(value)}")
        return bytes_per_s

    return convert


def duration(lo: float = 0.0, hi: float = 7 * 86400.0) -> Converter:
    """Seconds: a number, or a string with a unit (``500ms``, ``30s``, ``5m``, ``1h``)."""

    def convert(value: Any, where: Where) -> float:
        seconds: float | None = None
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            with contextlib.suppress(ConfigError):
                seconds = parse_duration(value)
        if seconds is None or not math.isfinite(seconds):
            where.fail(f"must be a duration such as 30, 500ms, 30s, 5m or 1h, not {show(value)}")
        if not lo <= seconds <= hi:
            where.fail(f"must be between {lo:g} s and {hi:g} s, not {show(value)}")
        return seconds

    return convert


def path() -> Converter:
    """A file-system path; a relative one is resolved against the file's directory.

    A document with no directory (a request on the control socket) must use
    absolute paths.
    """

    def convert(value: Any, where: Where) -> str:
        if not isinstance(value, str) or not value:
            where.fail(f"must be a path, not {show(value)}")
        if "\0" in value:
            where.fail("must not contain a NUL byte")
        if not os.path.isabs(value):
            base = where.doc.base_dir
            if base is None:
                where.fail(f"must be an absolute path, not {show(value)}")
            value = os.path.join(base, value)
        return os.path.normpath(value)

    return convert


def address(*, allow_port_zero: bool = False) -> Converter:
    """``HOST:PORT`` or ``[IPv6]:PORT`` into ``(host, port)``."""

    def convert(value: Any, where: Where) -> tuple[str, int]:
        if not isinstance(value, str):
            where.fail(f"must be HOST:PORT, not {show(value)}")
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            where.fail(f"must be HOST:PORT, not {show(value)}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = int(port_text)
        low = 0 if allow_port_zero else 1
        if not low <= port <= 65535:
            where.fail(f"port must be {low}..65535, not {port}")
        return host, port

    return convert


# --- introspection -------------------------------------------------------------

def iter_keys(convert: Converter, prefix: str = "") -> Iterator[tuple[str, Key]]:
    """Every key of a schema, depth first, as ``("destination.port", Key)``."""
    inner = getattr(convert, "inner", None)
    if inner is not None:
        yield from iter_keys(inner, prefix)
        return
    for key in getattr(convert, "keys", ()):
        dotted = f"{prefix}.{key.name}" if prefix else key.name
        yield dotted, key
        yield from iter_keys(key.convert, dotted)
