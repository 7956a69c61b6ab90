"""kdlabd.core.validate: every kind of input, accepted and refused; real descriptors."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kdlab.errors import InvalidArgument
from kdlabd.core import validate
from kdlabd.host.descriptors import CallerDescriptors
from tests.support import debian
from tests.support.prereq import require

# Names.

VALID_NAMES = [
    "a",
    "A",
    "0",
    "vm1",
    "linux-6.9-rc1",
    "my_vm.test",
    "a..b",
    "9front",
    "x" * 63,
    "a-",
    "a.",
]
INVALID_NAMES = [
    "",
    "x" * 64,
    "-vm",
    ".vm",
    "_vm",
    "..",
    ".",
    "a/b",
    "/etc",
    "../x",
    "café",
    "vm\u0661",  # ARABIC-INDIC DIGIT ONE: a digit to Unicode, not to kdlab
    "\uff56\uff4d",  # FULLWIDTH LATIN SMALL LETTER V, M
    "my vm",
    " vm",
    "vm ",
    "vm\n",
    "vm\t",
    "vm\x00",
    "a:b",
    "a,b",
    "a@b",
    "a+b",
]


@pytest.mark.parametrize("value", VALID_NAMES)
def test_name_valid(value: str) -> None:
    assert validate.name(value) == value


@pytest.mark.parametrize("value", INVALID_NAMES)
def test_name_invalid(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.name(value)
    message = str(err.value)
    assert repr(value) in message
    assert "1-63" in message


def test_name_message_names_the_thing() -> None:
    with pytest.raises(InvalidArgument, match="invalid image name"):
        validate.name("", what="image name")


# Kernel command lines.


@pytest.mark.parametrize(
    "value",
    [
        "",
        "root=/dev/vda rw console=ttyS0",
        'dyndbg="file foo.c +p"',
        "~!@#$%^&*()_+{}|:<>?`-=[]\\;',./",
        "x" * validate.CMDLINE_MAX,
    ],
)
def test_cmdline_valid(value: str) -> None:
    assert validate.cmdline(value) == value


def test_cmdline_too_long() -> None:
    with pytest.raises(InvalidArgument, match=r"2048 characters.*at most 2047"):
        validate.cmdline("x" * (validate.CMDLINE_MAX + 1))


@pytest.mark.parametrize(
    "char", ["\n", "\r", "\t", "\x00", "\x1b", "\x7f", "é", "\u2028", "\U0001f600"]
)
def test_cmdline_refuses_characters(char: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate.cmdline(f"root=/dev/vda{char}quiet")
    assert repr(char) in str(err.value)
    assert "printable ASCII" in str(err.value)


# Integer ranges.


@pytest.mark.parametrize(
    ("check", "low", "high"),
    [
        (validate.memory_mib, 32, 1024 * 1024),
        (validate.vcpus, 1, 255),
        (validate.tcp_port, 1024, 65535),
    ],
)
def test_ranges_inclusive(check: Callable[[int], int], low: int, high: int) -> None:
    assert check(low) == low
    assert check(high) == high
    for outside in (low - 1, high + 1, -1, 0 if low > 0 else -2):
        with pytest.raises(InvalidArgument, match=f"from {low} to {high}"):
            check(outside)


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1]])
def test_ranges_refuse_non_integers(value: object) -> None:
    with pytest.raises(InvalidArgument, match="must be an integer"):
        validate.vcpus(value)  # type: ignore[arg-type]


def test_in_range_message_names_the_option() -> None:
    with pytest.raises(InvalidArgument, match=r"^number of vCPUs must be .* not 256$"):
        validate.vcpus(256)


# Descriptors passed by clients.

MAX = 1 << 20
FILES = CallerDescriptors()


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors a test opened; closed afterwards."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


def open_fd(fds: list[int], path: Path | str, flags: int) -> int:
    fd = os.open(path, flags)
    fds.append(fd)
    return fd


def refused(fd: int, max_bytes: int = MAX) -> str:
    with pytest.raises(InvalidArgument) as err:
        validate.readable_file(FILES, fd, "kernel", max_bytes)
    message = str(err.value)
    assert message.startswith("kernel"), message
    return message


def test_regular_file_ok(tmp_path: Path, fds: list[int]) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(b"x" * 1000)
    assert (
        validate.readable_file(FILES, open_fd(fds, path, os.O_RDONLY), "kernel", MAX)
        == 1000
    )
    assert (
        validate.readable_file(FILES, open_fd(fds, path, os.O_RDWR), "kernel", MAX)
        == 1000
    )


def test_size_limit_is_inclusive(tmp_path: Path, fds: list[int]) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert (
        validate.readable_file(FILES, open_fd(fds, path, os.O_RDONLY), "kernel", 10)
        == 10
    )


def test_directory_refused(tmp_path: Path, fds: list[int]) -> None:
    assert "regular file" in refused(open_fd(fds, tmp_path, os.O_RDONLY))


def test_fifo_refused(tmp_path: Path, fds: list[int]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "regular file" in refused(open_fd(fds, fifo, os.O_RDONLY | os.O_NONBLOCK))


def test_device_refused(fds: list[int]) -> None:
    require(Path("/dev/zero").exists(), "/dev/zero")
    assert "regular file" in refused(open_fd(fds, "/dev/zero", os.O_RDONLY))


def test_socket_refused() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert "regular file" in refused(left.fileno())


def test_write_only_refused(tmp_path: Path, fds: list[int]) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert "not open for reading" in refused(open_fd(fds, path, os.O_WRONLY))


def test_o_path_descriptor_refused(tmp_path: Path, fds: list[int]) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = open_fd(fds, path, os.O_PATH)
    with pytest.raises(OSError, match="Bad file descriptor"):  # what create() hits
        os.pread(fd, 10, 0)
    assert "not open for reading" in refused(fd)


def test_empty_file_refused(tmp_path: Path, fds: list[int]) -> None:
    path = tmp_path / "f"
    path.touch()
    assert "empty" in refused(open_fd(fds, path, os.O_RDONLY))


def test_oversize_file_refused(tmp_path: Path, fds: list[int]) -> None:
    path = tmp_path / "sparse"
    path.touch()
    os.truncate(path, 8 << 30)  # 8 GiB, no blocks
    message = refused(open_fd(fds, path, os.O_RDONLY), max_bytes=4096)
    assert str(8 << 30) in message
    assert "at most 4096" in message


def test_closed_descriptor_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    assert "not an open file descriptor" in refused(fd)


def test_negative_descriptor_refused() -> None:
    assert "not an open file descriptor" in refused(-1)


# Kernel images.


def bzimage_header(size: int = 1024) -> bytes:
    header = bytearray(size)
    header[0x1FE:0x200] = b"\x55\xaa"
    header[0x202:0x206] = b"HdrS"
    header[0x206:0x208] = struct.pack("<H", 0x020F)
    return bytes(header)


def test_crafted_bzimage_accepted() -> None:
    validate.kernel_image(bzimage_header())
    validate.kernel_image(bzimage_header(0x206))  # just long enough


def test_debian_kernel_accepted() -> None:
    try:
        kernel = debian.cloud_kernel()
    except debian.FixtureError as err:
        require(False, f"Debian's cloud kernel ({err})")
        raise
    with kernel.vmlinuz.open("rb") as file:
        validate.kernel_image(file.read(1024))


def test_elf_refused_with_vmlinux_hint() -> None:
    with open(sys.executable, "rb") as file:
        header = file.read(1024)
    assert header.startswith(b"\x7fELF")
    with pytest.raises(InvalidArgument, match="vmlinux") as err:
        validate.kernel_image(header)
    assert "bzImage" in str(err.value)


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"\x00" * 1024,
        b"MZ" + b"\x00" * 1022,
        bzimage_header()[:0x205],  # truncated inside the magic
        bytes(0x203) + b"HdrS" + bytes(100),  # magic one byte late
        b"HdrS" + bytes(1020),  # magic at the start
        b"\x1f\x8b\x08" + bytes(1021),  # gzip
    ],
    ids=["empty", "zeros", "pe", "truncated", "late-magic", "early-magic", "gzip"],
)
def test_garbage_refused(header: bytes) -> None:
    with pytest.raises(InvalidArgument, match="not an x86 bzImage"):
        validate.kernel_image(header)


@pytest.mark.parametrize(
    "release",
    ["", "6.1.0-18-amd64", "6.9.0-rc1+", "5.15.0_custom", "6.5.6-300.fc39.x86_64",
     "x" * 64],
)  # fmt: skip
def test_release_accepted(release: str) -> None:
    assert validate.release(release) == release


@pytest.mark.parametrize(
    "release",
    ["../../../etc/passwd", "6.1/x", "/abs", "..", "6.1..0", ".6.1", "-6.1",
     "6.1 x", "6.1\n", "6.1~rc", "6.1$(id)", "6.1;x", "6.1\x00", "x" * 65, "é"],
)  # fmt: skip
def test_release_refused(release: str) -> None:
    with pytest.raises(InvalidArgument, match="announces the release"):
        validate.release(release)
