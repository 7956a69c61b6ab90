"""Properties of the validators on arbitrary input, and of what they let through.

tests/unit/test_domain_xml.py checks the XML builder on inputs drawn from what
the validators allow. Here the inputs are arbitrary (any text, any integer,
any bytes), and the properties close the loop:

- a validator never raises anything but InvalidArgument;
- whatever it accepts builds domain XML that is well-formed, valid against
  libvirt's RelaxNG schema and parses back to the same spec, with QEMU option
  commas doubled;
- the same holds for what kdlabd reads out of an accepted kernel (its release).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import string
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from kdlab.errors import InvalidArgument, LimitExceeded
from kdlab.kernel.bzimage import bzimage_release
from kdlabd.core import validate
from kdlabd.core.limits import Limits
from kdlabd.core.models import Accel, DebugSettings, Disk, ImageSource, VMSpec
from kdlabd.core.vms import CreateRequest, Layout, VMService
from kdlabd.host.descriptors import CallerDescriptors
from kdlabd.host.local import LocalHost
from kdlabd.virt.domain_xml import build_domain_xml, parse_domain_xml
from tests.unit.fake_hypervisor import FakeHypervisor
from tests.unit.test_domain_xml import (
    PROPERTIES,
    assert_schema_valid,
    gdb_chardev,
    make_spec,
    qemu_args,
)

# Characters that break things when they slip through: XML's, QEMU's option
# syntax, the shell's, paths', line breaks, controls, and non-ASCII look-alikes.
NASTY = "<>&\"',=;:/\\ \t\n\r\x00\x01\x1b\x7f\u0085\u2028\u202e\ufeff\ud7ff\U0001f600"
NAME_CHARS = string.ascii_letters + string.digits + "._-"
# Any text at all, and text mostly of what is allowed with nasty characters mixed in
# (so that some of it gets accepted).
texts = st.text() | st.text(alphabet=NAME_CHARS + NASTY, max_size=80)
cmdline_texts = st.text() | st.text(
    alphabet=string.printable + NASTY, max_size=validate.CMDLINE_MAX + 40
)
path_texts = st.text() | st.text(alphabet=string.printable + NASTY, max_size=120).map(
    lambda s: "/" + s
)
anything = (
    st.integers()
    | st.floats(allow_nan=True)
    | st.booleans()
    | st.none()
    | st.text(max_size=10)
    | st.binary(max_size=10)
)


def accepted(check: Callable[..., Any], *args: Any) -> Any:
    """*check*'s result, or None if it refused with InvalidArgument (and only that)."""
    try:
        result = check(*args)
    except InvalidArgument:
        event(f"{getattr(check, '__name__', check)}: refused")
        return None
    event(f"{getattr(check, '__name__', check)}: accepted")
    return result


# --- validators raise InvalidArgument or nothing --------------------------------------


@given(texts)
@PROPERTIES
def test_name_raises_only_invalid_argument(value: str) -> None:
    if accepted(validate.name, value) is not None:
        assert 0 < len(value) <= validate.NAME_MAX
        assert set(value) <= set(NAME_CHARS)


@given(cmdline_texts)
@PROPERTIES
def test_cmdline_raises_only_invalid_argument(value: str) -> None:
    if accepted(validate.cmdline, value) is not None:
        assert "\n" not in value
        assert value.isascii()
        assert value.isprintable()


@given(path_texts)
@PROPERTIES
def test_hint_path_raises_only_invalid_argument(value: str) -> None:
    if accepted(validate.hint_path, value, "vmlinux path"):
        assert value.startswith("/")
        assert value.isascii()
        assert value.isprintable()


@pytest.mark.parametrize(
    "check",
    [
        validate.memory_mib,
        validate.vcpus,
        validate.tcp_port,
        validate.disk_size,
    ],
)
@given(value=anything)
@PROPERTIES
def test_ranges_raise_only_invalid_argument(
    check: Callable[[Any], int], value: object
) -> None:
    if accepted(check, value) is not None:
        assert type(value) is int


def bzimage(tail: bytes, release: bytes | None = None) -> bytes:
    """A header validate.kernel_image accepts: *tail*, then the boot protocol's
    magic at 0x202 and, with *release*, a version string where 0x20e points."""
    header = bytearray(tail.ljust(0x400, b"\0"))
    header[0x202:0x206] = b"HdrS"
    if release is not None:
        struct.pack_into("<H", header, 0x20E, _VERSION_AT - 0x200)
        header[_VERSION_AT : _VERSION_AT + len(release) + 1] = release + b"\0"
    return bytes(header)


_VERSION_AT = 0x300
kernel_headers = st.binary(max_size=2048) | st.builds(
    bzimage, st.binary(max_size=1024), st.none() | st.binary(max_size=64)
)


@given(kernel_headers)
@PROPERTIES
def test_kernel_image_raises_only_invalid_argument(header: bytes) -> None:
    accepted(validate.kernel_image, header)
    assert isinstance(bzimage_release(header), str)


def qcow2(
    version: int, backing: int, incompatible: int, size: int, tail: bytes
) -> bytes:
    header = struct.pack(">4sIQIIQ", b"QFI\xfb", version, backing, 0, 16, size)
    header = header.ljust(72, b"\0") + struct.pack(">Q", incompatible)
    return header + tail


contents = st.binary(max_size=256) | st.builds(
    qcow2,
    st.integers(0, 2**32 - 1) | st.sampled_from([2, 3]),
    st.just(0) | st.integers(0, 2**64 - 1),
    st.just(0) | st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=64),
).map(lambda header: header[: len(header)])


@contextlib.contextmanager
def memfd(content: bytes) -> Iterator[int]:
    """A regular file in memory holding *content*, as a descriptor."""
    fd = os.memfd_create("kdlab-image", os.MFD_CLOEXEC)
    try:
        os.write(fd, content)
        yield fd
    finally:
        os.close(fd)


LIMITS = Limits()
FILES = CallerDescriptors()


def image_source(fd: int) -> ImageSource | None:
    """validate.image_source under the default limits; None if it refused."""
    try:
        source: ImageSource | None = accepted(validate.image_source, FILES, fd, LIMITS)
        return source
    except LimitExceeded:
        event("image_source: over the limit")
        return None


@given(content=contents | contents.map(lambda c: c[:40]))
@PROPERTIES
def test_image_source_raises_only_invalid_argument_or_limit(content: bytes) -> None:
    with memfd(content) as fd:
        source = image_source(fd)
    if source is None:
        return
    assert 0 < source.capacity <= LIMITS.disk_bytes
    if content.startswith(b"QFI\xfb"):
        version, backing, _, _, size = struct.unpack_from(">IQIIQ", content, 4)
        assert (version in (2, 3), backing, source.capacity) == (True, 0, size)
    else:
        assert source.capacity == source.size == len(content)


@given(st.integers(-(2**31), 2**31 - 1))
@PROPERTIES
def test_readable_file_raises_only_invalid_argument(fd: int) -> None:
    """Any value a descriptor can have (D-Bus brings kdlabd real ones)."""
    accepted(validate.readable_file, FILES, fd, "kernel", validate.KERNEL_MAX_BYTES)


# --- what the validators accept builds valid, faithful domain XML ------------------


def or_default(check: Callable[..., Any], value: str, default: str, *args: Any) -> str:
    result = accepted(check, value, *args)
    return default if result is None else str(result)


@given(
    name=texts,
    cmdline=cmdline_texts,
    image=texts,
    vmlinux=path_texts,
    kernel_path=path_texts,
    tree=path_texts,
    runtime=path_texts,
)
@PROPERTIES
def test_what_validators_accept_builds_schema_valid_xml_that_round_trips(
    *, name: str, cmdline: str, image: str, vmlinux: str, kernel_path: str, tree: str,
    runtime: str,
) -> None:  # fmt: skip
    name = or_default(validate.name, name, "vm1")
    image = or_default(validate.name, image, "base", "image name")
    # No validator for kdlabd's own directories (config): a printable absolute path.
    gdb_socket = Path(or_default(validate.hint_path, runtime, "/run/kdlab", "dir"))
    spec = make_spec(
        name,
        cmdline=or_default(validate.cmdline, cmdline, ""),
        vmlinux=or_default(validate.hint_path, vmlinux, "", "vmlinux path"),
        kernel_path=or_default(validate.hint_path, kernel_path, "", "kernel path"),
        tree=or_default(validate.hint_path, tree, "", "kernel tree path"),
        gdb_socket=gdb_socket / "gdb" / f"{name}.sock",
        disks=(Disk(Path(f"/var/lib/kdlab/boot/{name}.vda.qcow2"), "vda", image),),
        debug=DebugSettings(),
    )
    xml = build_domain_xml(spec)
    assert_schema_valid(xml)
    assert parse_domain_xml(xml) == spec
    chardev = gdb_chardev(spec)
    assert chardev is not None
    assert chardev["path"] == str(spec.gdb_socket)
    escaped = str(spec.gdb_socket).replace(",", ",,")
    assert f"path={escaped}," in qemu_args_of(xml)[1]


def qemu_args_of(xml: str) -> list[str]:
    from lxml import etree

    return qemu_args(etree.fromstring(xml.encode()))


@given(cmdline_texts)
@example("x" * validate.CMDLINE_MAX)
@PROPERTIES
def test_effective_cmdline_of_any_accepted_vm_fits_the_kernel(value: str) -> None:
    """What kdlab adds (root=, console=, nokaslr) is counted before a VM is made."""
    service = VMService(
        FakeHypervisor(),
        Layout(Path("/nonexistent"), Path("/nonexistent")),
        Accel.TCG,
        host=LocalHost(),
    )
    request = CreateRequest("vm1", 0, kernel_fd=None, cmdline=value, image="base")
    try:
        disks = service._check(request)  # the create path's validation
    except InvalidArgument:
        return
    booted = make_spec(
        cmdline=value,
        disks=tuple(
            Disk(Path(f"/var/lib/kdlab/boot/vm1.{d.target}.qcow2"), d.target, "base")
            for d in disks
        ),
    )
    assert booted.disks, "the image's disk was planned"
    assert len(booted.effective_cmdline) <= validate.CMDLINE_MAX


@given(st.binary(max_size=64))
@example(b"6.1.0-kdlab\x01")
@PROPERTIES
def test_release_of_any_accepted_kernel_builds_valid_xml(release: bytes) -> None:
    header = bzimage(b"", release)
    validate.kernel_image(header)
    spec = make_spec(release=bzimage_release(header))
    xml = build_domain_xml(spec)
    assert_schema_valid(xml)
    assert parse_domain_xml(xml) == spec


def test_specs_here_cover_every_field_a_client_sets() -> None:
    """A new client-supplied spec field should get a property here too."""
    # on_panic is one of three words (validate.on_panic), never free text.
    covered = {"name", "cmdline", "vmlinux", "kernel_path", "tree", "disks"}
    covered.add("on_panic")
    covered.add("initramfs")  # likewise (validate.initramfs)
    client_strings = {
        f.name
        for f in dataclasses.fields(VMSpec)
        if f.type in ("str", str) and f.name not in ("release",)
    }
    assert client_strings <= covered
