"""dsamig: move guest-memory snapshots between hosts, skipping zero pages."""

__version__ = "0.1.0"
