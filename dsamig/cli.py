"""Command line: parse arguments, build a command object, run it.

No logic lives here: each subcommand maps its arguments onto a command
object (``dsamig.oneshot``, ``dsamig.demo``) and returns its exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dsamig import __version__
from dsamig.errors import EXIT_USAGE, DsamigError
from dsamig.logs import LEVELS, configure
from dsamig.transport.common import Timeouts, parse_address
from dsamig.transport.sender import (
    DEFAULT_CHANNELS,
    DEFAULT_PACKET_SIZE,
    DEFAULT_PAGE_SIZE,
    SendOptions,
)
from dsamig.units import parse_size

ENGINE_CHOICES = ("auto", "cpu", "none")


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
                      help="zero-page detection: auto, cpu, or none (send every page)")
    send.add_argument("--engine-threads", type=int, default=None, metavar="N",
                      help="CPU engine scan threads (default: one per two cores, at most 4)")
    send.add_argument("--packet-size", type=_size, default=DEFAULT_PACKET_SIZE, metavar="SIZE",
                      help="bytes per packet, e.g. 512KiB (default)")
    send.add_argument("--page-size", type=_size, default=DEFAULT_PAGE_SIZE, metavar="SIZE",
                      help="page size, e.g. 4KiB (default)")
    send.add_argument("--name", default="", help="job name shown by the receiver")
    send.add_argument("--connect-timeout", type=float, default=Timeouts.connect_s, metavar="S")
    send.add_argument("--idle-timeout", type=float, default=Timeouts.idle_s, metavar="S",
                      help="fail when the receiver makes no progress for S seconds")
    send.add_argument("--json", action="store_true", help="print the job's stats as JSON")

    receive = sub.add_parser("receive", help="receive images into a file")
    receive.add_argument("--listen", required=True, metavar="HOST:PORT",
                         help="address to listen on (port 0: any free port)")
    receive.add_argument("--output", required=True, metavar="PATH",
                         help="destination file (written as PATH.partial until committed)")
    receive.add_argument("--once", action="store_true", help="exit after the first job")
    receive.add_argument("--idle-timeout", type=float, default=Timeouts.idle_s, metavar="S",
                         help="fail a job whose sender is silent for S seconds")
    receive.add_argument("--json", action="store_true", help="print each job's stats as JSON")

    demo = sub.add_parser("demo", help="generate a snapshot and move it over loopback")
    demo.add_argument("--size", type=_size, default=256 * 1024 * 1024, metavar="SIZE",
                      help="image size (default 256MiB)")
    demo.add_argument("--channels", type=int, default=DEFAULT_CHANNELS)
    demo.add_argument("--engine", choices=ENGINE_CHOICES, default="auto")
    demo.add_argument("--workdir", default=None, help="where to put the image (default /dev/shm)")
    demo.add_argument("--json", action="store_true", help="print stats as JSON")
    return parser


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
            name=args.name,
            timeouts=Timeouts(connect_s=args.connect_timeout, idle_s=args.idle_timeout),
        )
        options.validate()
        return SendCommand(args.image, options, as_json=args.json).run()
    if args.command == "receive":
        return ReceiveCommand(
            args.listen, args.output, once=args.once, as_json=args.json,
            timeouts=Timeouts(idle_s=args.idle_timeout),
        ).run()
    if args.command == "demo":
        return DemoCommand(size=args.size, channels=args.channels, engine=args.engine,
                           as_json=args.json, workdir=args.workdir).run()
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
