"""One validator per kind of input. Every path that takes an input uses these.

Each raises :class:`~kdlab.errors.InvalidArgument` with a message that says
what is allowed, and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kdlab import wire
from kdlab.errors import InvalidArgument
from kdlab.wire import RELEASE_MAX, is_safe_release
from kdlabd.core.models import ImageFormat, ImageSource, StoredImage

if TYPE_CHECKING:  # kdlabd.core.limits imports this module's ranges
    from kdlabd.core.host import CallerFiles
    from kdlabd.core.limits import Limits

NAME_MAX = 63
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# x86's COMMAND_LINE_SIZE is 2048 including the terminating NUL.
CMDLINE_MAX = 2047
MEMORY_MIB_RANGE = (32, 1024 * 1024)
VCPUS_RANGE = (1, 255)
TCP_PORT_RANGE = (1024, 65535)
KERNEL_MAX_BYTES = 512 * 1024 * 1024
INITRD_MAX_BYTES = 2 * 1024 * 1024 * 1024


def name(value: str, what: str = "VM name") -> str:
    """A VM or image name: 1-63 of ``A-Z a-z 0-9 . _ -``, starting alphanumeric."""
    if not (0 < len(value) <= NAME_MAX and _NAME_RE.fullmatch(value)):
        raise InvalidArgument(
            f"invalid {what} {value!r}: use 1-{NAME_MAX} letters, digits, '.', "
            "'_' or '-', starting with a letter or digit"
        )
    return value


def cmdline(value: str) -> str:
    """A kernel command line: printable ASCII on one line, within the kernel's limit."""
    if len(value) > CMDLINE_MAX:
        raise InvalidArgument(
            f"kernel command line is {len(value)} characters; the kernel takes at "
            f"most {CMDLINE_MAX}"
        )
    for char in value:
        if not " " <= char <= "~":
            raise InvalidArgument(
                f"kernel command line contains {char!r}: only printable ASCII on one "
                "line is allowed"
            )
    return value


PATH_MAX = 4096


def hint_path(value: str, what: str) -> str:
    """A client-side path kept as a hint ("" for none); kdlabd never opens it."""
    if not value:
        return value
    if len(value) > PATH_MAX or not value.startswith("/"):
        raise InvalidArgument(
            f"{what} must be an absolute path of at most {PATH_MAX} bytes"
        )
    if any(not " " <= char <= "~" for char in value):
        raise InvalidArgument(f"{what} must be printable ASCII")
    return value


def initramfs(value: str) -> str:
    """A VM's initramfs: one of :data:`kdlab.wire.INITRAMFS_VALUES`."""
    if value not in wire.INITRAMFS_VALUES:
        raise InvalidArgument(
            f"initramfs must be one of {', '.join(map(repr, wire.INITRAMFS_VALUES))}"
            f", not {value!r}"
        )
    return value


def shares(value: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A VM's shares (tag -> the owner's directory), in tag order.

    At most :data:`kdlab.wire.SHARES_MAX`; each tag 1-36 of ``A-Z a-z 0-9 _ .
    -`` (virtiofs's limit) and not "." or ".." (the guest mounts it at
    /mnt/TAG); each directory an absolute path of printable characters of at
    most :data:`PATH_MAX` bytes. kdlabd never opens it.
    """
    if len(value) > wire.SHARES_MAX:
        raise InvalidArgument(
            f"{len(value)} shares: a VM may have at most {wire.SHARES_MAX}"
        )
    for tag, directory in value.items():
        if not wire.SHARE_TAG.fullmatch(tag) or tag in (".", ".."):
            raise InvalidArgument(
                f"invalid share tag {tag!r}: use 1-36 letters, digits, '_', '.' "
                "or '-' (not '.' or '..')"
            )
        if (
            not directory.startswith("/")
            or len(directory.encode()) > PATH_MAX
            or not directory.isprintable()
        ):
            raise InvalidArgument(
                f"the directory of share {tag!r} must be an absolute path of "
                f"printable characters, at most {PATH_MAX} bytes"
            )
    return tuple(sorted(value.items()))


def on_panic(value: str) -> str:
    """A VM's on_panic: one of :data:`kdlab.wire.ON_PANIC_VALUES`."""
    if value not in wire.ON_PANIC_VALUES:
        raise InvalidArgument(
            f"on_panic must be one of {', '.join(wire.ON_PANIC_VALUES)}, not {value!r}"
        )
    return value


def in_range(value: int, bounds: tuple[int, int], what: str) -> int:
    """An integer option within inclusive *bounds*."""
    low, high = bounds
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise InvalidArgument(
            f"{what} must be an integer from {low} to {high}, not {value!r}"
        )
    return value


DISK_BYTES_RANGE = (1024 * 1024, 16 * 1024**4)
# virtio disks are vda..vdz: the image's overlay, then at most 25 others. How
# many a caller may have is a limit (kdlabd.core.limits), at most this.
MAX_EXTRA_DISKS = 25


def disk_size(value: int, what: str = "disk size") -> int:
    """A disk or image size in bytes: 1 MiB to 16 TiB."""
    return in_range(value, DISK_BYTES_RANGE, f"{what} (bytes)")


def memory_mib(value: int) -> int:
    return in_range(value, MEMORY_MIB_RANGE, "memory (MiB)")


def vcpus(value: int) -> int:
    return in_range(value, VCPUS_RANGE, "number of vCPUs")


def tcp_port(value: int) -> int:
    return in_range(value, TCP_PORT_RANGE, "gdb TCP port")


def readable_file(files: CallerFiles, fd: int | None, what: str, max_bytes: int) -> int:
    """A descriptor passed by a client: an open, readable, non-empty regular file.

    Returns its size. Directories, FIFOs, sockets, devices and write-only
    descriptors are refused before a byte is read. *files* looks at it (in
    the thread this is called in: see :mod:`kdlabd.core.host`).
    """
    if fd is None:  # dbus-next's value for a descriptor that did not arrive
        raise InvalidArgument(f"{what}: no file descriptor came with the call")
    try:
        info = files.describe(fd)
    except OSError as err:
        raise InvalidArgument(
            f"{what}: not an open file descriptor ({err.strerror})"
        ) from None
    if not info.regular:
        raise InvalidArgument(f"{what} must be a regular file")
    if not info.readable:
        raise InvalidArgument(f"{what}: the descriptor is not open for reading")
    if info.size == 0:
        raise InvalidArgument(f"{what} is empty")
    if info.size > max_bytes:
        raise InvalidArgument(
            f"{what} is {info.size} bytes; at most {max_bytes} are accepted"
        )
    return info.size


_ELF_MAGIC = b"\x7fELF"
# The x86 boot protocol puts "HdrS" at offset 0x202 of a bzImage.
_BZIMAGE_MAGIC_OFFSET = 0x202
_BZIMAGE_MAGIC = b"HdrS"


def kernel_image(header: bytes) -> None:
    """The first bytes of a kernel file: it must be an x86 bzImage."""
    if header.startswith(_ELF_MAGIC):
        raise InvalidArgument(
            "the kernel is an ELF file (vmlinux?): pass arch/x86/boot/bzImage as the "
            "kernel; vmlinux is what gdb reads (--vmlinux)"
        )
    magic = header[_BZIMAGE_MAGIC_OFFSET : _BZIMAGE_MAGIC_OFFSET + len(_BZIMAGE_MAGIC)]
    if magic != _BZIMAGE_MAGIC:
        raise InvalidArgument(
            "the kernel is not an x86 bzImage: pass arch/x86/boot/bzImage or a "
            "distribution's /boot/vmlinuz-* file"
        )


def release(value: str) -> str:
    """The release a kernel announces ("" for none): it names debug paths."""
    if value and not is_safe_release(value):
        raise InvalidArgument(
            f"the kernel announces the release {value!r}: kdlab takes 1-{RELEASE_MAX} "
            "letters, digits, '.', '_', '-' or '+' without '..' (set another "
            "CONFIG_LOCALVERSION and rebuild)"
        )
    return value


IMAGE_MAX_BYTES = 64 * 1024**3
_QCOW2_MAGIC = b"QFI\xfb"
# qcow2 incompatible feature bit 2: the guest data lives in an external file.
_QCOW2_EXTERNAL_DATA = 1 << 2


def image_source(files: CallerFiles, fd: int, limits: Limits) -> ImageSource:
    """An image file to import: raw, or a self-contained qcow2.

    This judges the bytes offered, for an early and clear answer; what counts
    is the judgement of the bytes stored (:func:`stored_image`), because the
    caller may rewrite the file while it is uploaded. Its virtual size (a raw
    file's size) is at most the disk size limit.
    """
    size = readable_file(files, fd, "image", IMAGE_MAX_BYTES)
    fmt, capacity = image_header(files.read_header(fd, IMAGE_HEADER_BYTES), size)
    limits.disk(capacity, "the image's virtual size")
    return ImageSource(fd, size, fmt, capacity)


IMAGE_HEADER_BYTES = 104


def image_header(header: bytes, size: int) -> tuple[ImageFormat, int]:
    """The format and virtual size an image's first bytes declare.

    A qcow2 that names a backing file or an external data file is refused:
    QEMU would open that path (anywhere on the host) when a VM boots from it.
    Anything else is raw, of *size* bytes.
    """
    if not header.startswith(_QCOW2_MAGIC):
        return ImageFormat.RAW, size
    if len(header) < 32:
        raise InvalidArgument("the image has a truncated qcow2 header")
    version, backing_offset, _, _, virtual_size = struct.unpack_from(
        ">IQIIQ", header, 4
    )
    if version not in (2, 3):
        raise InvalidArgument(f"qcow2 version {version} is not supported (2 or 3)")
    if backing_offset:
        raise InvalidArgument(
            "the qcow2 image has a backing file: import a self-contained image "
            "(qemu-img convert -O qcow2 IN OUT flattens it)"
        )
    if version == 3 and len(header) >= 80:
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        if incompatible & _QCOW2_EXTERNAL_DATA:
            raise InvalidArgument("the qcow2 image keeps its data in an external file")
    if virtual_size <= 0:
        raise InvalidArgument("the qcow2 image has a virtual size of 0")
    return ImageFormat.QCOW2, virtual_size


def stored_image(stored: StoredImage, expected: ImageFormat, limits: Limits) -> None:
    """Judge an image as it was stored in the pool, not as it was offered.

    *stored* is what the hypervisor found in the volume after the bytes came
    in: the header kdlab parses itself, the format libvirt probes when it
    refreshes the pool (what a VM's overlay would be told), and qemu-img's
    view. Anything but a self-contained image of the *expected* format is
    refused, so a file rewritten after it was checked cannot smuggle in a
    backing file (another user's file, /etc/shadow, a host block device).
    """
    fmt, _ = image_header(stored.header, stored.virtual_size)
    seen = {fmt.value, stored.probed_format} | (
        {stored.tool_format} if stored.tool_format else set()
    )
    if seen != {expected.value}:
        raise InvalidArgument(
            f"the image was offered as {expected.value} but its stored bytes read "
            f"as {' and '.join(sorted(seen - {expected.value}))}: kdlab imports "
            "raw images and self-contained qcow2 images, and the file must not "
            "change while it is imported"
        )
    if stored.backing:
        raise InvalidArgument(
            f"the stored image names a backing file ({stored.backing!r}): import "
            "a self-contained image (qemu-img convert -O qcow2 IN OUT flattens it)"
        )
    if stored.data_file:
        raise InvalidArgument("the stored image keeps its data in an external file")
    if not 0 < stored.virtual_size <= DISK_BYTES_RANGE[1]:
        raise InvalidArgument(
            f"the stored image has a virtual size of {stored.virtual_size} bytes; "
            f"at most {DISK_BYTES_RANGE[1]} are accepted"
        )
    limits.disk(stored.virtual_size, "the stored image's virtual size")


# Root file system builds (kdlabd.core.rootfs.RootfsSpec).

MIB = 1024 * 1024
GIB = 1024 * MIB
ROOTFS_SIZE_RANGE = (512 * MIB, 1024 * GIB)
MAX_PACKAGES = 200
DEBIAN_MIRROR = "http://deb.debian.org/debian"
_SUITE = re.compile(r"[a-z][a-z0-9-]{1,30}")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MIRROR = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%+/-]*)?")
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def _matched(pattern: re.Pattern[str], value: object, refusal: str) -> str:
    """*value*, if it is text that *pattern* matches whole; else InvalidArgument."""
    if not (isinstance(value, str) and pattern.fullmatch(value)):
        raise InvalidArgument(refusal)
    return value


def debian_suite(suite: object) -> str:
    """A Debian suite's codename, as debootstrap names its scripts."""
    return _matched(
        _SUITE,
        suite,
        f"invalid Debian suite {suite!r}: use a codename such as 'bookworm' "
        "(2-31 of a-z, 0-9 and '-', starting with a letter)",
    )


def rootfs_size(size: object) -> int:
    """A built image's size: a whole number of MiB from 512 MiB to 1 TiB."""
    low, high = ROOTFS_SIZE_RANGE
    if (
        isinstance(size, bool)
        or not isinstance(size, int)
        or not low <= size <= high
        or size % MIB
    ):
        raise InvalidArgument(
            f"invalid image size {size!r}: give a whole number of MiB from "
            f"{low // MIB} MiB to {high // GIB} GiB"
        )
    return size


def debian_packages(packages: object) -> tuple[str, ...]:
    """Debian package names, sorted and without duplicates."""
    if isinstance(packages, str) or not isinstance(packages, Sequence):
        raise InvalidArgument("packages must be a list of Debian package names")
    for package in packages:
        _matched(
            _PACKAGE,
            package,
            f"invalid Debian package name {package!r}: use at least two of "
            "a-z, 0-9, '+', '-' and '.', starting with a letter or digit",
        )
    unique = tuple(sorted(set(packages)))
    if len(unique) > MAX_PACKAGES:
        raise InvalidArgument(
            f"at most {MAX_PACKAGES} extra packages, not {len(unique)}"
        )
    return unique


def ssh_public_key(key: object) -> str:
    """One public key, ``TYPE BASE64 [COMMENT]``, its blob of the type it claims.

    The text of a ``.pub`` file: a trailing newline is dropped; "" is no key.
    """
    if not isinstance(key, str):
        raise InvalidArgument("the SSH key must be text")
    key = key.removesuffix("\n")
    if not key:
        return ""
    how = "give the one line of a public key file such as ~/.ssh/id_ed25519.pub"
    if not key.isprintable():
        raise InvalidArgument(f"the SSH key must be a single printable line: {how}")
    kind, _, rest = key.partition(" ")
    blob, _, _comment = rest.partition(" ")
    if kind not in SSH_KEY_TYPES:
        raise InvalidArgument(
            f"the SSH key starts with {kind[:40]!r}, not a key type: {how} "
            f"(types: {', '.join(SSH_KEY_TYPES)}); options are not accepted"
        )
    if _blob_type(blob) != kind:
        raise InvalidArgument(f"the SSH key's base64 part is not a {kind} key: {how}")
    return key


def _blob_type(blob: str) -> str | None:
    """The key type written at the start of an OpenSSH key blob, if it is one."""
    try:
        data = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(data) < 4:
        return None
    (length,) = struct.unpack_from(">I", data)
    if len(data) < 4 + length:
        return None
    return data[4 : 4 + length].decode("ascii", "replace")


def hostname(value: object) -> str:
    """A guest's hostname."""
    return _matched(
        _HOSTNAME,
        value,
        f"invalid hostname {value!r}: use 1-63 of a-z, 0-9 and '-', "
        "not starting or ending with '-'",
    )


def debian_mirror(mirror: object) -> str:
    """An http(s) URL of a Debian mirror."""
    # http(s) only: a file:// mirror would have root's debootstrap read host paths.
    return _matched(
        _MIRROR,
        mirror,
        f"invalid Debian mirror {mirror!r}: give an http:// or https:// URL "
        f"such as {DEBIAN_MIRROR}",
    )
