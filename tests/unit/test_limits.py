"""kdlabd.core.limits and the max_* keys of kdlabd's configuration."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kdlab.errors import EXIT_CODES, InvalidArgument, LimitExceeded
from kdlabd import config
from kdlabd.config import Config, load
from kdlabd.core import validate
from kdlabd.core.limits import GIB, HostResources, Limits
from kdlabd.host.descriptors import CallerDescriptors

HOST = HostResources(memory_mib=8192, cpus=4)
FILES = CallerDescriptors()


@pytest.fixture(autouse=True)
def no_host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read the host's /etc/kdlab/kdlabd.toml."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent" / "kdlabd.toml")


def test_limit_exceeded_is_its_own_error() -> None:
    assert LimitExceeded.dbus_name() == "org.kdlab.Kdlab1.Error.LimitExceeded"
    assert LimitExceeded.exit_code == 9
    assert EXIT_CODES[LimitExceeded.dbus_name()] == 9


# --- the checks -------------------------------------------------------------------


def test_within_host_caps_memory_and_vcpus_only() -> None:
    limits = Limits().within_host(HOST)
    assert (limits.memory_mib, limits.vcpus) == (8192, 4)
    assert limits.disk_gib == Limits().disk_gib
    lower = Limits(memory_mib=1024, vcpus=2).within_host(HOST)
    assert (lower.memory_mib, lower.vcpus) == (1024, 2)


@pytest.mark.parametrize(
    ("check", "at_limit", "key", "value"),
    [
        (lambda lim, n: lim.memory(n), 2048, "max_memory_mib", "2048 MiB"),
        (lambda lim, n: lim.cpus(n), 2, "max_vcpus", "2"),
        (lambda lim, n: lim.extra(n), 3, "max_extra_disks", "3"),
    ],
    ids=["memory", "vcpus", "extra-disks"],
)
def test_amounts_up_to_the_limit_pass_and_above_are_refused(
    check: Callable[[Limits, int], int], at_limit: int, key: str, value: str
) -> None:
    limits = Limits(memory_mib=2048, vcpus=2, extra_disks=3)
    assert check(limits, at_limit) == at_limit
    with pytest.raises(LimitExceeded) as refused:
        check(limits, at_limit + 1)
    message = str(refused.value)
    assert key in message, "the message names the configuration key"
    assert f"limit of {value}" in message, "and the limit's value"
    assert str(at_limit + 1) in message, "and what was asked"


def test_disk_limit_is_in_gib() -> None:
    limits = Limits(disk_gib=2)
    assert limits.disk_bytes == 2 * GIB
    assert limits.disk(2 * GIB, "image size") == 2 * GIB
    with pytest.raises(LimitExceeded) as refused:
        limits.disk(2 * GIB + 1, "image size")
    message = str(refused.value)
    assert message.startswith("image size of 2147483649 bytes")
    assert "limit of 2 GiB" in message
    assert "max_disk_gib" in message


@pytest.mark.parametrize(
    ("check", "key"),
    [
        (lambda lim, uid, n: lim.room_for_vm(uid, n), "max_vms_per_user"),
        (lambda lim, uid, n: lim.room_for_job(uid, n), "max_jobs_per_user"),
    ],
    ids=["vms", "jobs"],
)
def test_per_user_counts(check: Callable[[Limits, int, int], None], key: str) -> None:
    limits = Limits(vms_per_user=3, jobs_per_user=3)
    check(limits, 1000, 2)  # a third one fits
    with pytest.raises(LimitExceeded) as refused:
        check(limits, 1000, 3)
    message = str(refused.value)
    assert "uid 1000 has 3" in message
    assert "the limit is 3" in message
    assert key in message


def test_root_is_counted_like_anyone() -> None:
    with pytest.raises(LimitExceeded):
        Limits(vms_per_user=1).room_for_vm(0, 1)


# --- the configuration ------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kdlabd.toml"
    path.write_text(text)
    return path


def test_default_limits_are_the_hosts_memory_and_cpus() -> None:
    assert load(None, {}).limits(HOST) == Limits(
        memory_mib=8192,
        vcpus=4,
        disk_gib=256,
        extra_disks=8,
        vms_per_user=32,
        jobs_per_user=4,
        console_viewers_per_vm=16,
        console_viewers_per_user=64,
    )


def test_every_limit_has_its_key() -> None:
    keys = {f"max_{name}" for name in Limits.__dataclass_fields__}
    assert keys <= set(Config.__dataclass_fields__)


def test_limits_from_the_file(tmp_path: Path) -> None:
    values = {
        "memory_mib": 1024,
        "vcpus": 2,
        "disk_gib": 16,
        "extra_disks": 0,
        "vms_per_user": 5,
        "jobs_per_user": 1,
        "console_viewers_per_vm": 2,
        "console_viewers_per_user": 3,
    }
    text = "".join(f"max_{key} = {value}\n" for key, value in values.items())
    assert load(write(tmp_path, text), {}).limits(HOST) == Limits(**values)


def test_memory_and_vcpus_never_above_the_hosts(tmp_path: Path) -> None:
    path = write(tmp_path, "max_memory_mib = 1048576\nmax_vcpus = 64\n")
    limits = load(path, {}).limits(HOST)
    assert (limits.memory_mib, limits.vcpus) == (8192, 4)


@pytest.mark.parametrize(
    "line",
    [
        "max_memory_mib = 0",
        "max_vcpus = -1",
        'max_disk_gib = "256G"',
        "max_disk_gib = 1.5",
        "max_vms_per_user = true",
        "max_jobs_per_user = 0",
        "max_extra_disks = 26",
        "max_extra_disks = -1",
        "max_console_viewers_per_vm = 0",
        "max_console_viewers_per_user = 4294967296",
    ],
)
def test_bad_limits_are_refused(tmp_path: Path, line: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        load(write(tmp_path, line + "\n"), {})
    assert line.split(" = ", maxsplit=1)[0] in str(refused.value)


# --- an image's virtual size --------------------------------------------------------


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("kdlab-image", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def qcow2(virtual_size: int) -> bytes:
    header = bytearray(512)
    struct.pack_into(">4sIQIIQ", header, 0, b"QFI\xfb", 3, 0, 0, 16, virtual_size)
    struct.pack_into(">I", header, 100, 104)
    return bytes(header)


def test_a_qcow2_of_2_to_the_62_bytes_is_refused(memfd: int) -> None:
    os.write(memfd, qcow2(2**62))
    with pytest.raises(LimitExceeded) as refused:
        validate.image_source(FILES, memfd, Limits())
    assert "virtual size" in str(refused.value)
    assert "max_disk_gib" in str(refused.value)


def test_a_qcow2_at_the_limit_is_accepted(memfd: int) -> None:
    os.write(memfd, qcow2(256 * GIB))
    assert validate.image_source(FILES, memfd, Limits()).capacity == 256 * GIB


def test_a_raw_image_over_the_limit_is_refused(memfd: int) -> None:
    os.truncate(memfd, GIB + 512)  # sparse: no memory is used
    with pytest.raises(LimitExceeded):
        validate.image_source(FILES, memfd, Limits(disk_gib=1))
    os.truncate(memfd, GIB)
    assert validate.image_source(FILES, memfd, Limits(disk_gib=1)).capacity == GIB
