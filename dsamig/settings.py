"""Defaults and limits that several layers share: a leaf module.

Nothing here imports another part of dsamig, so the CLI, the YAML schema,
the transport and the daemons can all take their defaults from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB
TiB: Final = 1024 * GiB

#: The largest image the wire format can describe (docs/protocol.md).
WIRE_MAX_IMAGE_SIZE: Final = 1 << 50


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


__all__ = ["WIRE_MAX_IMAGE_SIZE", "GiB", "KiB", "MiB", "ReceiverLimits", "TiB"]
