"""Small guest memory dumps made by hand, in the two formats QEMU writes.

The unit tier reads them with :mod:`kdlab.kernel.vmcore`; the bus tier puts
one in the test driver's dumps pool (libvirt's test driver cannot dump a
domain). The vm tier checks the layouts against dumps real QEMU wrote.
"""

from __future__ import annotations

import struct

from kdlab.kernel import vmcore

KDUMP_BLOCK = 4096
"""QEMU's kdump block size: the target's page size."""


def elf_core(info: str | None) -> bytes:
    """A minimal ELF64 core: a PT_NOTE segment with a VMCOREINFO note (none
    when *info* is None), then a page of zeros."""
    notes = b""
    if info is not None:
        name, desc = b"VMCOREINFO\0", info.encode()
        notes = struct.pack("<III", len(name), len(desc), 0) + _pad(name) + _pad(desc)
    header = bytearray(64)
    header[:6] = vmcore.ELF_MAGIC + b"\x02\x01"  # ELFCLASS64, little-endian
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 4)  # PT_NOTE
    struct.pack_into("<Q", phdr, 8, 64 + 56)  # p_offset
    struct.pack_into("<Q", phdr, 32, len(notes))  # p_filesz
    return bytes(header) + bytes(phdr) + notes + b"\0" * 4096


def kdump_core(info: str, release: str = "6.1.0-kdlab") -> bytes:
    """makedumpfile's headers as QEMU 7.2 writes them (``DiskDumpHeader64``
    and ``KdumpSubHeader64`` of its include/sysemu/dump.h, packed), with
    VMCOREINFO after the sub header. Written out field by field, not with
    vmcore.py's offsets, so that a wrong offset there fails."""
    utsname = b"".join(
        field.encode().ljust(65, b"\0")
        for field in ("Linux", "", release, "", "x86_64", "")
    )
    header = struct.pack(
        "<8sI390s22sII", vmcore.KDUMP_SIGNATURE, 6, utsname, b"", 0, KDUMP_BLOCK
    )
    # phys_base, dump_level, split, start_pfn, end_pfn, then VMCOREINFO's
    # offset and size.
    sub = struct.pack("<QIIQQQQ", 0, 1, 0, 0, 0, 2 * KDUMP_BLOCK, len(info))
    return (
        header.ljust(KDUMP_BLOCK, b"\0")
        + sub.ljust(KDUMP_BLOCK, b"\0")
        + info.encode()
        + b"\0"
    )


def flattened(data: bytes, chunk: int = 1000) -> bytes:
    """*data* as makedumpfile's flattened format, the way QEMU 7.2 writes a
    kdump-compressed dump to libvirt's descriptor: written out here, not with
    vmcore.py's constants. Records of *chunk* bytes, in reverse order (a
    reader must follow the offsets), then the end record."""
    header = b"makedumpfile\0".ljust(16, b"\0") + struct.pack(">qq", 1, 1)
    pieces = [(at, data[at : at + chunk]) for at in range(0, len(data), chunk)]
    records = b"".join(
        struct.pack(">qq", at, len(piece)) + piece for at, piece in reversed(pieces)
    )
    return header.ljust(4096, b"\0") + records + struct.pack(">qq", -1, 0)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)
