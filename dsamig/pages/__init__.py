"""Image source and destination sink: the file side of a transfer."""

from dsamig.pages.sink import PARTIAL_SUFFIX, PROGRESS_SUFFIX, PageSink, check_output
from dsamig.pages.source import PageSource, image_size, open_image

__all__ = ["PARTIAL_SUFFIX", "PROGRESS_SUFFIX", "PageSink", "PageSource", "check_output",
           "image_size", "open_image"]
