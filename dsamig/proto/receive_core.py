"""Every decision of a job on the receiving side, without I/O.

:class:`ReceiveJobCore` admits the job's channels, checks every data frame
against the manifest and what already arrived (the :class:`PacketTracker`),
keeps the counts, decides when to checkpoint and what each channel may have
acknowledged, what a resumed partial file must forget, when the job is too
slow or reconnects too often, and whether it may commit. The transport owns
the sockets, the file, the timers and the executor; it tells the core what
happened, with the time, and does what the core answers. The in-memory
protocol tests drive the same object.

Times are seconds on any monotonic clock the caller chooses (``now``), so
every rule that depends on time is tested without waiting.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from dsamig.proto.checkpoint import Progress
from dsamig.proto.counters import JobCounters
from dsamig.proto.errors import (
    ChannelRefusedError,
    LimitExceededError,
    LocalProtocolError,
    RemoteProtocolError,
)
from dsamig.proto.frames import (
    FEATURE_ACKS,
    FEATURE_LIVE,
    Ack,
    CommitRequest,
    Hello,
    Manifest,
    PacketHeader,
    ResumeState,
    Round,
    RoundDone,
    SumsRequest,
    ZeroRange,
)
from dsamig.proto.refresh import SumsBudget
from dsamig.proto.tracker import PacketTracker
from dsamig.settings import MiB, ReceiverLimits

#: The receiver checkpoints at least every this many payload bytes per
#: channel; see :func:`checkpoint_bytes` and :func:`window_bytes`.
CHECKPOINT_BYTES_PER_CHANNEL: Final = 8 * MiB
#: The sender may have at least this much unacknowledged per channel.
MIN_WINDOW_BYTES: Final = 64 * MiB
#: A checkpoint is taken this long after the last one while data arrives.
CHECKPOINT_INTERVAL_S: Final = 0.25
#: Checkpoints are spaced so that their records (about 4 bytes per packet)
#: are written at no more than this, whatever the sender sends.
CHECKPOINT_RECORD_BYTES_PER_S: Final = 32 * MiB
#: A checkpoint whose missing packets form more runs than this is not
#: restored: each run is a hole to punch, and a sender that stored every
#: other packet must not make a resume cost seconds and gigabytes. A crash
#: of a real transfer leaves about a window per channel missing.
MAX_RESTORE_RUNS: Final = 1 << 16


def checkpoint_bytes(manifest: Manifest, channels: int) -> int:
    """Payload bytes between two receiver checkpoints of a job.

    8 MiB per channel, but at least 64 times the checkpoint record itself (4
    bytes per packet), so that on a 1 TB image the records written stay a
    small fraction of the data.
    """
    record = manifest.packet_count * 4 + manifest.packet_count // 8
    return max(CHECKPOINT_BYTES_PER_CHANNEL * channels, 64 * record)


def window_bytes(manifest: Manifest, channels: int) -> int:
    """Unacknowledged payload bytes one sender channel may have in flight:
    what a receiver crash can cost us to send again."""
    return max(MIN_WINDOW_BYTES, 2 * checkpoint_bytes(manifest, channels) // channels)


def manifest_problem(manifest: Manifest, limits: ReceiverLimits) -> str | None:
    """Why a receiver with ``limits`` refuses this image's geometry, or None.

    Checked before anything is opened or allocated for the job.
    """
    packet_bytes = manifest.packet_pages * manifest.page_size
    if packet_bytes > limits.max_packet_bytes:
        return (f"packets of {packet_bytes} bytes ({manifest.packet_pages} pages of "
                f"{manifest.page_size}) exceed this receiver's max_packet_bytes "
                f"{limits.max_packet_bytes}")
    if manifest.image_size > limits.max_image_size:
        return (f"an image of {manifest.image_size} bytes exceeds this receiver's "
                f"max_image_size {limits.max_image_size}")
    if manifest.packet_count > limits.max_packets:
        return (f"an image of {manifest.packet_count} packets exceeds this receiver's limit "
                f"of {limits.max_packets} packets")
    return None


class Checkpoint(enum.Enum):
    """What the transport should do about durability now."""

    #: Nothing yet.
    NONE = "none"
    #: Nothing new to make durable: send :meth:`ReceiveJobCore.acks_due` at once.
    ACK = "ack"
    #: Take a checkpoint: :meth:`ReceiveJobCore.begin_checkpoint`.
    TAKE = "take"
    #: Take one, but not before ``ReceiveJobCore.checkpoint_delay_s`` passed.
    LATER = "later"


@dataclass
class _Ledger:
    """Data frames one connection of a channel index stored, and acknowledged."""

    generation: int
    frames_done: int = 0
    packets_done: int = 0
    frames_acked: int = 0


class ReceiveJobCore:
    """The receiving side of one job, opened by channel 0's HELLO."""

    def __init__(self, hello: Hello, limits: ReceiverLimits, now: float) -> None:
        if hello.manifest is None:
            raise LocalProtocolError("a job is opened by channel 0's HELLO, with the manifest")
        self.manifest: Manifest = hello.manifest
        self.job_id = hello.job_id
        self.name = hello.name
        self.channel_count = hello.channel_count
        self.acks = bool(hello.features & FEATURE_ACKS)
        #: Live rounds (docs/protocol.md "Live rounds"): only with acknowledgements.
        self.live = self.acks and bool(hello.features & FEATURE_LIVE)
        #: Refreshing a committed copy (feature REFRESH, granted by the
        #: transport with :meth:`begin_refresh`): its packet sums sent so far.
        self.refresh = False
        self.summed_packets = 0
        self._sums_budget = SumsBudget(self.manifest)
        #: The live round being received, and the channels that ended it.
        self.round = 0
        self._round_ended: set[int] = set()
        self.limits = limits
        self.counters = JobCounters(sessions=1)
        self.tracker = self._new_tracker()
        self._ledgers: dict[int, _Ledger] = {}
        self._generation = 0
        self._joined: set[int] = set()  # channel indexes that ever attached
        self.ended: set[int] = set()
        # Checkpoints: payload bytes stored since the last one, the packets
        # it covers (the job is dirty when the tracker moved past them), when
        # it started, whether one is being written and whether another is due.
        self._uncheckpointed_bytes = 0
        self._checkpoint_bytes = checkpoint_bytes(self.manifest, self.channel_count)
        record_bytes = self.manifest.packet_count * 4 + self.manifest.packet_count // 4
        self._checkpoint_gap_s = record_bytes / CHECKPOINT_RECORD_BYTES_PER_S
        self._checkpointed_changes = 0
        self._durable_changes = 0  # what the last checkpoint that landed covers
        self._last_checkpoint = now
        self._checkpointing = False
        self._checkpoint_again = False
        self._pending_acks: list[tuple[int, int, int, int]] = []
        #: When the next checkpoint may start, after Checkpoint.LATER.
        self.checkpoint_delay_s = 0.0
        # Progress: the last frame that moved the job, and the current window
        # of the minimum-rate rule.
        self.last_progress = now
        self._window_start = now
        self._window_bytes = 0

    def _new_tracker(self) -> PacketTracker:
        tracker = PacketTracker(self.manifest, max_packets=self.limits.max_packets,
                                counters=self.counters)
        tracker.tolerant = self.acks
        tracker.live = self.live
        return tracker

    # --- resume --------------------------------------------------------------------------

    def restore(
        self, record: bytes | None
    ) -> tuple[Iterator[tuple[int, int]] | None, str | None]:
        """Continue from a kept partial file's checkpoint ``record``.

        Returns ``(ranges, None)``: the byte ranges of the partial file that
        no checkpoint covers (at most MAX_RESTORE_RUNS, yielded one by one),
        which must be made zero (holes) before data is accepted, since they
        may hold bytes of a receiver killed between writing and
        checkpointing. Or ``(None, reason)``: no usable checkpoint; the
        partial file must start empty.
        """
        if record is None:
            return None, "no checkpoint"
        try:
            progress = Progress.from_bytes(record)
        except ValueError as exc:
            return None, str(exc)
        if progress.manifest != self.manifest:
            return None, "another image layout"
        self.tracker.restore(progress)
        runs = self.tracker.not_done_run_count()
        if runs > MAX_RESTORE_RUNS:
            self.forget_restored()
            return None, (f"checkpoint too fragmented ({runs} runs of missing packets, "
                          f"at most {MAX_RESTORE_RUNS})")
        self._checkpointed_changes = self._durable_changes = self.tracker.changes
        counters = self.counters
        counters.resumed_packets = progress.received_packets
        counters.reused_zero_pages = counters.zero_pages
        counters.reused_normal_pages = counters.normal_pages
        counters.reused_bytes = counters.done_bytes
        self._window_bytes = counters.done_bytes
        manifest = self.manifest
        return (manifest.range_bytes(first, count)
                for first, count in self.tracker.not_done_runs()), None

    @property
    def needs_reload(self) -> bool:
        """A restored live job: the records of its done packets must be read
        back from the partial file (:meth:`reload`) before they are trusted,
        since a live round may have rewritten them after the checkpoint."""
        return self.tracker.live and self.counters.resumed_packets > 0

    def reload(self, packets: list[tuple[int, bytes, int]]) -> None:
        """The done packets as the partial file holds them: ``(number,
        zero_bitmap, payload_crc)`` of each (see :meth:`needs_reload`)."""
        self.tracker.reload(packets)
        counters = self.counters
        counters.reused_zero_pages = counters.zero_pages
        counters.reused_normal_pages = counters.normal_pages

    # --- refresh -------------------------------------------------------------------------

    def begin_refresh(self) -> None:
        """This job refreshes a committed copy: its packets become held as their
        sums are sent (:meth:`refreshed`), and rounds change them."""
        if not self.live:
            raise LocalProtocolError("a refresh needs feature LIVE")
        self.refresh = True
        self.tracker.live = True

    def refreshed(self, packets: list[tuple[int, bytes, int]], now: float) -> None:
        """Packets of the committed copy, in order from the next one not yet
        summed: ``(number, zero_bitmap, payload_crc)`` as read. Held from now on
        (the pages were there before this job)."""
        if not self.refresh:
            raise LocalProtocolError("refreshed() in a job that does not refresh")
        if [n for n, _, _ in packets] != list(range(self.summed_packets,
                                                    self.summed_packets + len(packets))):
            raise LocalProtocolError("packets must be refreshed in order")
        counters = self.counters
        zero, normal, done = counters.zero_pages, counters.normal_pages, counters.done_bytes
        self.tracker.refreshed(packets)
        counters.reused_zero_pages += counters.zero_pages - zero
        counters.reused_normal_pages += counters.normal_pages - normal
        counters.reused_bytes += counters.done_bytes - done
        self.summed_packets += len(packets)
        self.last_progress = now

    def sums_requested(self, index: int, frame: SumsRequest) -> int:
        """A SUMS_REQUEST on channel ``index``: the pages it covers, once checked
        (RemoteProtocolError if it may not be answered)."""
        if not self.refresh:
            raise RemoteProtocolError("SUMS_REQUEST in a job without feature REFRESH")
        return self._sums_budget.check(frame, self.summed_packets)

    def forget_restored(self) -> None:
        """The restored checkpoint cannot be used after all (the partial file
        could not be cleared): start from nothing."""
        counters = self.counters
        counters.zero_pages = counters.normal_pages = counters.done_bytes = 0
        counters.resumed_packets = counters.reused_bytes = 0
        counters.reused_zero_pages = counters.reused_normal_pages = 0
        self.tracker = self._new_tracker()
        self._checkpointed_changes = self._durable_changes = 0
        self._window_bytes = 0

    def resume_frames(self) -> list[ResumeState]:
        """RESUME_STATE frames: every packet held, the last frame marked."""
        return self.tracker.resume_frames()

    # --- channels ------------------------------------------------------------------------

    def attach(self, index: int, channel_count: int, now: float) -> int:
        """A HELLO for channel ``index`` of this job; the connection's generation.

        Raises ChannelRefusedError to refuse that channel alone (a stray or
        forged HELLO must not end a running job), LimitExceededError when the
        job has opened more sessions than ``max_sessions``.
        """
        if channel_count != self.channel_count:
            raise ChannelRefusedError(
                f"channel {index} says {channel_count} channels, "
                f"channel 0 said {self.channel_count}"
            )
        if index in self._ledgers and not self.acks:
            raise ChannelRefusedError(f"channel index {index} is already connected")
        if index in self._joined and index != 0:  # channel 0's HELLO opens a session itself
            self._new_session()
        self._joined.add(index)
        self._generation += 1
        self._ledgers[index] = _Ledger(self._generation)
        self.ended.discard(index)
        self.last_progress = now
        return self._generation

    def restart_session(self, now: float) -> None:
        """Channel 0 said HELLO again: a new session; every old connection is stale.

        The session's other channels join it afresh: their HELLOs do not
        count as sessions of their own.
        """
        self._new_session()
        self._ledgers.clear()
        self._joined.clear()
        self.ended.clear()
        self._round_ended.clear()
        self.last_progress = now

    def _new_session(self) -> None:
        self.counters.sessions += 1
        if self.counters.sessions > self.limits.max_sessions:
            raise LimitExceededError(
                f"the sender opened {self.counters.sessions} sessions of this job (reconnects), "
                f"more than this receiver's max_sessions {self.limits.max_sessions}"
            )

    def detach(self, index: int, generation: int, current: PacketHeader | None) -> None:
        """A connection of this job is gone; ``current``, a packet it was
        receiving, will come again."""
        ledger = self._ledgers.get(index)
        if ledger is not None and ledger.generation == generation:
            del self._ledgers[index]
        if current is not None:
            self.tracker.unclaim(current.packet_number)

    @property
    def all_attached(self) -> bool:
        """Whether every channel of the job is connected."""
        return len(self._ledgers) == self.channel_count

    # --- data ----------------------------------------------------------------------------

    def _data_allowed(self, index: int) -> None:
        """Data on channel ``index`` is out of turn after its ROUND, until ROUND_DONE."""
        if index in self._round_ended:
            raise RemoteProtocolError(
                f"data on channel {index} after its ROUND {self.round}, before every channel "
                "ended that round"
            )

    def _need_live(self, what: str) -> None:
        if not self.live:
            raise RemoteProtocolError(f"{what} in a job without live rounds (feature LIVE)")

    def packet_header(self, header: PacketHeader) -> bool:
        """A PACKET header arrived: checked and claimed before its payload lands.

        True when the packet is already stored (tolerant mode): its payload is
        then only compared, not written.
        """
        return self.tracker.check_packet(header)

    def page_list_header(self, index: int, header: PacketHeader) -> None:
        """A PAGE_LIST packet arrived on channel ``index`` (live rounds): checked
        before its payload is read."""
        self._need_live("a PAGE_LIST packet")
        self._data_allowed(index)
        self.tracker.check_replace(header)

    def page_list_applied(self, index: int, header: PacketHeader, old_zero_pages: int,
                          zero_bitmap: bytes, payload_crc: int, now: float) -> None:
        """A PAGE_LIST was verified and applied: the packet's whole zero bitmap and
        payload CRC are now these (INTEGRITY unless they give the sender's record)."""
        self.tracker.replace(header.packet_number, old_zero_pages, zero_bitmap, payload_crc,
                             header.record)
        self.counters.normal_bytes += header.payload_length
        self._uncheckpointed_bytes += header.payload_length
        self.last_progress = now
        self._frame_done(index, 1)

    def round_ended(self, index: int, frame: Round, now: float) -> RoundDone | None:
        """ROUND on channel ``index``; the ROUND_DONE to send on channel 0 once
        every channel ended the round (all of it applied by then: each
        channel's frames are handled in order)."""
        self._need_live("ROUND")
        if index in self._round_ended:
            raise RemoteProtocolError(f"ROUND {frame.round} twice on channel {index}")
        self._round_ended.add(index)
        self.last_progress = now
        if len(self._round_ended) < self.channel_count:
            return None
        self._round_ended.clear()
        self.round += 1
        return RoundDone(frame.round)

    def packet_stored(
        self, index: int, header: PacketHeader, payload_crc: int, again: bool, now: float
    ) -> None:
        """The payload of ``header`` arrived with this CRC32C and, unless
        ``again``, was written. RemoteProtocolError (INTEGRITY) if it does not
        match the header or, for a repeat, the first arrival."""
        self._data_allowed(index)
        before = self.tracker.received_packets
        self.tracker.packet_done(header, payload_crc)
        if self.tracker.received_packets != before:
            self.counters.normal_bytes += header.payload_length
            self._uncheckpointed_bytes += header.payload_length
            self.last_progress = now
        self._frame_done(index, 1)

    def zero_range(self, index: int, frame: ZeroRange, now: float) -> None:
        """A ZERO_RANGE arrived on channel ``index`` (checked and recorded at once)."""
        self._data_allowed(index)
        before = self.tracker.received_packets
        self.tracker.check_zero_range(frame)
        self.tracker.zero_range_done(frame)
        if self.tracker.received_packets != before:
            self.last_progress = now
        self._frame_done(index, frame.packet_count)

    def _frame_done(self, index: int, packets: int) -> None:
        ledger = self._ledgers.get(index)
        if ledger is not None:
            ledger.frames_done += 1
            ledger.packets_done += packets

    def channel_ended(self, index: int, now: float) -> bool:
        """END on channel ``index``; True once every channel has ended."""
        self.ended.add(index)
        self.last_progress = now
        return self.all_ended

    @property
    def all_ended(self) -> bool:
        """Whether every channel of the job has sent END."""
        return len(self.ended) == self.channel_count

    # --- checkpoints and acknowledgements ------------------------------------------------

    @property
    def dirty(self) -> bool:
        """Whether packets were recorded since the last checkpoint was taken."""
        return self.tracker.changes != self._checkpointed_changes

    def checkpoint(self, now: float, *, urgent: bool) -> Checkpoint:
        """Whether to make what is stored durable now (then ACK it).

        ``urgent``: a channel ended (its sender waits for ACKs); otherwise a
        checkpoint is due after enough bytes or CHECKPOINT_INTERVAL_S, and
        until then one is LATER, so that stored data is acknowledged even if
        nothing more arrives. Frames that recorded nothing new need no
        checkpoint; and checkpoints are spaced so that their records are
        written at no more than CHECKPOINT_RECORD_BYTES_PER_S.

        While one is being written, an urgent request is remembered
        (:meth:`checkpoint_written` says so); anything else is decided again
        once it landed.
        """
        if not self.acks:
            return Checkpoint.NONE
        if self._checkpointing:
            self._checkpoint_again = self._checkpoint_again or urgent
            return Checkpoint.NONE
        if not self.dirty:
            return Checkpoint.ACK
        if not (urgent or self._uncheckpointed_bytes >= self._checkpoint_bytes
                or now - self._last_checkpoint >= CHECKPOINT_INTERVAL_S):
            self.checkpoint_delay_s = self._last_checkpoint + CHECKPOINT_INTERVAL_S - now
            return Checkpoint.LATER
        wait_s = self._last_checkpoint + self._checkpoint_gap_s - now
        if wait_s > 0:
            self.checkpoint_delay_s = wait_s
            return Checkpoint.LATER
        return Checkpoint.TAKE

    def begin_checkpoint(self, now: float) -> bytes:
        """The checkpoint record to write (after an fsync of the data); call
        :meth:`checkpoint_written` once it is durable."""
        self._checkpointing = True
        self._checkpoint_again = False
        self._uncheckpointed_bytes = 0
        self._last_checkpoint = now
        self._checkpointed_changes = self.tracker.changes
        self._pending_acks = self._snapshot_acks()
        return self.tracker.snapshot().to_bytes()

    def checkpoint_written(self) -> tuple[list[tuple[int, Ack]], bool]:
        """The checkpoint is durable: the ACKs it allows, per channel index, and
        whether an urgent checkpoint was asked for meanwhile; either way, ask
        :meth:`checkpoint` again (urgent or not) for what arrived since."""
        self._checkpointing = False
        self._durable_changes = self._checkpointed_changes
        acks = self._deliver(self._pending_acks)
        self._pending_acks = []
        return acks, self._checkpoint_again

    def checkpoint_failed(self) -> None:
        """Writing the checkpoint failed (the job fails with it).

        What it would have covered is not durable: the job stays dirty, so
        that nothing of it is ever acknowledged without a checkpoint.
        """
        self._checkpointing = False
        self._checkpointed_changes = self._durable_changes
        self._pending_acks = []

    def acks_due(self) -> list[tuple[int, Ack]]:
        """ACKs for everything stored, when nothing is left to make durable."""
        return self._deliver(self._snapshot_acks())

    def _snapshot_acks(self) -> list[tuple[int, int, int, int]]:
        return [(index, ledger.generation, ledger.frames_done, ledger.packets_done)
                for index, ledger in self._ledgers.items()]

    def _deliver(self, acks: list[tuple[int, int, int, int]]) -> list[tuple[int, Ack]]:
        out = []
        for index, generation, frames, packets in acks:
            ledger = self._ledgers.get(index)
            if ledger is not None and ledger.generation == generation and (
                frames > ledger.frames_acked
            ):
                ledger.frames_acked = frames
                out.append((index, Ack(frames=frames, packets=packets)))
        return out

    # --- commit and watchdog -------------------------------------------------------------

    def commit(self, request: CommitRequest) -> bytes:
        """Check a COMMIT_REQUEST against what arrived, once every channel
        ended; the digest to echo in COMMIT (RemoteProtocolError otherwise)."""
        return self.tracker.check_commit_request(request)

    def stalled(self, now: float, idle_s: float) -> RemoteProtocolError | None:
        """Why the job must fail now for want of progress; None while it moves.

        No frame that moved the job for ``idle_s``, or less of the image
        completed in a window of ``idle_s`` than ``min_job_rate`` asks (a
        LimitExceededError). Either way what arrived is sound: a receiver
        keeps it for a resume.
        """
        if now - self.last_progress > idle_s:
            return RemoteProtocolError(f"no data from the sender for {idle_s:g} s")
        if now - self._window_start < idle_s:
            return None
        done = self.counters.done_bytes
        moved = done - self._window_bytes
        rate = self.limits.min_job_rate
        if rate and moved < min(rate * idle_s, self.manifest.image_size - self._window_bytes):
            return LimitExceededError(
                f"the sender completed {moved} bytes of the image in {idle_s:g} s, less than "
                f"this receiver's min_job_rate of {rate:.0f} bytes/s"
            )
        self._window_start, self._window_bytes = now, done
        return None


__all__ = [
    "CHECKPOINT_BYTES_PER_CHANNEL",
    "CHECKPOINT_INTERVAL_S",
    "CHECKPOINT_RECORD_BYTES_PER_S",
    "MAX_RESTORE_RUNS",
    "MIN_WINDOW_BYTES",
    "Checkpoint",
    "ReceiveJobCore",
    "checkpoint_bytes",
    "manifest_problem",
    "window_bytes",
]
