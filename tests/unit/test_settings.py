"""The settings leaf: the one geometry check, and the exit code of a job's end."""

from __future__ import annotations

import pytest

from dsamig.proto import Manifest
from dsamig.settings import (
    EXIT_CANCELLED,
    EXIT_OK,
    EXIT_TRANSFER,
    MAX_CHANNELS,
    JobState,
    auto_channels,
    default_packet_size,
    exit_code_for,
    geometry_problem,
    parse_channels,
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


@pytest.mark.parametrize(("page_size", "rounds", "packet"), [
    (4096, False, 2 << 20), (4096, True, 512 << 10),
    (512, False, 2 << 20), (512, True, 512 << 10),
    (1 << 20, False, 2 << 20), (1 << 20, True, 1 << 20),  # at least one page
])
def test_default_packets_are_2mib_and_512kib_in_rounds(page_size: int, rounds: bool,
                                                       packet: int) -> None:
    assert default_packet_size(page_size, rounds=rounds) == packet
    assert geometry_problem(page_size, packet_size=packet) is None  # fits every page size


def test_a_job_needs_its_packet() -> None:
    with pytest.raises(TypeError):
        geometry_problem(4096)


@pytest.mark.parametrize(("state", "code"), [
    (JobState.COMPLETED, EXIT_OK), ("cancelled", EXIT_CANCELLED), (JobState.FAILED, EXIT_TRANSFER),
])
def test_exit_code_for(state: str, code: int) -> None:
    assert exit_code_for(state) == code


@pytest.mark.parametrize(("cpus", "channels"), [(1, 4), (2, 4), (4, 4), (6, 6), (8, 8),
                                                  (16, 16), (64, 16)])
def test_auto_channels_is_one_per_core_within_4_to_16(cpus: int, channels: int) -> None:
    assert auto_channels(cpus) == channels


def test_auto_channels_counts_the_cores_this_process_may_use() -> None:
    import os

    assert auto_channels() == max(4, min(16, len(os.sched_getaffinity(0))))


@pytest.mark.parametrize(("text", "result"), [("1", 1), ("64", 64), ("auto", None),
                                              (" AUTO ", None), ("0", 0), ("65", 65)])
def test_channel_counts_as_users_write_them(text: str, result: int | None) -> None:
    assert parse_channels(text) == (auto_channels() if result is None else result)


@pytest.mark.parametrize("text", ["four", "", "2.5"])
def test_what_is_not_a_channel_count_says_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match=f"channels must be 1..{MAX_CHANNELS} or auto"):
        parse_channels(text)


@pytest.mark.parametrize("count", [0, 65, -1])
def test_a_count_out_of_range_is_the_jobs_to_refuse(count: int) -> None:
    from dsamig.errors import ConfigError
    from dsamig.transport.sender import SendOptions

    with pytest.raises(ConfigError, match=f"channels must be 1..{MAX_CHANNELS}, not {count}"):
        SendOptions("127.0.0.1", 9, channels=count).validate()
