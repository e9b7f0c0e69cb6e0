"""The settings leaf: the one geometry check, and the exit code of a job's end."""

from __future__ import annotations

import pytest

from dsamig.proto import Manifest
from dsamig.settings import (
    EXIT_CANCELLED,
    EXIT_OK,
    EXIT_TRANSFER,
    JobState,
    exit_code_for,
    geometry_problem,
)


@pytest.mark.parametrize(("page_size", "packet", "problem"), [
    (4096, {"packet_pages": 128}, None),
    (512, {"packet_size": 512}, None),
    (1 << 20, {"packet_pages": 4095}, None),
    (3000, {"packet_pages": 1}, ("page_size", "3000 is not a power of two in 512..1048576")),
    (256, {"packet_size": 256}, ("page_size", "256 is not a power of two in 512..1048576")),
    (4096, {"packet_pages": 0}, ("packet_pages", "0 out of range (1..4096)")),
    (4096, {"packet_size": 4097}, ("packet_size",
                                   "4097 is not a whole number of 4096-byte pages")),
    (512, {"packet_size": 512 * 4097}, ("packet_size",
                                         "2097664 is 4097 pages of 512 bytes, not 1..4096")),
    (1 << 20, {"packet_pages": 4096}, (
        "packet_pages",
        "4096 x page_size 1048576 exceeds 4294967295 bytes (payload_length is 32 bits)")),
    (1 << 20, {"packet_size": 4096 << 20}, (
        "packet_size", "4294967296 exceeds 4294967295 bytes (payload_length is 32 bits)")),
])
def test_geometry_problem(page_size: int, packet: dict[str, int],
                          problem: tuple[str, str] | None) -> None:
    found = geometry_problem(page_size, **packet)
    assert (None if found is None else (found.key, found.text)) == problem
    if found is not None:
        assert str(found) == f"{found.key} {found.text}"


def test_the_wire_uses_the_same_check() -> None:
    assert Manifest(1 << 40, 3000, 1).problem() == (
        "manifest page_size 3000 is not a power of two in 512..1048576")
    assert Manifest((1 << 50) + 1).problem() == (
        f"manifest image_size {(1 << 50) + 1} out of range (0..{1 << 50})")
    assert geometry_problem(4096, packet_pages=128, image_size=-1) is not None


def test_a_job_needs_its_packet() -> None:
    with pytest.raises(TypeError):
        geometry_problem(4096)


@pytest.mark.parametrize(("state", "code"), [
    (JobState.COMPLETED, EXIT_OK), ("cancelled", EXIT_CANCELLED), (JobState.FAILED, EXIT_TRANSFER),
])
def test_exit_code_for(state: str, code: int) -> None:
    assert exit_code_for(state) == code
