"""The one place that decides whether the native extension is used.

``impl`` is ``dsamig._native`` when it loaded, else its pure-Python twin
``dsamig._pure``; both expose the same functions and classes.
``DSAMIG_NO_EXTENSIONS=1`` forces the twin.  When the extension is missing
for another reason, ``native_error`` says why, so tests and ``dsamig demo``
can tell instead of silently running slowly.
"""

from __future__ import annotations

import os
from types import ModuleType

from dsamig import _pure

native: ModuleType | None
native_error: str | None

if os.environ.get("DSAMIG_NO_EXTENSIONS", "") not in ("", "0"):
    native = None
    native_error = "disabled by DSAMIG_NO_EXTENSIONS"
else:
    try:
        import dsamig._native

        native = dsamig._native
    except ImportError as exc:  # depends on the build
        native = None
        native_error = f"extension not built: {exc}"
    else:
        native_error = None

impl: ModuleType = native if native is not None else _pure

__all__ = ["impl", "native", "native_error"]
