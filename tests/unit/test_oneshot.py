"""The one-shot commands' own decisions, apart from moving data."""

from __future__ import annotations

import os

import pytest

from dsamig.errors import ConfigError
from dsamig.oneshot import SendCommand, default_job_name
from dsamig.transport.sender import LiveOptions


def test_a_job_is_named_after_its_image() -> None:
    assert default_job_name("/var/lib/vms/guest.ram") == "guest.ram"
    assert default_job_name("guest.ram") == "guest.ram"
    # A file name that is not UTF-8 cannot travel in a HELLO: no default.
    assert default_job_name(os.fsdecode(b"/vms/bad-\xff.ram")) == ""


def test_send_options_take_the_defaults_and_the_name() -> None:
    options = SendCommand("/vms/vm-7.ram", "dest:7781").options()
    assert (options.host, options.port, options.name) == ("dest", 7781, "vm-7.ram")
    assert SendCommand("/vms/vm-7.ram", "dest", name="other").options().name == "other"
    assert SendCommand("/vms/vm-7.ram", "dest").options().port == 7780


def test_a_snapshot_takes_2mib_packets_and_a_job_in_rounds_512kib() -> None:
    assert SendCommand("/vms/vm-7.ram", "dest").options().packet_bytes == 2 << 20
    assert SendCommand("/vms/vm-7.ram", "dest", refresh=True).options().packet_bytes == 512 << 10
    live = SendCommand("/vms/vm-7.ram", "dest", live=LiveOptions(pause_cmd="p", resume_cmd="r"))
    assert live.options().packet_bytes == 512 << 10
    assert SendCommand("/vms/vm-7.ram", "dest", packet_size=1 << 20,
                       refresh=True).options().packet_bytes == 1 << 20  # as set


@pytest.mark.parametrize(("changes", "words"), [
    ({"page_size": 3000}, "page_size 3000 is not a power of two in 512..1048576"),
    ({"packet_size": 6000}, "packet_size 6000 is not a whole number of 4096-byte pages"),
    ({"packet_size": 8192 * 4096}, "packet_size 33554432 is 8192 pages of 4096 bytes, "
                                   "not 1..4096"),
    ({"channels": 65}, "channels must be 1..64, not 65"),
])
def test_bad_options_name_the_rule(changes: dict[str, int], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        SendCommand("/vms/vm-7.ram", "dest", **changes).options()  # type: ignore[arg-type]
    assert str(info.value) == words
