"""YAML loading and validation: the receiver config, the sender config, jobs."""

from __future__ import annotations

import os

import pytest

from dsamig.daemon.sender import live_options, send_options
from dsamig.errors import ConfigError
from dsamig.jobs import JobSpec, load_job, load_receiver_config, load_sender_config
from dsamig.jobs.config import ReceiverConfig, SenderConfig, default_control_socket
from dsamig.jobs.schema import MAX_DOCUMENT_BYTES, load_yaml_text
from dsamig.settings import auto_channels

JOB = "name: vm1\nsource: /img\ndestination: {host: dest}\n"
SENDER = "source_dirs: [/srv/vms]\n"
RECEIVER = "listen: 0.0.0.0:7780\nstorage_dir: /srv/images\ncontrol_socket: /run/r.sock\n"


def write(tmp_path, text: str | bytes, name: str = "file.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def test_minimal_job_gets_the_defaults(tmp_path) -> None:
    spec = load_job(write(tmp_path, JOB))
    assert (spec.name, spec.source, spec.host, spec.port) == ("vm1", "/img", "dest", 7780)
    assert (spec.channels, spec.packet_size, spec.page_size) == (4, None, 4096)
    assert (spec.engine.kind, spec.engine.threads, spec.max_bandwidth) == ("auto", None, None)
    assert spec.timeouts.idle_s == 60


def test_job_units_and_relative_source(tmp_path) -> None:
    path = write(tmp_path, "name: vm.1_a-b\nsource: images/ram.img\n"
                           "destination: {host: '::1', port: 9000}\n"
                           "channels: 8\npacket_size: 1MiB\npage_size: 2KiB\n"
                           "engine: {kind: cpu, threads: 2}\nmax_bandwidth: 800Mbit\n"
                           "timeouts: {connect: 500ms, handshake: 2, idle: 5m, commit: 1h}\n")
    spec = load_job(path)
    assert spec.source == str(tmp_path / "images" / "ram.img")
    assert (spec.packet_size, spec.page_size) == (1024 * 1024, 2048)
    assert spec.max_bandwidth == 100e6
    assert (spec.engine.kind, spec.engine.threads) == ("cpu", 2)
    t = spec.timeouts
    assert (t.connect_s, t.handshake_s, t.idle_s, t.commit_s) == (0.5, 2.0, 300.0, 3600.0)
    options = send_options(spec, __import__("uuid").uuid4())
    options.validate()
    assert (options.channels, options.engine, options.engine_threads) == (8, "cpu", 2)


def test_channels_auto_is_one_per_core_of_the_host(tmp_path) -> None:
    spec = load_job(write(tmp_path, JOB + "channels: auto\n"))
    assert spec.channels == auto_channels()
    assert spec.to_document()["channels"] == spec.channels  # resolved where it was read


def test_job_document_round_trip() -> None:
    spec = JobSpec.from_object({"name": "a", "source": "/x", "destination": {"host": "h"},
                                "max_bandwidth": "1GiB", "engine": {"kind": "none"}})
    assert JobSpec.from_object(spec.to_document()) == spec


def test_live_jobs(tmp_path) -> None:
    spec = load_job(write(tmp_path, JOB + "live:\n  max_downtime: 50ms\n  max_rounds: 5\n"
                                          "  pause_cmd: kill -STOP 42\n"
                                          "  resume_cmd: kill -CONT 42\n"))
    assert spec.live is not None
    live = send_options(spec, __import__("uuid").uuid4()).live
    assert (live.max_downtime_s, live.max_rounds, live.keep_paused) == (0.05, 5, True)
    assert (live.pause_cmd, live.resume_cmd, live.qmp) == ("kill -STOP 42", "kill -CONT 42",
                                                           None)
    assert JobSpec.from_object(spec.to_document()) == spec
    qmp = load_job(write(tmp_path, JOB + "live: {qmp: /run/vm.qmp, resume_writer: true}\n"))
    assert qmp.live is not None and live_options(qmp.live).keep_paused is False
    assert load_job(write(tmp_path, JOB)).live is None


def test_control_documents_need_absolute_paths() -> None:
    with pytest.raises(ConfigError, match=r"^job-start: source: must be an absolute path"):
        JobSpec.from_object({"name": "a", "source": "rel.img", "destination": {"host": "h"}},
                            "job-start")


def test_minimal_daemon_configs(tmp_path, monkeypatch) -> None:
    receiver = load_receiver_config(write(tmp_path, RECEIVER))
    assert receiver.listen == ("0.0.0.0", 7780) and receiver.storage_dir == "/srv/images"
    assert receiver.control_socket == "/run/r.sock" and receiver.metrics_listen is None
    assert (receiver.limits.max_jobs, receiver.replace_existing) == (16, False)
    assert receiver.path == str(tmp_path / "file.yaml")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/dsamig-test")
    sender = load_sender_config(write(tmp_path, "source_dirs: [/srv/vms]\n", "minimal.yaml"))
    assert sender.source_dirs == ("/srv/vms",) and sender.security is None
    assert sender.control_socket == "/run/dsamig-test/sender.sock"
    assert (sender.limits.max_jobs, sender.limits.max_bandwidth) == (4, None)
    assert sender.shutdown_timeout_s == 30 and sender.job_retention_s == 3600
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert default_control_socket("receiver") == "/run/dsamig/receiver.sock"


def test_daemon_config_values(tmp_path) -> None:
    sender = load_sender_config(write(tmp_path, (
        "control_socket: s.sock\nlog_level: debug\nmetrics_listen: '[::1]:9100'\n"
        "shutdown_timeout: 1.5\njob_retention: 2h\nsource_dirs: [/a, b]\n"
        "limits: {max_jobs: 2, max_queued: 0, max_channels: 8, max_bandwidth: 10Gbit}\n")))
    assert sender.control_socket == str(tmp_path / "s.sock")
    assert sender.metrics_listen == ("::1", 9100)
    assert (sender.shutdown_timeout_s, sender.job_retention_s) == (1.5, 7200)
    assert sender.source_dirs == ("/a", str(tmp_path / "b"))
    assert sender.limits.max_bandwidth == 1.25e9 and sender.limits.max_queued == 0


# (document kind, text, expected message): every message names the file, the
# line where there is one, the key path and what is allowed.
BAD = [
    ("job", JOB + "chanels: 3\n",
     "f.yaml:4: chanels: unknown key (allowed: name, source, destination, channels,"),
    ("job", JOB + "channels: three\n",
     "f.yaml:4: channels: must be an integer 1..64 or auto, not 'three'"),
    ("job", JOB + "channels: true\n",
     "f.yaml:4: channels: must be an integer 1..64 or auto, not True"),
    ("job", JOB + "channels: 65\n", "channels: must be an integer 1..64 or auto, not 65"),
    ("job", "name: vm1\nsource: /img\ndestination:\n  host: h\n  port: http\n",
     "f.yaml:5: destination.port: must be an integer 1..65535, not 'http'"),
    ("job", JOB + "packet_size: 512KB2\n",
     "f.yaml:4: packet_size: size '512KB2' is not a size (examples: 4096, 512KiB, 2GiB, 1GB)"),
    ("job", JOB + "packet_size: 512 furlongs\n", "f.yaml:4: packet_size: size '512 furlongs'"),
    ("job", JOB + "packet_size: 6000\n",
     "f.yaml:4: packet_size: 6000 is not a whole number of 4096-byte pages"),
    ("job", JOB + "page_size: 3000\n",
     "f.yaml:4: page_size: 3000 is not a power of two in 512..1048576"),
    ("job", JOB + "max_bandwidth: fast\n",
     "f.yaml:4: max_bandwidth: bandwidth 'fast' is not a rate (examples: 10Gbit,"),
    ("job", JOB + "max_bandwidth: 10Gbitz\n", "f.yaml:4: max_bandwidth: bandwidth '10Gbitz'"),
    ("job", JOB + "max_bandwidth: 0\n", "f.yaml:4: max_bandwidth: must be a positive bandwidth"),
    ("job", "name: vm1\nsource: /img\n", "f.yaml:1: missing required key 'destination'"),
    ("job", "source: /img\ndestination: {host: h}\n", "missing required key 'name'"),
    ("job", "name: vm1\nsource: /img\ndestination:\n  port: 1\n",
     "f.yaml:3: destination: missing required key 'host'"),
    ("job", "name: ../../etc/passwd\nsource: /i\ndestination: {host: h}\n",
     "f.yaml:1: name: job name '../../etc/passwd' is not allowed (1..128 characters"),
    ("job", "name: a/b\nsource: /i\ndestination: {host: h}\n", "name: job name 'a/b' is not"),
    ("job", "name: a..b\nsource: /i\ndestination: {host: h}\n", "job name 'a..b' contains '..'"),
    ("job", "name: .hidden\nsource: /i\ndestination: {host: h}\n", "job name '.hidden' is not"),
    ("job", "name: x.partial\nsource: /i\ndestination: {host: h}\n",
     "job name 'x.partial' contains '.partial'"),
    ("job", "name: x.partial.progress\nsource: /i\ndestination: {host: h}\n",
     "job name 'x.partial.progress' contains '.partial'"),
    ("job", f"name: {'a' * 129}\nsource: /i\ndestination: {{host: h}}\n", "is not allowed"),
    ("job", "name: 12\nsource: /i\ndestination: {host: h}\n", "job name 12 is not allowed"),
    ("job", JOB + "engine: cpu\n", "f.yaml:4: engine: must be a mapping with keys kind, threads"),
    ("job", JOB + "engine: {kind: gpu}\n",  # the list is the engine layer's: not fixed here
     "f.yaml:4: engine.kind: must be one of auto, cpu, "),
    ("job", JOB + "engine:\n  kind: cpu\n  threds: 2\n",
     "f.yaml:6: engine.threds: unknown key (allowed: kind, threads"),
    ("job", JOB + "timeouts: {idle: 3 days}\n",
     "f.yaml:4: timeouts.idle: must be a duration such as 30, 500ms, 30s, 5m or 1h"),
    ("job", JOB + "name: again\n", "f.yaml:4: name: duplicate key"),
    ("job", "name: vm1\nsource: [/img\n", "f.yaml:3: not valid YAML: expected ',' or ']'"),
    ("job", "- a\n- b\n", "f.yaml:1: must be a mapping with keys name, source"),
    ("job", "name: vm1\n? [a, b]\n: c\n", "f.yaml:2: key ['a', 'b'] is not a string"),
    ("job", "name: !!python/object:os.system x\n", "not valid YAML: could not determine a "
                                                   "constructor"),
    ("receiver", "listen: 0.0.0.0\nstorage_dir: /x\n",
     "f.yaml:1: listen: must be HOST:PORT, not '0.0.0.0'"),
    ("receiver", "listen: 0.0.0.0:99999\nstorage_dir: /x\n",
     "f.yaml:1: listen: port must be 0..65535, not 99999"),
    ("receiver", "listen: 0.0.0.0:1\n", "f.yaml:1: missing required key 'storage_dir'"),
    ("receiver", "storage_dir: /x\n", "missing required key 'listen'"),
    ("receiver", RECEIVER + "limits:\n  max_jobs: 0\n",
     "f.yaml:5: limits.max_jobs: must be an integer 1..4096, not 0"),
    ("receiver", RECEIVER + "replace_existing: yes please\n",
     "f.yaml:4: replace_existing: must be true or false"),
    ("receiver", RECEIVER + "metrics_listen: 9100\n",
     "f.yaml:4: metrics_listen: must be HOST:PORT, not 9100"),
    ("receiver", RECEIVER + "storage_dir: /again\n", "f.yaml:4: storage_dir: duplicate key"),
    ("sender", SENDER + "limits:\n  max_bandwidth: 10Gbit\n  max_job: 3\n",
     "f.yaml:4: limits.max_job: unknown key (allowed: max_jobs, max_queued, max_channels, "
     "max_bandwidth)"),
    ("sender", "log_level: verbose\n",
     "f.yaml:1: log_level: must be one of debug, info, warning, error, not 'verbose'"),
    ("sender", "source_dirs: /x\n", "f.yaml:1: source_dirs: must be a list, not '/x'"),
    ("sender", "source_dirs: [/a, 5]\n", "f.yaml:1: source_dirs[1]: must be a path, not 5"),
    ("sender", "shutdown_timeout: -1\n", "shutdown_timeout: must be between 0 s and 86400 s"),
    ("sender", "storage_dir: /x\n", "f.yaml:1: storage_dir: unknown key"),
    # The sender sends only what lies below directories the operator named.
    ("sender", "log_level: info\n",
     "f.yaml:1: missing required key 'source_dirs': list the directories jobs may send "
     "images from, e.g. source_dirs: [/var/lib/vms]"),
    ("sender", "source_dirs: []\n",
     "f.yaml:1: source_dirs: must list at least one directory: list the directories"),
    ("sender", "source_dirs: [/a]\nsecurity: {psk: /k}\n",
     "f.yaml:2: security.psk: unknown key (allowed: tls_cert, tls_key, tls_ca, "
     "tls_server_name, psk_file)"),
    ("receiver", RECEIVER + "security: {tls_server_name: r.test}\n",
     "f.yaml:4: security.tls_server_name: unknown key (allowed: tls_cert, tls_key, tls_ca, "
     "psk_file, allow_unauthenticated)"),
    ("job", JOB + "live: {pause_cmd: kill -STOP 1}\n",
     "f.yaml:4: live: pause_cmd needs resume_cmd: a guest must never stay paused"),
    ("job", JOB + "live:\n", "f.yaml:4: live: pauses its writer with qmp, or with "
                                  "pause_cmd and resume_cmd: one of them"),
    ("job", JOB + "live: {qmp: /q, max_rounds: 0}\n",
     "f.yaml:4: live.max_rounds: must be an integer 1..1000, not 0"),
    ("job", JOB + "channels: many\n",
     "f.yaml:4: channels: must be an integer 1..64 or auto, not 'many'"),
    ("receiver", RECEIVER + "security: {allow_unauthenticated: yes please}\n",
     "f.yaml:4: security.allow_unauthenticated: must be true or false"),
]


@pytest.mark.parametrize(("kind", "text", "message"), BAD,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_documents_are_named_precisely(kind: str, text: str, message: str) -> None:
    load = {"job": JobSpec.from_document, "receiver": ReceiverConfig.from_document,
            "sender": SenderConfig.from_document}[kind]
    with pytest.raises(ConfigError) as info:
        load(load_yaml_text(text, "f.yaml", "/base"))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file"):
        load_job(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"bin\.yaml: not UTF-8 text \(byte 6\)"):
        load_job(write(tmp_path, b"name: \xff\n", "bin.yaml"))
    with pytest.raises(ConfigError, match=rf"larger than {MAX_DOCUMENT_BYTES} bytes"):
        load_job(write(tmp_path, "#" * (MAX_DOCUMENT_BYTES + 2), "big.yaml"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_receiver_config(str(tmp_path))  # a directory


def test_yaml_bombs_are_refused_cheaply(tmp_path) -> None:
    # Aliases are expanded into values, but the whole document is bounded,
    # and a non-mapping value where a mapping belongs is an error, not a hang.
    text = "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
    with pytest.raises(ConfigError, match="unknown key"):
        JobSpec.from_document(load_yaml_text(text, "f.yaml"))


def test_validation_reads_no_files_at_import() -> None:
    # Importing the jobs package must do no I/O: the schemas are data.
    import subprocess
    import sys

    code = ("import builtins, os; opened = []; real = builtins.open\n"
            "builtins.open = lambda *a, **k: (opened.append(a[0]), real(*a, **k))[1]\n"
            "import dsamig.jobs\nprint(opened)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_receiver_security_keys(tmp_path) -> None:
    plain = load_receiver_config(write(tmp_path, RECEIVER))
    assert (plain.security, plain.allow_unauthenticated) == (None, False)
    opted_out = load_receiver_config(write(tmp_path, RECEIVER + (
        "security: {allow_unauthenticated: true}\n")))
    assert (opted_out.security, opted_out.allow_unauthenticated) == (None, True)
    keyed = load_receiver_config(write(tmp_path, RECEIVER + "security: {psk_file: k}\n"))
    assert keyed.security is not None and keyed.security.psk_file == str(tmp_path / "k")
    assert keyed.security.authenticates and not keyed.allow_unauthenticated


def test_jobs_inherit_the_senders_security_defaults(tmp_path) -> None:
    sender = load_sender_config(write(tmp_path, (
        "source_dirs: [/vms]\n"
        "security: {tls_cert: s.pem, tls_key: s.key, tls_ca: ca.pem, psk_file: psk}\n")))
    defaults = sender.security
    assert defaults is not None
    assert (defaults.tls_cert, defaults.tls_ca) == (str(tmp_path / "s.pem"),
                                                    str(tmp_path / "ca.pem"))
    bare = JobSpec.from_object({"name": "a", "source": "/vms/a", "destination": {"host": "h"}})
    inherited = bare.with_security_defaults(defaults).security
    assert inherited is not None and inherited is not defaults  # read afresh per job
    assert inherited == defaults
    # A job's own keys win, one by one; its own certificate brings its own key.
    own = JobSpec.from_object({"name": "a", "source": "/vms/a", "destination": {"host": "h"},
                               "security": {"tls_cert": "/j/cert.pem",
                                            "tls_server_name": "r.test"}})
    merged = own.with_security_defaults(defaults).security
    assert merged is not None
    assert (merged.tls_cert, merged.tls_key) == ("/j/cert.pem", None)
    assert (merged.tls_ca, merged.psk_file) == (defaults.tls_ca, defaults.psk_file)
    assert merged.tls_server_name == "r.test"
    # Without defaults a job keeps exactly what it says.
    assert own.with_security_defaults(None) == own
    assert bare.with_security_defaults(None).security is None
