"""Command line: parse arguments, build a command object, run it.

No logic lives here: each subcommand maps its arguments onto a command
object (``dsamig.oneshot``, ``dsamig.demo``) and returns its exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dsamig import __version__
from dsamig.errors import ConfigError, DsamigError
from dsamig.logs import LEVELS, configure, get_logger
from dsamig.settings import (
    DEFAULT_CHANNELS,
    DEFAULT_ENGINE,
    DEFAULT_PACKET_SIZE_TEXT,
    DEFAULT_PAGE_SIZE,
    DEFAULT_ZERO_RATIO,
    ENGINE_NAMES,
    EXIT_CODES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TRANSFER,
    EXIT_USAGE,
    RETRY_FOR_S,
    SNAPSHOT_PACKET_SIZE,
    Timeouts,
    parse_channels,
)
from dsamig.units import parse_duration, parse_rate, parse_size

if TYPE_CHECKING:
    from dsamig.security import SecurityConfig


def _rate(text: str) -> float:
    try:
        rate = parse_rate(text)
    except DsamigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"bandwidth {text!r} must be more than 0")
    return rate


def _channels(text: str) -> int:
    try:
        return parse_channels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except DsamigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except DsamigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


EPILOG = "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES) + """

examples:
  dsamig demo                                   # try it: a snapshot over loopback
  dsamig send guest.ram --to dest:7780          # one-shot transfer
  dsamig start job.yaml --wait                  # a job on the sender daemon"""


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``dsamig`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="dsamig",
        description="Move guest-memory snapshots between hosts, skipping zero pages.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dsamig {__version__}",
                        help="print the version and exit")
    _add_log_level(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = _command(sub, "send", "send an image to a receiver", _examples(
        "dsamig send /var/lib/vms/guest.ram --to dest-host:7780",
        "dsamig send guest.ram --to 10.0.0.2:7780 --channels 8 --max-bandwidth 5Gbit/s --json",
    ))
    send.add_argument("image", help="the image file (or block device) to send")
    send.add_argument("--to", required=True, metavar="HOST:PORT", help="receiver address")
    send.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                      help=f"parallel TCP channels, or auto: one per core, 4..16 "
                           f"(default {DEFAULT_CHANNELS})")
    send.add_argument("--engine", choices=ENGINE_NAMES, default=DEFAULT_ENGINE,
                      help="zero-page detection: auto, cpu, dsa, or none (send every page)")
    send.add_argument("--engine-threads", type=int, default=None, metavar="N",
                      help="CPU engine scan threads (default: one per two cores, at most 4)")
    send.add_argument("--dsa-wq", action="append", default=[], metavar="PATH",
                      help="DSA work queue to use, e.g. /dev/dsa/wq0.0 (repeatable; "
                           "default: every usable one)")
    send.add_argument("--dsa-emulate", type=int, default=0, metavar="N",
                      help="use N software DSA work queues instead of hardware")
    send.add_argument("--dsa-emulate-faults", default=None, metavar="SPEC",
                      help="faults of the software work queues, e.g. "
                           "page-fault=0.05,batch-fail=0.01,hw-error=0.01,hang=0.001,"
                           "wq-full=0.2,seed=7")
    send.add_argument("--dsa-timeout", type=float, default=1.0, metavar="S",
                      help="a DSA descriptor not done in S seconds goes to the CPU (default 1)")
    send.add_argument("--packet-size", type=_size, default=None, metavar="SIZE",
                      help=f"bytes per packet (default {DEFAULT_PACKET_SIZE_TEXT})")
    send.add_argument("--page-size", type=_size, default=DEFAULT_PAGE_SIZE, metavar="SIZE",
                      help="page size, e.g. 4KiB (default)")
    send.add_argument("--name", default="",
                      help="job name; a receiver daemon stores the image under it "
                           "(default: the image's file name)")
    send.add_argument("--connect-timeout", type=float, default=Timeouts.connect_s, metavar="S",
                      help=f"bound on opening each TCP channel (default {Timeouts.connect_s:g})")
    send.add_argument("--idle-timeout", type=float, default=Timeouts.idle_s, metavar="S",
                      help="fail when the receiver makes no progress for S seconds "
                           f"(default {Timeouts.idle_s:g})")
    send.add_argument("--resume", action="store_true",
                      help="continue an interrupted transfer from what the receiver holds")
    send.add_argument("--refresh", action="store_true",
                      help="the receiver holds an older copy of this image under its name: "
                           "send only the pages that differ (it is replaced at the commit)")
    send.add_argument("--retry-for", type=float, default=RETRY_FOR_S, metavar="S",
                      help=f"reconnect a broken transfer for S seconds (default {RETRY_FOR_S:g})")
    send.add_argument("--max-bandwidth", type=_rate, default=None, metavar="RATE",
                      help="cap the page data rate: bits (800Mbit, 10Gbit/s, 100Mbps) or "
                           "bytes (100MB/s, 1GiB) per second; progress is shown in its unit")
    send.add_argument("--json", action="store_true",
                      help="print the job's stats as one JSON object (no progress bar)")
    live = send.add_argument_group(
        "live", "move a running guest's memory in rounds (docs/integrations.md)")
    live.add_argument("--live", action="store_true",
                      help="send the image while its writer runs, then only what changed, "
                           "until a final round with the writer paused fits --max-downtime")
    live.add_argument("--max-downtime", type=_duration, default=0.3, metavar="DURATION",
                      help="pause the writer once the final round is predicted to take no "
                           "longer (default 300ms)")
    live.add_argument("--max-rounds", type=int, default=30, metavar="N",
                      help="the final round is round N at the latest; round 0 is the whole "
                           "image (default 30)")
    live.add_argument("--pause-cmd", metavar="CMD",
                      help="shell command that pauses the writer (needs --resume-cmd)")
    live.add_argument("--resume-cmd", metavar="CMD",
                      help="shell command that resumes the writer after a failure")
    live.add_argument("--qmp", metavar="SOCKET",
                      help="pause and resume a QEMU guest through its QMP socket")
    live.add_argument("--resume-writer", action="store_true",
                      help="resume the writer after the commit too (a consistent copy of a "
                           "guest that keeps running; default: it stays paused)")
    _add_security_args(send, "sender")

    receive = _command(sub, "receive", "receive images into a file", _examples(
        "dsamig receive --listen 0.0.0.0:7780 --output /var/lib/vms/guest.ram --once",
        "dsamig receive --listen 127.0.0.1:0 --output copy.img --once --json",
    ))
    receive.add_argument("--listen", required=True, metavar="HOST:PORT",
                         help="address to listen on (port 0: any free port)")
    receive.add_argument("--output", required=True, metavar="PATH",
                         help="destination file (written as PATH.partial until committed)")
    receive.add_argument("--once", action="store_true", help="exit after the first job")
    receive.add_argument("--force", action="store_true",
                         help="replace PATH if it exists (without it, an existing PATH is "
                              "refused at start and to every sender)")
    receive.add_argument("--idle-timeout", type=float, default=Timeouts.idle_s, metavar="S",
                         help="fail a job whose sender is silent for S seconds "
                              f"(default {Timeouts.idle_s:g})")
    receive.add_argument("--json", action="store_true",
                         help="print each job's stats as one JSON object")
    _add_security_args(receive, "receiver")

    verify = _command(sub, "verify", "compare an image with a received copy", _examples(
        "dsamig verify /var/lib/vms/guest.ram /mnt/copy/guest.ram",
        "dsamig verify guest.ram copy.ram --page-size 2MiB --packet-size 2MiB",
    ))
    verify.add_argument("image", help="the source image")
    verify.add_argument("dest", help="the received copy")
    verify.add_argument("--page-size", type=_size, default=DEFAULT_PAGE_SIZE, metavar="SIZE",
                        help="page size of the job digest (default 4KiB)")
    verify.add_argument("--packet-size", type=_size, default=SNAPSHOT_PACKET_SIZE,
                        metavar="SIZE",
                        help=f"packet size of the job digest: the job's (default "
                             f"{DEFAULT_PACKET_SIZE_TEXT})")

    dsa = _command(sub, "dsa", "Intel DSA work queues", _examples(
        "dsamig dsa list", "dsamig dsa list --json"))
    dsa_sub = dsa.add_subparsers(dest="dsa_command", required=True, metavar="COMMAND")
    dsa_list = _command(dsa_sub, "list", "show the work queues and whether they are usable",
                        _examples("dsamig dsa list", "dsamig dsa list --json | jq .usable"))
    dsa_list.add_argument("--json", action="store_true", help="print as JSON")
    dsa_check = _command(
        dsa_sub, "check", "submit NOOP, COMPVAL and BATCH to each usable work queue, verify "
        "the results against the CPU, and measure latency and throughput",
        _examples("dsamig dsa check", "dsamig dsa check --wq /dev/dsa/wq0.0 --json",
                  "dsamig dsa check --emulate 2"))
    dsa_check.add_argument("--json", action="store_true", help="print as JSON")
    dsa_check.add_argument("--wq", action="append", default=[], metavar="PATH",
                           help="check this work queue only (repeatable)")
    dsa_check.add_argument("--emulate", type=int, default=0, metavar="N",
                           help="check N software work queues instead")
    dsa_check.add_argument("--timeout", type=float, default=1.0, metavar="S",
                           help="how long a descriptor may take (default 1)")
    dsa_check.add_argument("--size", type=_size, default=64 << 20, metavar="SIZE",
                           help="bytes for the throughput run (default 64MiB)")

    demo = _command(sub, "demo", "generate a snapshot and move it over loopback", _examples(
        "dsamig demo",
        "dsamig demo --size 1GiB --channels 8 --workdir /var/tmp/dsamig-demo",
        "dsamig demo --json | jq '.receiver.mbps'",
    ))
    demo.add_argument("--size", type=_size, default=256 * 1024 * 1024, metavar="SIZE",
                      help="image size (default 256MiB)")
    demo.add_argument("--channels", type=_channels, default=DEFAULT_CHANNELS, metavar="N",
                      help=f"parallel TCP channels, or auto: one per core, 4..16 "
                           f"(default {DEFAULT_CHANNELS})")
    demo.add_argument("--engine", choices=ENGINE_NAMES, default=DEFAULT_ENGINE,
                      help="zero-page detection: auto, cpu, dsa, or none")
    demo.add_argument("--workdir", default=None, metavar="DIR",
                      help="keep the image and its copy in DIR (dsamig-demo.img, "
                           "dsamig-demo.received.img; replaced if there); default: a "
                           "temporary directory in /dev/shm, removed afterwards")
    demo.add_argument("--json", action="store_true",
                      help="print one JSON document: sender and receiver stats, the check")

    make = _command(sub, "make-image", "write a snapshot-like test image", _examples(
        "dsamig make-image guest.ram --size 1GiB",
        "dsamig make-image sparse.ram --size 4GiB --zero-ratio 0.9 --seed 7",
    ))
    make.add_argument("path", metavar="PATH", help="the image file to write")
    make.add_argument("--size", type=_size, default=256 * 1024 * 1024, metavar="SIZE",
                      help="image size (default 256MiB)")
    make.add_argument("--zero-ratio", type=_ratio, default=DEFAULT_ZERO_RATIO, metavar="R",
                      help=f"about this fraction of the pages are zero, 0..1 "
                           f"(default {DEFAULT_ZERO_RATIO:g})")
    make.add_argument("--seed", type=int, default=1,
                      help="the same seed gives the same image (default 1)")
    make.add_argument("--force", action="store_true", help="replace PATH if it exists")
    make.add_argument("--json", action="store_true",
                      help="print the path and page counts as one JSON object")
    _add_service_commands(sub)
    return parser


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str,
             examples: str) -> argparse.ArgumentParser:
    """A subcommand whose help ends with ``examples``; it takes ``--log-level`` too."""
    command = sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".",
                             epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_log_level(command, after_command=True)
    return command


def _add_log_level(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    # SUPPRESS: a subcommand's --log-level only overrides the top level's when given.
    parser.add_argument(
        "--log-level", choices=LEVELS, default=argparse.SUPPRESS,
        help="log verbosity on stderr (default: error; errors are also printed as one "
             "'dsamig: error:' line)" + ("; for the daemons, as --daemon-log-level"
                                         if after_command else ""),
    )


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value


def _add_security_args(parser: argparse.ArgumentParser, role: str) -> None:
    """TLS and pre-shared-key options of the data path (docs/protocol.md "Authentication")."""
    peer = "receiver" if role == "sender" else "senders"
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="certificate chain this side presents (enables TLS)")
    parser.add_argument("--tls-key", metavar="PEM",
                        help="private key of --tls-cert (default: in the --tls-cert file)")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help=f"CA bundle the {peer} must be signed by (enables TLS)")
    if role == "sender":
        parser.add_argument("--tls-server-name", metavar="NAME",
                            help="DNS name the receiver's certificate must carry (default: the "
                                 "host of --to, a DNS name or an IP address; an IP address "
                                 "also needs --tls-ca)")
    parser.add_argument("--psk-file", metavar="FILE",
                        help="pre-shared key both sides must hold: 32+ random bytes or 64+ "
                             "hex digits (openssl rand -hex 32), mode 0600")


def _security(args: argparse.Namespace) -> SecurityConfig | None:
    """The SecurityConfig the options ask for, or None for the plain path."""
    from dsamig.security import SecurityConfig

    config = SecurityConfig(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        tls_server_name=getattr(args, "tls_server_name", None), psk_file=args.psk_file,
    )
    wanted = config.tls or config.psk_file or config.tls_key or config.tls_server_name
    return config if wanted else None


def _add_service_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The daemons and the commands that talk to them over the control socket."""
    for role in ("receiver", "sender"):
        daemon = _command(sub, role, f"run the {role} daemon in the foreground", _examples(
            f"dsamig {role} --config /etc/dsamig/{role}.yaml",
            f"dsamig {role} --config /etc/dsamig/{role}.yaml --check",
        ))
        daemon.add_argument("--config", required=True, metavar="FILE",
                            help=f"{role} configuration (YAML; see configs/{role}.yaml)")
        daemon.add_argument("--check", action="store_true",
                            help="validate the configuration and exit")
        daemon.add_argument("--daemon-log-level", choices=LEVELS, default=None,
                            metavar="LEVEL", help="override the config's log_level")
    socket_help = "the daemon's control socket (default: $DSAMIG_SOCKET, else " \
                  "/run/dsamig/sender.sock)"
    start = _command(sub, "start", "submit a job file to the sender daemon", _examples(
        "dsamig start /etc/dsamig/jobs/vm-1234.yaml --wait",
        "dsamig start vm-1234.yaml --json | jq -r .id",
    ))
    start.add_argument("job_file", metavar="JOB.yaml", help="the job (see configs/job.yaml)")
    start.add_argument("--socket", metavar="PATH", help=socket_help)
    start.add_argument("--wait", action="store_true",
                       help="wait for the job to end, with a progress bar; the exit code says "
                            "how it ended (0 completed, 1 failed, 5 cancelled); Ctrl-C "
                            "cancels the job")
    start.add_argument("--json", action="store_true",
                       help="print one JSON object: the submitted job, or with --wait the "
                            "finished job's stats")
    status = _command(sub, "status", "show a daemon's jobs, or one job in full", _examples(
        "dsamig status vm-1234 --watch",
        "dsamig status --json | jq '.daemon.queued, .jobs[].status'",
    ))
    status.add_argument("job", nargs="?", metavar="JOB", help="job id or name")
    status.add_argument("--socket", metavar="PATH", help=socket_help)
    status.add_argument("--json", action="store_true",
                        help="print one JSON object: the job's stats, or without JOB the "
                             "daemon's state and every job")
    status.add_argument("--watch", action="store_true",
                        help="show JOB again every second until it ends (with --json: one "
                             "object per line)")
    stop = _command(sub, "stop", "cancel a queued or running job", _examples(
        "dsamig stop vm-1234",
        "dsamig stop vm-1234 --keep-partial --socket /run/dsamig/receiver.sock",
    ))
    stop.add_argument("job", metavar="JOB", help="job id or name")
    stop.add_argument("--socket", metavar="PATH", help=socket_help)
    stop.add_argument("--keep-partial", action="store_true",
                      help="a receiver's job: keep the partial file and its checkpoint, so "
                           "that sending the job again with resume continues it")
    jobs = _command(sub, "jobs", "list a daemon's jobs", _examples(
        "dsamig jobs",
        "dsamig jobs --socket /run/dsamig/receiver.sock --json",
    ))
    jobs.add_argument("--socket", metavar="PATH", help=socket_help)
    jobs.add_argument("--json", action="store_true", help="print one JSON array")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsamig`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # `dsamig --help | head -1`
        _silence_stdout()
        return EXIT_OK
    configure(getattr(args, "log_level", "error"))
    try:
        return _dispatch(args)
    except DsamigError as exc:
        print(f"dsamig: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dsamig: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`dsamig jobs | head`): what it wanted, it has.
        _silence_stdout()
        return EXIT_OK
    except Exception as exc:  # a bug: one log event and one line, never a bare traceback
        get_logger(component="cli").exception("internal error", command=args.command)
        print(f"dsamig: internal error: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        return EXIT_TRANSFER


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _dispatch(args: argparse.Namespace) -> int:
    # Each command imports only what it runs: `dsamig status` loads neither
    # the engine nor the transport.
    if args.command == "send":
        from dsamig.dsa_config import DsaConfig, FaultSpec
        from dsamig.oneshot import SendCommand
        from dsamig.transport.sender import LiveOptions

        dsa = DsaConfig(
            wqs=args.dsa_wq, emulate=args.dsa_emulate, timeout_s=args.dsa_timeout,
            emulate_faults=(FaultSpec.parse(args.dsa_emulate_faults)
                            if args.dsa_emulate_faults else None),
        )
        return SendCommand(
            args.image, args.to, channels=args.channels, packet_size=args.packet_size,
            page_size=args.page_size, engine=args.engine, engine_threads=args.engine_threads,
            dsa=dsa, name=args.name, resume=args.resume, refresh=args.refresh,
            retry_for_s=args.retry_for,
            timeouts=Timeouts(connect_s=args.connect_timeout, idle_s=args.idle_timeout),
            max_bandwidth=args.max_bandwidth, security=_security(args), as_json=args.json,
            live=LiveOptions(
                max_downtime_s=args.max_downtime, max_rounds=args.max_rounds,
                pause_cmd=args.pause_cmd, resume_cmd=args.resume_cmd, qmp=args.qmp,
                keep_paused=not args.resume_writer,
            ) if args.live else None,
        ).run()
    if args.command == "receive":
        from dsamig.oneshot import ReceiveCommand

        return ReceiveCommand(
            args.listen, args.output, once=args.once, force=args.force, as_json=args.json,
            timeouts=Timeouts(idle_s=args.idle_timeout), security=_security(args),
        ).run()
    if args.command == "verify":
        from dsamig.verify import VerifyCommand

        return VerifyCommand(args.image, args.dest, page_size=args.page_size,
                             packet_size=args.packet_size).run()
    if args.command == "dsa":
        if args.dsa_command == "check":
            from dsamig.engine.dsa_check import check_command

            if not 0 <= args.emulate <= 16 or not 0 < args.timeout <= 60:
                raise ConfigError("dsa check: --emulate must be 0..16 and --timeout 0..60 s")
            return check_command(as_json=args.json, paths=args.wq, emulate=args.emulate,
                                 timeout_s=args.timeout, throughput_bytes=args.size)
        from dsamig.engine.dsa_discovery import list_command

        return list_command(as_json=args.json)
    if args.command in ("demo", "make-image"):
        return _dispatch_demo(args)
    if args.command in ("receiver", "sender", "start", "status", "stop", "jobs"):
        return _dispatch_service(args)
    return EXIT_USAGE


def _dispatch_demo(args: argparse.Namespace) -> int:
    from dsamig.demo import DemoCommand, MakeImageCommand

    if args.command == "demo":
        return DemoCommand(size=args.size, channels=args.channels, engine=args.engine,
                           as_json=args.json, workdir=args.workdir).run()
    return MakeImageCommand(args.path, size=args.size, zero_ratio=args.zero_ratio,
                            seed=args.seed, force=args.force, as_json=args.json).run()


def _dispatch_service(args: argparse.Namespace) -> int:
    if args.command in ("receiver", "sender"):
        from dsamig.daemon import DaemonCommand

        # An explicit --log-level sets the daemon's level too (the config's otherwise).
        level = args.daemon_log_level or getattr(args, "log_level", None)
        return DaemonCommand(args.command, args.config, log_level=level,
                             check_only=args.check).run()
    from dsamig.control.commands import (
        JobsCommand,
        StartCommand,
        StatusCommand,
        StopCommand,
        default_socket,
    )

    socket = args.socket or default_socket()
    if args.command == "start":
        return StartCommand(args.job_file, socket, wait=args.wait, as_json=args.json).run()
    if args.command == "status":
        return StatusCommand(socket, job=args.job, as_json=args.json, watch=args.watch).run()
    if args.command == "stop":
        return StopCommand(socket, args.job, keep_partial=args.keep_partial).run()
    return JobsCommand(socket, as_json=args.json).run()


if __name__ == "__main__":
    sys.exit(main())
