"""The native extension must load: a silent fallback to Python would be slow."""

from __future__ import annotations

import pytest

from dsamig import native as native_mod
from tests.conftest import extension_expected


@pytest.mark.skipif(not extension_expected(), reason="DSAMIG_NO_EXTENSIONS asks for the twin")
def test_extension_loaded() -> None:
    assert native_mod.native is not None, native_mod.native_error
    assert native_mod.impl is native_mod.native


def test_twin_has_the_native_api() -> None:
    from dsamig import _pure

    names = {
        "crc32c", "crc32c_impl", "crc32c_force", "simd_level", "force_simd",
        "SIMD_LEVELS", "bitmap_bytes", "zero_bitmap", "normal_runs", "packet_payload",
        "write_runs", "set_thread_name", "thread_cpu_s", "CpuEngineCore",
    }
    for name in names:
        assert hasattr(_pure, name), name
        if native_mod.native is not None:
            assert hasattr(native_mod.native, name), name
