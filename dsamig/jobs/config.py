"""The three YAML documents: receiver config, sender config, job.

Each has a schema (the single source of truth for its keys: the loaders, the
reference in ``docs/configuration.md`` and the examples in ``configs/`` are
checked against it by the tests) and a frozen dataclass built from the
validated values.  Validation happens once, at load; the daemons never see an
unchecked value.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from dsamig.dsa_config import DsaConfig, dsa_config_converter
from dsamig.jobs.schema import (
    Converter,
    Document,
    Key,
    Where,
    address,
    boolean,
    channel_count,
    choice,
    duration,
    integer,
    list_of,
    load_yaml_file,
    mapping,
    optional,
    path,
    rate,
    size,
    string,
)
from dsamig.logs import LEVELS
from dsamig.security import SecurityConfig
from dsamig.settings import (
    DEFAULT_CHANNELS,
    DEFAULT_ENGINE,
    DEFAULT_PACKET_SIZE_TEXT,
    DEFAULT_PAGE_SIZE,
    DEFAULT_PORT,
    ENGINE_NAMES,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    RETRY_FOR_S,
    WIRE_MAX_IMAGE_SIZE,
    ReceiverLimits,
    Timeouts,
    geometry_problem,
)

# --- job names -----------------------------------------------------------------

#: A job name is also the receiver's file name for the job: one path
#: component of safe characters, never hidden, and never one that could be
#: taken for another job's partial file (``<name>.partial``) or the files the
#: sink keeps beside it (``<name>.partial.*``).
JOB_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_JOB_NAME = re.compile(JOB_NAME_PATTERN)
JOB_NAME_RULE = (
    "1..128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit, "
    "without '..' and without '.partial'"
)


def job_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid job name, or None when it is."""
    if not isinstance(name, str) or not _JOB_NAME.fullmatch(name):
        return f"job name {name!r} is not allowed ({JOB_NAME_RULE})"
    if ".." in name:
        return f"job name {name!r} contains '..' ({JOB_NAME_RULE})"
    if ".partial" in name:
        return f"job name {name!r} contains '.partial' ({JOB_NAME_RULE})"
    return None


def job_name() -> Converter:
    """Schema converter for a job name."""

    def convert(value: Any, where: Where) -> str:
        problem = job_name_problem(value)
        if problem is not None:
            where.fail(problem)
        return str(value)

    return convert


# --- shared pieces -------------------------------------------------------------------

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
DEFAULT_RETENTION_S = 3600.0

_COMMON_KEYS = (
    Key("control_socket", optional(path()), default=None,
        help="Unix socket of the control API (default $RUNTIME_DIRECTORY/<role>.sock, "
             "else /run/dsamig/<role>.sock)"),
    Key("control_group", optional(string(max_length=64)), default=None,
        help="group that may use the control socket (mode 0660; default: the daemon's)"),
    Key("log_level", choice(LEVELS), default="info", help="log verbosity"),
    Key("metrics_listen", optional(address(allow_port_zero=True)), default=None,
        help="HOST:PORT of the Prometheus text endpoint (off when absent)"),
    Key("shutdown_timeout", duration(0, 86400), default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="on SIGTERM, how long running jobs may take to finish before they are cancelled"),
    Key("job_retention", duration(0, 30 * 86400), default=DEFAULT_RETENTION_S,
        help="how long a finished job's stats stay queryable"),
)


def default_control_socket(role: str) -> str:
    """``$RUNTIME_DIRECTORY/<role>.sock`` (systemd's RuntimeDirectory=), else /run/dsamig/."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime or "/run/dsamig", f"{role}.sock")


@dataclass(frozen=True)
class DaemonConfig:
    """What both daemons share."""

    role: str
    control_socket: str
    control_group: str | None = None
    log_level: str = "info"
    metrics_listen: tuple[str, int] | None = None
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    job_retention_s: float = DEFAULT_RETENTION_S
    path: str | None = None  # the file it came from (SIGHUP reads it again)

    @staticmethod
    def _common(values: dict[str, Any], role: str, source: str | None) -> dict[str, Any]:
        return {
            "role": role,
            "control_socket": values["control_socket"] or default_control_socket(role),
            "control_group": values["control_group"],
            "log_level": values["log_level"],
            "metrics_listen": values["metrics_listen"],
            "shutdown_timeout_s": values["shutdown_timeout"],
            "job_retention_s": values["job_retention"],
            "path": os.path.abspath(source) if source is not None else None,
        }


# --- receiver ------------------------------------------------------------------------

RECEIVER_LIMIT_KEYS = (
    Key("max_jobs", integer(1, 4096), default=16, help="jobs received at once; more are refused"),
    Key("max_channels", integer(1, 65536), default=256,
        help="TCP channels of all running jobs together; a job that would exceed it is refused"),
    Key("max_jobs_per_peer", optional(integer(1, 4096)), default=None,
        help="jobs one sending host may run at once (default: half of max_jobs)"),
    Key("max_packet_bytes", size(4096, 1 << 30), default=ReceiverLimits.max_packet_bytes,
        help="largest packet (page size x pages per packet) a job may use; each channel "
             "holds one packet buffer"),
    Key("max_image_size", size(1, WIRE_MAX_IMAGE_SIZE), default=ReceiverLimits.max_image_size,
        help="largest image a job may send (images larger than the file system of "
             "storage_dir are refused as well)"),
    Key("max_sessions", integer(1, 1 << 20), default=ReceiverLimits.max_sessions,
        help="how many times one job may reconnect"),
    Key("max_unauthenticated", integer(1, 65536), default=ReceiverLimits.max_unauthenticated,
        help="connections whose HELLO is not accepted yet, from all hosts together"),
    Key("max_unauthenticated_per_peer", integer(1, 65536),
        default=ReceiverLimits.max_unauthenticated_per_peer,
        help="connections whose HELLO is not accepted yet, from one host"),
    Key("min_job_rate", optional(rate()), default=ReceiverLimits.min_job_rate,
        help="bytes per second of its image a job must complete, over each idle timeout; "
             "a slower job is failed (null: no minimum)"),
)
RECEIVER_TIMEOUT_KEYS = (
    Key("idle", duration(0.1, 86400), default=Timeouts.idle_s,
        help="fail a job whose sender sent nothing for this long"),
    Key("commit", duration(0.1, 86400), default=Timeouts.commit_s,
        help="bound on making a finished image durable (fsync, rename)"),
)
#: The ``security:`` mapping of a job and of the sender config (its defaults
#: for jobs): mutual TLS and/or a pre-shared key on the data path
#: (docs/protocol.md "Authentication").
_TLS_CERT_KEYS = (
    Key("tls_cert", optional(path()), default=None,
        help="PEM certificate chain this side presents; turns TLS on"),
    Key("tls_key", optional(path()), default=None,
        help="PEM private key of tls_cert (when not in the same file)"),
    Key("tls_ca", optional(path()), default=None,
        help="PEM CA bundle the peer's certificate must chain to; on a receiver it "
             "makes client certificates mandatory"),
)
_PSK_KEY = Key("psk_file", optional(path()), default=None,
               help="file holding the pre-shared key: 32+ random bytes or 64+ hex digits, "
                    "mode 0600")
SECURITY_KEYS = (
    *_TLS_CERT_KEYS,
    Key("tls_server_name", optional(string(max_length=255)), default=None,
        help="the name the receiver's certificate must carry (default: destination.host, "
             "matched as a DNS name or an IP address)"),
    _PSK_KEY,
)
#: The receiver's ``security:`` mapping: what every sender must use.
RECEIVER_SECURITY_KEYS = (
    *_TLS_CERT_KEYS,
    _PSK_KEY,
    Key("allow_unauthenticated", boolean(), default=False,
        help="let the receiver listen on a non-loopback address without TLS client "
             "certificates or a pre-shared key"),
)
SECURITY_FIELDS = ("tls_cert", "tls_key", "tls_ca", "tls_server_name", "psk_file")


def security_from(values: dict[str, Any] | None) -> SecurityConfig | None:
    """A SecurityConfig from a validated ``security:`` mapping (None if it sets nothing)."""
    if not values:
        return None
    files = {name: values[name] for name in SECURITY_FIELDS if values.get(name) is not None}
    return SecurityConfig(**files) if files else None


def inherit_security(own: SecurityConfig | None,
                     defaults: SecurityConfig | None) -> SecurityConfig | None:
    """A job's security settings completed by the sender's defaults.

    Every key the job sets wins; the others come from ``defaults``.  A
    certificate and its key go together: a job that names its own
    ``tls_cert`` does not inherit the default ``tls_key``.  The result is a
    new object, so each job reads the files afresh (a rotated key is used by
    the next job).
    """
    if defaults is None and own is None:
        return None
    merged: dict[str, Any] = {}
    for name in SECURITY_FIELDS:
        mine = getattr(own, name) if own is not None else None
        inherited = getattr(defaults, name) if defaults is not None else None
        if name == "tls_key" and own is not None and own.tls_cert is not None:
            inherited = None
        merged[name] = mine if mine is not None else inherited
    return SecurityConfig(**merged)


RECEIVER_SCHEMA = mapping((
    Key("listen", address(allow_port_zero=True), required=True,
        help="HOST:PORT the data channels connect to (port 0: any free port)"),
    Key("storage_dir", path(), required=True,
        help="directory that receives every image, as <storage_dir>/<job name>"),
    *_COMMON_KEYS,
    Key("replace_existing", boolean(), default=False,
        help="whether a job may replace an existing image of the same name"),
    Key("limits", mapping(RECEIVER_LIMIT_KEYS), default=None, help="per-daemon limits"),
    Key("timeouts", mapping(RECEIVER_TIMEOUT_KEYS), default=None, help="per-job time bounds"),
    Key("security", mapping(RECEIVER_SECURITY_KEYS), default=None,
        help="TLS and/or pre-shared key every sender must use"),
))


@dataclass(frozen=True)
class ReceiverConfig(DaemonConfig):
    """The receiver daemon's configuration."""

    listen: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT)
    storage_dir: str = ""
    replace_existing: bool = False
    limits: ReceiverLimits = field(default_factory=ReceiverLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    security: SecurityConfig | None = None
    #: Listening beyond loopback without authenticating senders was asked for.
    allow_unauthenticated: bool = False

    @classmethod
    def from_document(cls, doc: Document) -> ReceiverConfig:
        """Validate ``doc``; ConfigError naming the place otherwise."""
        values = RECEIVER_SCHEMA(doc.data, doc.root)
        limits = values["limits"] or mapping(RECEIVER_LIMIT_KEYS)(None, doc.root)
        timeouts = values["timeouts"] or mapping(RECEIVER_TIMEOUT_KEYS)(None, doc.root)
        return cls(
            **DaemonConfig._common(values, "receiver", doc.source if doc.base_dir else None),
            listen=values["listen"],
            storage_dir=values["storage_dir"],
            replace_existing=values["replace_existing"],
            limits=ReceiverLimits(**{**limits, "min_job_rate": limits["min_job_rate"] or 0.0}),
            timeouts=Timeouts(idle_s=timeouts["idle"], commit_s=timeouts["commit"]),
            security=security_from(values["security"]),
            allow_unauthenticated=bool((values["security"] or {}).get("allow_unauthenticated")),
        )


def load_receiver_config(file: str) -> ReceiverConfig:
    """Read and validate a receiver config file."""
    return ReceiverConfig.from_document(load_yaml_file(file))


# --- sender --------------------------------------------------------------------------

SENDER_LIMIT_KEYS = (
    Key("max_jobs", integer(1, 1024), default=4,
        help="jobs sent at once; more wait in the queue"),
    Key("max_queued", integer(0, 100000), default=256,
        help="jobs waiting to start; job-start fails beyond it"),
    Key("max_channels", integer(1, 65536), default=64,
        help="TCP channels of all running jobs together; jobs wait until theirs fit"),
    Key("max_bandwidth", optional(rate()), default=None,
        help="bandwidth of all running jobs together, shared fairly (unlimited when absent)"),
)
_SOURCE_DIRS_HINT = ("list the directories jobs may send images from, e.g. "
                     "source_dirs: [/var/lib/vms]")
SENDER_SCHEMA = mapping((
    *_COMMON_KEYS,
    Key("source_dirs",
        list_of(path(), min_items=1,
                too_few=f"must list at least one directory: {_SOURCE_DIRS_HINT}"),
        required=True, missing=_SOURCE_DIRS_HINT,
        help="directories a job's source must lie in (no symbolic link below them is followed)"),
    Key("limits", mapping(SENDER_LIMIT_KEYS), default=None, help="per-daemon limits"),
    Key("security", mapping(SECURITY_KEYS), default=None,
        help="TLS and/or pre-shared key every job uses unless it sets its own"),
))


@dataclass(frozen=True)
class SenderLimits:
    """Per-daemon limits of the sender (reloaded on SIGHUP)."""

    max_jobs: int = 4
    max_queued: int = 256
    max_channels: int = 64
    max_bandwidth: float | None = None  # bytes per second, all jobs together


@dataclass(frozen=True)
class SenderConfig(DaemonConfig):
    """The sender daemon's configuration."""

    source_dirs: tuple[str, ...] = ()
    limits: SenderLimits = field(default_factory=SenderLimits)
    #: Defaults for every job's ``security:`` (see :func:`inherit_security`).
    security: SecurityConfig | None = None

    @classmethod
    def from_document(cls, doc: Document) -> SenderConfig:
        """Validate ``doc``; ConfigError naming the place otherwise."""
        values = SENDER_SCHEMA(doc.data, doc.root)
        limits = values["limits"] or mapping(SENDER_LIMIT_KEYS)(None, doc.root)
        return cls(
            **DaemonConfig._common(values, "sender", doc.source if doc.base_dir else None),
            source_dirs=tuple(values["source_dirs"]),
            limits=SenderLimits(**limits),
            security=security_from(values["security"]),
        )


def load_sender_config(file: str) -> SenderConfig:
    """Read and validate a sender config file."""
    return SenderConfig.from_document(load_yaml_file(file))


# --- job -------------------------------------------------------------------------------

#: The ``engine:`` mapping.  A backend with settings of its own adds one key
#: here holding a mapping of them (``dsa: {...}``) and one field to
#: :class:`EngineSpec`.
ENGINE_KEYS: tuple[Key, ...] = (
    Key("kind", choice(ENGINE_NAMES), default=DEFAULT_ENGINE,
        help="zero-page detection backend: auto picks the best available"),
    Key("threads", optional(integer(1, 256)), default=None,
        help="CPU scan threads (default: one per two cores, at most 4)"),
    Key("dsa", optional(dsa_config_converter), default=None,
        help="DSA work queues: wqs (paths) or emulate (software queues), faults, timeout"),
)
DESTINATION_KEYS = (
    Key("host", string(max_length=255), required=True, help="receiver host name or address"),
    Key("port", integer(1, 65535), default=DEFAULT_PORT, help="receiver data port"),
)
JOB_TIMEOUT_KEYS = (
    Key("connect", duration(0.1, 3600), default=Timeouts.connect_s,
        help="bound on opening each TCP channel"),
    Key("handshake", duration(0.1, 3600), default=Timeouts.handshake_s,
        help="bound on the receiver's answer to a channel's HELLO"),
    Key("idle", duration(0.1, 86400), default=Timeouts.idle_s,
        help="fail when the receiver stops reading for this long"),
    Key("commit", duration(0.1, 86400), default=Timeouts.commit_s,
        help="bound on the receiver making the image durable"),
)
LIVE_KEYS = (
    Key("max_downtime", duration(0.001, 3600), default=0.3,
        help="pause the writer once the final round is predicted to fit this"),
    Key("max_rounds", integer(1, 1000), default=30,
        help="the final round is this round at the latest (round 0: the whole image)"),
    Key("pause_cmd", optional(string(max_length=4096)), default=None,
        help="shell command that pauses the writer (with resume_cmd)"),
    Key("resume_cmd", optional(string(max_length=4096)), default=None,
        help="shell command that resumes the writer, also run after any failure"),
    Key("qmp", optional(path()), default=None,
        help="a QEMU's QMP socket: the writer is paused with stop, resumed with cont"),
    Key("resume_writer", boolean(), default=False,
        help="resume the writer after the commit too (a copy of a running guest)"),
)
JOB_SCHEMA = mapping((
    Key("name", job_name(), required=True,
        help="job name; also the image's file name in the receiver's storage_dir"),
    Key("source", path(), required=True,
        help="image to send (relative to the job file's directory)"),
    Key("destination", mapping(DESTINATION_KEYS), required=True, help="the receiver"),
    Key("channels", channel_count(), default=DEFAULT_CHANNELS,
        help="parallel TCP channels, or auto: one per core of the sending host, 4..16"),
    Key("packet_size", optional(size(MIN_PAGE_SIZE, 64 * 1024 * 1024)), default=None,
        help=f"bytes per packet, a whole number of pages (default {DEFAULT_PACKET_SIZE_TEXT})"),
    Key("page_size", size(MIN_PAGE_SIZE, MAX_PAGE_SIZE), default=DEFAULT_PAGE_SIZE,
        help="the image's page size, a power of two"),
    Key("engine", mapping(ENGINE_KEYS), default=None, help="zero-page detection"),
    Key("max_bandwidth", optional(rate()), default=None,
        help="bandwidth cap of this job (unlimited when absent)"),
    Key("timeouts", mapping(JOB_TIMEOUT_KEYS), default=None, help="time bounds of the job"),
    Key("resume", boolean(), default=False,
        help="continue from what the receiver already holds of this image"),
    Key("refresh", boolean(), default=False,
        help="the receiver holds an older copy of this image: send only what differs"),
    Key("retry_for", duration(0, 86400), default=RETRY_FOR_S,
        help="keep reconnecting a broken transfer this long (0: fail at once)"),
    Key("security", mapping(SECURITY_KEYS), default=None,
        help="TLS and/or pre-shared key of the data path"),
    Key("live", mapping(LIVE_KEYS), default=None,
        help="move the image while its writer runs, in rounds (see docs/integrations.md)"),
))


@dataclass(frozen=True)
class LiveSpec:
    """The ``live:`` mapping of a job: pre-copy rounds, and how the writer pauses."""

    max_downtime_s: float = 0.3
    max_rounds: int = 30
    pause_cmd: str | None = None
    resume_cmd: str | None = None
    qmp: str | None = None
    resume_writer: bool = False

    def to_document(self) -> dict[str, Any]:
        return {"max_downtime": self.max_downtime_s, "max_rounds": self.max_rounds,
                "pause_cmd": self.pause_cmd, "resume_cmd": self.resume_cmd, "qmp": self.qmp,
                "resume_writer": self.resume_writer}


@dataclass(frozen=True)
class EngineSpec:
    """The ``engine:`` mapping of a job."""

    kind: str = DEFAULT_ENGINE
    threads: int | None = None
    dsa: DsaConfig | None = None

    def to_document(self) -> dict[str, Any]:
        """The mapping as a job document writes it."""
        doc: dict[str, Any] = {"kind": self.kind, "threads": self.threads}
        if self.dsa is not None:
            doc["dsa"] = self.dsa.to_mapping()
        return doc


@dataclass(frozen=True)
class JobSpec:
    """A validated job: what to send, where, and how."""

    name: str
    source: str
    host: str
    port: int = DEFAULT_PORT
    channels: int = DEFAULT_CHANNELS
    packet_size: int | None = None  # None: the default for the job's kind
    page_size: int = DEFAULT_PAGE_SIZE
    engine: EngineSpec = field(default_factory=EngineSpec)
    max_bandwidth: float | None = None  # bytes per second
    timeouts: Timeouts = field(default_factory=Timeouts)
    resume: bool = False
    refresh: bool = False
    retry_for_s: float = RETRY_FOR_S
    security: SecurityConfig | None = None
    live: LiveSpec | None = None

    @classmethod
    def from_document(cls, doc: Document) -> JobSpec:
        """Validate ``doc``; ConfigError naming the place otherwise."""
        values = JOB_SCHEMA(doc.data, doc.root)
        engine = values["engine"] or mapping(ENGINE_KEYS)(None, doc.root)
        timeouts = values["timeouts"] or mapping(JOB_TIMEOUT_KEYS)(None, doc.root)
        spec = cls(
            name=values["name"],
            source=values["source"],
            host=values["destination"]["host"],
            port=values["destination"]["port"],
            channels=values["channels"],
            packet_size=values["packet_size"],
            page_size=values["page_size"],
            engine=EngineSpec(**engine),
            max_bandwidth=values["max_bandwidth"],
            timeouts=Timeouts(
                connect_s=timeouts["connect"], handshake_s=timeouts["handshake"],
                idle_s=timeouts["idle"], commit_s=timeouts["commit"],
            ),
            resume=values["resume"],
            refresh=values["refresh"],
            retry_for_s=values["retry_for"],
            security=security_from(values["security"]),
            live=None if values["live"] is None else LiveSpec(
                max_downtime_s=values["live"]["max_downtime"],
                max_rounds=values["live"]["max_rounds"],
                pause_cmd=values["live"]["pause_cmd"], resume_cmd=values["live"]["resume_cmd"],
                qmp=values["live"]["qmp"], resume_writer=values["live"]["resume_writer"]),
        )
        # The cross-key rules the transport enforces, reported here with the file.
        live = spec.live
        if live is not None:
            if (live.qmp is None) == (live.pause_cmd is None):
                doc.root.child("live").fail("pauses its writer with qmp, or with pause_cmd and "
                                            "resume_cmd: one of them")
            if live.pause_cmd is not None and not live.resume_cmd:
                doc.root.child("live").fail("pause_cmd needs resume_cmd: a guest must never "
                                            "stay paused after a failure")
        # Unset, the packet is a default that fits every valid page size: only
        # the page size is left to check.
        problem = (geometry_problem(spec.page_size, packet_pages=1) if spec.packet_size is None
                   else geometry_problem(spec.page_size, packet_size=spec.packet_size))
        if problem is not None:
            doc.root.child(problem.key).fail(problem.text)
        return spec

    def with_security_defaults(self, defaults: SecurityConfig | None) -> JobSpec:
        """This job with a sender's ``security:`` defaults filled in."""
        return dataclasses.replace(self, security=inherit_security(self.security, defaults))

    @classmethod
    def from_object(cls, data: Any, source: str = "job") -> JobSpec:
        """A job document that arrived as JSON (paths must be absolute)."""
        return cls.from_document(Document.from_object(data, source))

    def to_document(self) -> dict[str, Any]:
        """The job as a JSON-able document that :meth:`from_object` accepts."""
        doc: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "destination": {"host": self.host, "port": self.port},
            "channels": self.channels,
            "packet_size": self.packet_size,
            "page_size": self.page_size,
            "engine": self.engine.to_document(),
            "max_bandwidth": self.max_bandwidth,
            "timeouts": {
                "connect": self.timeouts.connect_s, "handshake": self.timeouts.handshake_s,
                "idle": self.timeouts.idle_s, "commit": self.timeouts.commit_s,
            },
            "resume": self.resume,
            "refresh": self.refresh,
            "retry_for": self.retry_for_s,
            "security": None if self.security is None else {
                "tls_cert": self.security.tls_cert, "tls_key": self.security.tls_key,
                "tls_ca": self.security.tls_ca, "tls_server_name": self.security.tls_server_name,
                "psk_file": self.security.psk_file,
            },
        }
        if self.live is not None:  # absent, not null: a null mapping means its defaults
            doc["live"] = self.live.to_document()
        return doc


def load_job(file: str) -> JobSpec:
    """Read and validate a job file; a relative ``source`` is relative to the file."""
    return JobSpec.from_document(load_yaml_file(file))
