"""Command line: parse arguments, build a command object, run it.

No logic lives here: each subcommand maps its arguments onto a command
object (``dsamig.oneshot``, ``dsamig.demo``) and returns its exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dsamig import __version__
from dsamig.engine.dsa import DsaConfig, FaultSpec
from dsamig.errors import EXIT_USAGE, DsamigError
from dsamig.logs import LEVELS, configure
from dsamig.transport.common import Timeouts, parse_address
from dsamig.transport.pacing import TokenBucket
from dsamig.transport.security import SecurityConfig
from dsamig.transport.sender import (
    DEFAULT_CHANNELS,
    DEFAULT_PACKET_SIZE,
    DEFAULT_PAGE_SIZE,
    RETRY_FOR_S,
    SendOptions,
)
from dsamig.units import parse_rate, parse_size

ENGINE_CHOICES = ("auto", "cpu", "dsa", "none")


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except DsamigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except DsamigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``dsamig`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="dsamig",
        description="Move guest-memory snapshots between hosts, skipping zero pages.",
    )
    parser.add_argument("--version", action="version", version=f"dsamig {__version__}")
    parser.add_argument("--log-level", choices=LEVELS, default="error",
                        help="log verbosity on stderr (default: error; errors are also "
                             "printed as one 'dsamig: error:' line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    send = sub.add_parser("send", help="send an image to a receiver")
    send.add_argument("image", help="the image file (or block device) to send")
    send.add_argument("--to", required=True, metavar="HOST:PORT", help="receiver address")
    send.add_argument("--channels", type=int, default=DEFAULT_CHANNELS,
                      help=f"parallel TCP channels (default {DEFAULT_CHANNELS})")
    send.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
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
    send.add_argument("--packet-size", type=_size, default=DEFAULT_PACKET_SIZE, metavar="SIZE",
                      help="bytes per packet, e.g. 512KiB (default)")
    send.add_argument("--page-size", type=_size, default=DEFAULT_PAGE_SIZE, metavar="SIZE",
                      help="page size, e.g. 4KiB (default)")
    send.add_argument("--name", default="", help="job name shown by the receiver")
    send.add_argument("--connect-timeout", type=float, default=Timeouts.connect_s, metavar="S")
    send.add_argument("--idle-timeout", type=float, default=Timeouts.idle_s, metavar="S",
                      help="fail when the receiver makes no progress for S seconds")
    send.add_argument("--resume", action="store_true",
                      help="continue an interrupted transfer from what the receiver holds")
    send.add_argument("--retry-for", type=float, default=RETRY_FOR_S, metavar="S",
                      help=f"reconnect a broken transfer for S seconds (default {RETRY_FOR_S:g})")
    send.add_argument("--max-bandwidth", type=_rate, default=None, metavar="RATE",
                      help="limit the page data rate, e.g. 800Mbit or 100MiB")
    send.add_argument("--json", action="store_true", help="print the job's stats as JSON")
    _add_security_args(send, "sender")

    receive = sub.add_parser("receive", help="receive images into a file")
    receive.add_argument("--listen", required=True, metavar="HOST:PORT",
                         help="address to listen on (port 0: any free port)")
    receive.add_argument("--output", required=True, metavar="PATH",
                         help="destination file (written as PATH.partial until committed)")
    receive.add_argument("--once", action="store_true", help="exit after the first job")
    receive.add_argument("--idle-timeout", type=float, default=Timeouts.idle_s, metavar="S",
                         help="fail a job whose sender is silent for S seconds")
    receive.add_argument("--json", action="store_true", help="print each job's stats as JSON")
    _add_security_args(receive, "receiver")

    verify = sub.add_parser("verify", help="compare an image with a received copy")
    verify.add_argument("image", help="the source image")
    verify.add_argument("dest", help="the received copy")
    verify.add_argument("--page-size", type=_size, default=DEFAULT_PAGE_SIZE, metavar="SIZE",
                        help="page size of the job digest (default 4KiB)")
    verify.add_argument("--packet-size", type=_size, default=DEFAULT_PACKET_SIZE,
                        metavar="SIZE", help="packet size of the job digest (default 512KiB)")

    dsa = sub.add_parser("dsa", help="Intel DSA work queues")
    dsa_sub = dsa.add_subparsers(dest="dsa_command", required=True, metavar="COMMAND")
    dsa_list = dsa_sub.add_parser("list", help="show the work queues and whether they are usable")
    dsa_list.add_argument("--json", action="store_true", help="print as JSON")
    dsa_check = dsa_sub.add_parser(
        "check", help="submit NOOP, COMPVAL and BATCH to each usable work queue, verify the "
                      "results against the CPU, and measure latency and throughput")
    dsa_check.add_argument("--json", action="store_true", help="print as JSON")
    dsa_check.add_argument("--wq", action="append", default=[], metavar="PATH",
                           help="check this work queue only (repeatable)")
    dsa_check.add_argument("--emulate", type=int, default=0, metavar="N",
                           help="check N software work queues instead")
    dsa_check.add_argument("--timeout", type=float, default=1.0, metavar="S",
                           help="how long a descriptor may take (default 1)")
    dsa_check.add_argument("--size", type=_size, default=64 << 20, metavar="SIZE",
                           help="bytes for the throughput run (default 64MiB)")

    demo = sub.add_parser("demo", help="generate a snapshot and move it over loopback")
    demo.add_argument("--size", type=_size, default=256 * 1024 * 1024, metavar="SIZE",
                      help="image size (default 256MiB)")
    demo.add_argument("--channels", type=int, default=DEFAULT_CHANNELS)
    demo.add_argument("--engine", choices=ENGINE_CHOICES, default="auto")
    demo.add_argument("--workdir", default=None, help="where to put the image (default /dev/shm)")
    demo.add_argument("--json", action="store_true", help="print stats as JSON")
    _add_service_commands(sub)
    return parser


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
    config = SecurityConfig(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca,
        tls_server_name=getattr(args, "tls_server_name", None), psk_file=args.psk_file,
    )
    wanted = config.tls or config.psk_file or config.tls_key or config.tls_server_name
    return config if wanted else None


def _add_service_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The daemons and the commands that talk to them over the control socket."""
    for role in ("receiver", "sender"):
        daemon = sub.add_parser(role, help=f"run the {role} daemon in the foreground")
        daemon.add_argument("--config", required=True, metavar="FILE",
                            help=f"{role} configuration (YAML; see configs/{role}.yaml)")
        daemon.add_argument("--check", action="store_true",
                            help="validate the configuration and exit")
        daemon.add_argument("--daemon-log-level", choices=LEVELS, default=None,
                            metavar="LEVEL", help="override the config's log_level")
    socket_help = "the daemon's control socket (default: $DSAMIG_SOCKET, else " \
                  "/run/dsamig/sender.sock)"
    start = sub.add_parser("start", help="submit a job file to the sender daemon")
    start.add_argument("job_file", metavar="JOB.yaml", help="the job (see configs/job.yaml)")
    start.add_argument("--socket", metavar="PATH", help=socket_help)
    start.add_argument("--wait", action="store_true",
                       help="wait for the job to end, with a progress bar; the exit code says "
                            "how it ended (0 completed, 1 failed, 5 cancelled); Ctrl-C "
                            "cancels the job")
    start.add_argument("--json", action="store_true",
                       help="with --wait: print the finished job's stats as JSON")
    status = sub.add_parser("status", help="show a daemon's jobs, or one job in full")
    status.add_argument("job", nargs="?", metavar="JOB", help="job id or name")
    status.add_argument("--socket", metavar="PATH", help=socket_help)
    status.add_argument("--json", action="store_true", help="print JSON (the --json stats)")
    stop = sub.add_parser("stop", help="cancel a queued or running job")
    stop.add_argument("job", metavar="JOB", help="job id or name")
    stop.add_argument("--socket", metavar="PATH", help=socket_help)
    jobs = sub.add_parser("jobs", help="list a daemon's jobs")
    jobs.add_argument("--socket", metavar="PATH", help=socket_help)
    jobs.add_argument("--json", action="store_true", help="print JSON")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsamig`` console script."""
    args = build_parser().parse_args(argv)
    configure(args.log_level)
    try:
        return _dispatch(args)
    except DsamigError as exc:
        print(f"dsamig: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dsamig: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from dsamig.demo import DemoCommand
    from dsamig.oneshot import ReceiveCommand, SendCommand

    if args.command == "send":
        host, port = parse_address(args.to)
        options = SendOptions(
            host=host, port=port, channels=args.channels, packet_size=args.packet_size,
            page_size=args.page_size, engine=args.engine, engine_threads=args.engine_threads,
            dsa=DsaConfig(
                wqs=args.dsa_wq, emulate=args.dsa_emulate, timeout_s=args.dsa_timeout,
                emulate_faults=(FaultSpec.parse(args.dsa_emulate_faults)
                                if args.dsa_emulate_faults else None),
            ),
            name=args.name, resume=args.resume, retry_for_s=args.retry_for,
            timeouts=Timeouts(connect_s=args.connect_timeout, idle_s=args.idle_timeout),
            pacer=TokenBucket(args.max_bandwidth) if args.max_bandwidth else None,
            security=_security(args),
        )
        options.validate()
        return SendCommand(args.image, options, as_json=args.json).run()
    if args.command == "receive":
        return ReceiveCommand(
            args.listen, args.output, once=args.once, as_json=args.json,
            timeouts=Timeouts(idle_s=args.idle_timeout), security=_security(args),
        ).run()
    if args.command == "verify":
        from dsamig.verify import VerifyCommand

        return VerifyCommand(args.image, args.dest, page_size=args.page_size,
                             packet_size=args.packet_size).run()
    if args.command == "dsa":
        if args.dsa_command == "check":
            from dsamig.engine.dsa_check import check_command
            from dsamig.errors import ConfigError

            if not 0 <= args.emulate <= 16 or not 0 < args.timeout <= 60:
                raise ConfigError("dsa check: --emulate must be 0..16 and --timeout 0..60 s")
            return check_command(as_json=args.json, paths=args.wq, emulate=args.emulate,
                                 timeout_s=args.timeout, throughput_bytes=args.size)
        from dsamig.engine.dsa_discovery import list_command

        return list_command(as_json=args.json)
    if args.command == "demo":
        return DemoCommand(size=args.size, channels=args.channels, engine=args.engine,
                           as_json=args.json, workdir=args.workdir).run()
    if args.command in ("receiver", "sender", "start", "status", "stop", "jobs"):
        return _dispatch_service(args)
    return EXIT_USAGE


def _dispatch_service(args: argparse.Namespace) -> int:
    from dsamig.control.commands import (
        JobsCommand,
        StartCommand,
        StatusCommand,
        StopCommand,
        default_socket,
    )
    from dsamig.daemon import DaemonCommand

    if args.command in ("receiver", "sender"):
        return DaemonCommand(args.command, args.config, log_level=args.daemon_log_level,
                             check_only=args.check).run()
    socket = args.socket or default_socket()
    if args.command == "start":
        return StartCommand(args.job_file, socket, wait=args.wait, as_json=args.json).run()
    if args.command == "status":
        return StatusCommand(socket, job=args.job, as_json=args.json).run()
    if args.command == "stop":
        return StopCommand(socket, args.job).run()
    return JobsCommand(socket, as_json=args.json).run()


if __name__ == "__main__":
    sys.exit(main())
