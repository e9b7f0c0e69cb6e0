"""Image source and destination sink: the file side of a transfer."""

from dsamig.pages.sink import PARTIAL_SUFFIX, PROGRESS_SUFFIX, PageSink
from dsamig.pages.source import PageSource

__all__ = ["PARTIAL_SUFFIX", "PROGRESS_SUFFIX", "PageSink", "PageSource"]
