"""Defaults, limits, the geometry rules, engine names and exit codes: a leaf.

Nothing here imports another part of dsamig, so every layer, from the wire
format to the CLI, takes its defaults and rules from this one place: the
CLI's defaults are the YAML schema's defaults are the transport's.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB

# --- geometry: pages, packets, images ----------------------------------------------------

#: The largest image the wire format can describe (docs/protocol.md).
WIRE_MAX_IMAGE_SIZE: Final = 1 << 50
MIN_PAGE_SIZE: Final = 512
MAX_PAGE_SIZE: Final = 1 << 20
MAX_PACKET_PAGES: Final = 4096
#: A PACKET's payload_length is a u32, so a packet's pages must fit in one.
MAX_PACKET_BYTES: Final = 0xFFFFFFFF

DEFAULT_PAGE_SIZE: Final = 4096
#: The packet of a job that moves an image once (a snapshot): each event
#: loop's bookkeeping is per packet, and at 2 MiB it stays a small share of
#: the job's CPU (docs/performance.md, "Packet size").
SNAPSHOT_PACKET_SIZE: Final = 2 * MiB
#: The packet of a job in rounds (live, refresh): a round reads back, merges
#: and re-records every packet it touches, so a smaller packet costs less per
#: changed page. QEMU's multifd packet.
ROUNDS_PACKET_SIZE: Final = 128 * DEFAULT_PAGE_SIZE


#: The packet-size default as help texts give it.
DEFAULT_PACKET_SIZE_TEXT: Final = (f"{SNAPSHOT_PACKET_SIZE // MiB}MiB; "
                                   f"{ROUNDS_PACKET_SIZE // KiB}KiB for live and refresh jobs")


def default_packet_size(page_size: int, *, rounds: bool) -> int:
    """The packet size of a job that sets none: SNAPSHOT_PACKET_SIZE, or
    ROUNDS_PACKET_SIZE for a job in rounds; at least one page, so that it
    fits every valid page size."""
    return max(page_size, ROUNDS_PACKET_SIZE if rounds else SNAPSHOT_PACKET_SIZE)


@dataclass(frozen=True)
class GeometryProblem:
    """A geometry rule a job breaks: the key it is about and what is wrong.

    ``str()`` gives ``"page_size 3000 is not a power of two in 512..1048576"``;
    a YAML error names the key itself and shows only ``text``.
    """

    key: str  # page_size, packet_size, packet_pages or image_size
    text: str  # the value and the rule, without the key

    def __str__(self) -> str:
        return f"{self.key} {self.text}"


def geometry_problem(
    page_size: int, *, packet_pages: int | None = None, packet_size: int | None = None,
    image_size: int = 0,
) -> GeometryProblem | None:
    """The first geometry rule broken, or None: the one check of page size,
    packet size and image size that the wire format, the sender's options,
    the job schema and ``dsamig verify`` all apply.

    The packet is given as the manifest has it (``packet_pages``) or as an
    operator writes it (``packet_size`` in bytes, which must then be a whole
    number of pages).  The rules: a page is a power of two of 512 bytes to
    1 MiB; a packet is 1..4096 pages whose bytes fit the u32 payload length;
    an image is at most 2**50 bytes.
    """
    ps = page_size
    if not (MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE and ps & (ps - 1) == 0):
        return GeometryProblem(
            "page_size", f"{ps} is not a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}")
    key, shown = "packet_pages", packet_pages
    if packet_size is not None:
        if packet_size % ps:
            return GeometryProblem(
                "packet_size", f"{packet_size} is not a whole number of {ps}-byte pages")
        key, shown, packet_pages = "packet_size", packet_size, packet_size // ps
    if packet_pages is None:
        raise TypeError("geometry_problem needs packet_pages or packet_size")
    if not 1 <= packet_pages <= MAX_PACKET_PAGES:
        if key == "packet_size":
            return GeometryProblem(key, f"{shown} is {packet_pages} pages of {ps} bytes, "
                                        f"not 1..{MAX_PACKET_PAGES}")
        return GeometryProblem(key, f"{shown} out of range (1..{MAX_PACKET_PAGES})")
    if not 0 <= image_size <= WIRE_MAX_IMAGE_SIZE:
        return GeometryProblem(
            "image_size", f"{image_size} out of range (0..{WIRE_MAX_IMAGE_SIZE})")
    if ps * packet_pages > MAX_PACKET_BYTES:
        how = f"{shown}" if key == "packet_size" else f"{shown} x page_size {ps}"
        return GeometryProblem(
            key, f"{how} exceeds {MAX_PACKET_BYTES} bytes (payload_length is 32 bits)")
    return None


# --- jobs -------------------------------------------------------------------------------

#: The receiver's data port.
DEFAULT_PORT: Final = 7780
DEFAULT_CHANNELS: Final = 4
#: TCP channels of one job (a HELLO's channel count is a byte, but 64 is plenty).
MAX_CHANNELS: Final = 64
#: ``--channels auto``'s bounds (see :func:`auto_channels`).
AUTO_CHANNELS_MIN: Final = 4
AUTO_CHANNELS_MAX: Final = 16


def auto_channels(cpus: int | None = None) -> int:
    """``--channels auto``: one channel per core this process may run on
    (``cpus``: that count, else the scheduler's), at least 4 and at most 16.

    Each channel has a thread on either side that moves its bytes, so a
    host with more cores can keep more channels busy.  Below 4 (the default)
    fewer channels measured no faster on a 2-core host, and one channel
    leaves a job at the mercy of one connection.  The figures behind the
    rule are in docs/performance.md ("Channels").
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    return max(AUTO_CHANNELS_MIN, min(AUTO_CHANNELS_MAX, cpus))


def parse_channels(text: str) -> int:
    """A channel count as a user writes it: a number, or ``auto`` (ValueError
    for anything else). Whether the number is in range is the job's to say
    (``SendOptions.validate``), in the same words for every way of asking."""
    if text.strip().lower() == "auto":
        return auto_channels()
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"channels must be 1..{MAX_CHANNELS} or auto, not {text!r}") from None
#: How long a started job keeps reconnecting a broken transfer.
RETRY_FOR_S: Final = 60.0
#: Zero-page detection backends; ``auto`` picks DSA when usable, else the CPU.
ENGINE_NAMES: Final = ("auto", "cpu", "dsa", "none")
DEFAULT_ENGINE: Final = "auto"
#: ``dsamig demo`` and ``make-image``: the share of zero pages of a generated
#: image (guest RAM is often mostly zero; 0.4 keeps the wire busy enough to show).
DEFAULT_ZERO_RATIO: Final = 0.4


@dataclass(frozen=True)
class Timeouts:
    """Every wait of a transfer has one of these bounds (seconds)."""

    connect_s: float = 10.0
    handshake_s: float = 10.0
    idle_s: float = 60.0  # no progress on a channel for this long fails the job
    commit_s: float = 600.0  # fsync of a large image on a slow disk


class JobState(enum.StrEnum):
    """Where a job is in its life: one enum for the transport's figures
    (``JobStats.status``) and the daemons' records; the value is what the
    JSON and the control API report."""

    QUEUED = "queued"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETING = "completing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Completed, failed or cancelled: no change is possible any more."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class ReceiverLimits:
    """What one receiver grants its peers: every bound on memory, CPU, disk
    writes and descriptors that a sender could otherwise choose.

    A HELLO that asks for more is refused with a message naming the limit.
    """

    #: Jobs received at once.
    max_jobs: int = 16
    #: TCP channels of all running jobs together.
    max_channels: int = 256
    #: Jobs one sending host may run at once; None: half of max_jobs.
    max_jobs_per_peer: int | None = None
    #: Bytes of one packet (page_size x packet_pages): each channel holds one
    #: packet buffer, so this bounds a job's memory at channels x this.
    max_packet_bytes: int = 16 * MiB
    #: Bytes of one image (the receiving file system's size is a bound too).
    max_image_size: int = WIRE_MAX_IMAGE_SIZE
    #: Packets of one image: the receiver keeps about 5 bytes per packet.
    max_packets: int = 1 << 24
    #: Sessions (reconnects) one job may open: each costs a RESUME_STATE
    #: answer in proportion to the image.
    max_sessions: int = 256
    #: Connections that have not yet had their HELLO accepted, in all and
    #: from one host. A sender's channels all count for a moment, so the
    #: per-host bound is twice the 64 channels a job may have.
    max_unauthenticated: int = 512
    max_unauthenticated_per_peer: int = 128
    #: Bytes per second of the image a running job must complete, measured
    #: over each idle timeout; a slower job is failed so that it cannot hold
    #: a slot forever. 0 turns the check off.
    min_job_rate: float = 64 * KiB

    @property
    def jobs_per_peer(self) -> int:
        """max_jobs_per_peer, or its default: half of max_jobs (at least 1)."""
        return self.max_jobs_per_peer or max(1, self.max_jobs // 2)

    def descriptors_needed(self) -> int:
        """File descriptors a receiver with these limits may hold at once:
        every channel and unauthenticated connection, two files per job, and
        a margin for the listener, the control socket and its clients."""
        return self.max_channels + self.max_unauthenticated + 2 * self.max_jobs + 128


# --- exit codes ---------------------------------------------------------------------------

EXIT_OK: Final = 0
EXIT_TRANSFER: Final = 1  # the job ran and failed (peer error, integrity, disconnect)
EXIT_USAGE: Final = 2  # bad arguments or configuration
EXIT_LOCAL_IO: Final = 3  # the image or the output cannot be read, created or written
EXIT_NETWORK: Final = 4  # cannot listen, cannot connect
EXIT_CANCELLED: Final = 5  # dsamig start --wait: the job was cancelled
# 128 + the signal's number, as a shell reports a command a signal ended:
EXIT_HANGUP: Final = 129  # SIGHUP: the terminal went away during a one-shot command
EXIT_INTERRUPTED: Final = 130  # SIGINT (Ctrl-C) or SIGTERM ended a one-shot command

#: Every exit code with what it means: ``dsamig --help`` and README.md show this table.
EXIT_CODES: Final = (
    (EXIT_OK, "success (start --wait: the job completed)"),
    (EXIT_TRANSFER, "the transfer failed (start --wait: the job failed)"),
    (EXIT_USAGE, "bad arguments or configuration; a control command the daemon refused"),
    (EXIT_LOCAL_IO, "the image or the destination could not be read or written"),
    (EXIT_NETWORK, "could not listen or connect (no daemon at the control socket)"),
    (EXIT_CANCELLED, "start --wait: the job was cancelled"),
    (EXIT_HANGUP, "the terminal hung up (SIGHUP): as 130; start --wait leaves the job running"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C or SIGTERM): send and receive cancel their jobs"),
)


def exit_code_for(state: str) -> int:
    """The exit code of a command that waited for a job that ended in ``state``."""
    if state == JobState.COMPLETED:
        return EXIT_OK
    if state == JobState.CANCELLED:
        return EXIT_CANCELLED
    return EXIT_TRANSFER
