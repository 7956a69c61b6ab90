"""What a guest memory dump says about its kernel: the VMCOREINFO note.

QEMU's memory-only dumps (``dump-guest-memory``, libvirt's
``virDomainCoreDumpWithFormat``) carry the guest kernel's VMCOREINFO when the
guest told QEMU where it is (the ``vmcoreinfo`` device, written by Linux's
``qemu_fw_cfg`` driver, CONFIG_FW_CFG_SYSFS). Its lines (``OSRELEASE=``,
``BUILD-ID=`` since Linux 5.9, ``SYMBOL(...)=``) are what drgn and crash need
to read the dump without guessing. Two formats are read:

- ELF cores: the note of name ``VMCOREINFO`` in a ``PT_NOTE`` segment;
- makedumpfile's kdump-compressed format (QEMU's ``kdump-zlib``): the sub
  header's ``offset_vmcoreinfo``/``size_vmcoreinfo`` (QEMU's
  ``DiskDumpHeader64``/``KdumpSubHeader64``, little-endian on x86). QEMU
  before 8.2 writes it *flattened* (as ``makedumpfile -F`` does, for a
  pipe): a header, then records of (offset, size, bytes) that place the
  bytes in the real file; it is read through :func:`flat_records`.

Stdlib-only and pure: the caller gives a function that reads bytes of the
file, so both kdlabd (its own volume) and kdlabctl can use it.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator

Read = Callable[[int, int], bytes]
"""Reads *size* bytes at *offset* (fewer at the end of the file)."""

ELF_MAGIC = b"\x7fELF"
KDUMP_SIGNATURE = b"KDUMP   "
FLAT_SIGNATURE = b"makedumpfile\0"
"""How a flattened dump starts (its header is FLAT_HEADER_SIZE bytes)."""
FLAT_HEADER_SIZE = 4096
FLAT_RECORD = struct.Struct(">qq")
"""A flattened dump's record header: the offset in the real file and the size
of the bytes that follow, big-endian; an offset of -1 ends the dump."""
_FLAT_RECORDS_READ = 1024  # VMCOREINFO is in the first few records
_PT_NOTE = 4
# QEMU's DiskDumpHeader64 (packed): signature[8], header_version u32,
# utsname (6 x 65 bytes), timestamp[22], status u32, block_size u32, ...
# (makedumpfile's has a struct timeval there; QEMU writes 22 bytes of zeros).
KDUMP_BLOCK_SIZE_AT = 8 + 4 + 6 * 65 + 22 + 4
"""Where a kdump-compressed dump's header holds its block size (428)."""
# KdumpSubHeader64, one block in: phys_base u64, dump_level u32, split u32,
# start_pfn u64, end_pfn u64, offset_vmcoreinfo u64, size_vmcoreinfo u64;
# the offset is the VMCOREINFO note's text (its descriptor).
KDUMP_VMCOREINFO_AT = 8 + 4 + 4 + 8 + 8
"""Where the sub header holds VMCOREINFO's offset and size (32)."""
_MAX_NOTES = 16 << 20  # a note segment larger than this is no dump kdlab wrote
_MAX_VMCOREINFO = 1 << 20


def vmcoreinfo(read: Read) -> str | None:
    """The VMCOREINFO text of the dump *read* reads; None when it has none."""
    head = read(0, 4096)
    if head.startswith(FLAT_SIGNATURE):
        read = _unflattened(read)
        head = read(0, 4096)
    if head.startswith(ELF_MAGIC):
        return _elf_vmcoreinfo(read, head)
    if head.startswith(KDUMP_SIGNATURE):
        return _kdump_vmcoreinfo(read, head)
    return None


def flat_records(
    read: Read, limit: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """The records of a flattened dump, in order: (offset in the real file,
    size, where the bytes are in the flattened one); at most *limit*. Raises
    ValueError on a record that cannot be (the dump is cut short or no
    flattened dump)."""
    at, count = FLAT_HEADER_SIZE, 0
    while limit is None or count < limit:
        record = read(at, FLAT_RECORD.size)
        if len(record) < FLAT_RECORD.size:
            raise ValueError(f"the flattened dump ends before its end, at {at}")
        offset, size = FLAT_RECORD.unpack(record)
        if offset == -1:
            return
        if offset < 0 or size < 0:
            raise ValueError(f"the flattened dump has a bad record at {at}")
        at += FLAT_RECORD.size
        yield offset, size, at
        at += size
        count += 1


def _unflattened(read: Read) -> Read:
    """A reader of the real file a flattened dump describes, from its first
    records (where the headers and VMCOREINFO are); what they do not cover
    reads as missing."""
    records = []
    with contextlib.suppress(ValueError):
        records = list(flat_records(read, _FLAT_RECORDS_READ))

    def unflattened(offset: int, size: int) -> bytes:
        data = bytearray()
        while size > 0:
            found = [(o, n, at) for o, n, at in records if o <= offset < o + n]
            if not found:
                break
            start, length, at = found[-1]  # a later record wins, as on disk
            part = read(at + offset - start, min(size, start + length - offset))
            if not part:
                break
            data += part
            offset, size = offset + len(part), size - len(part)
        return bytes(data)

    return unflattened


def dump_format(head: bytes) -> str:
    """``elf``, ``kdump`` or ``""`` for the first bytes of a dump."""
    if head.startswith(ELF_MAGIC):
        return "elf"
    if head.startswith((KDUMP_SIGNATURE, FLAT_SIGNATURE)):
        return "kdump"
    return ""


def fields(info: str) -> dict[str, str]:
    """VMCOREINFO's ``KEY=value`` lines as a mapping (the first of each key)."""
    found: dict[str, str] = {}
    for line in info.splitlines():
        key, eq, value = line.partition("=")
        if eq and key not in found:
            found[key] = value
    return found


def build_id(info: str) -> str:
    """The kernel's GNU build ID (lowercase hex) from VMCOREINFO, or ""."""
    value = fields(info).get("BUILD-ID", "").strip().lower()
    return value if value and all(c in "0123456789abcdef" for c in value) else ""


def release(info: str) -> str:
    """The kernel release (``uname -r``) from VMCOREINFO, or ""."""
    return fields(info).get("OSRELEASE", "").strip()


def _elf_vmcoreinfo(read: Read, head: bytes) -> str | None:
    if len(head) < 64 or head[4] != 2 or head[5] != 1:  # ELFCLASS64, little-endian
        return None
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    if phentsize < 56 or phnum == 0:
        return None
    # PN_XNUM (0xffff) dumps have the real count elsewhere; the notes come
    # first in QEMU's dumps, so the first entries are enough.
    table = read(phoff, phentsize * min(phnum, 64))
    for index in range(len(table) // phentsize):
        (p_type,) = struct.unpack_from("<I", table, index * phentsize)
        if p_type != _PT_NOTE:
            continue
        (offset,) = struct.unpack_from("<Q", table, index * phentsize + 8)
        (size,) = struct.unpack_from("<Q", table, index * phentsize + 32)
        found = _note(read(offset, min(size, _MAX_NOTES)), b"VMCOREINFO")
        if found is not None:
            return found
    return None


def _note(notes: bytes, wanted: bytes) -> str | None:
    """The text of the first note called *wanted* in an ELF note segment."""
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, _type = struct.unpack_from("<III", notes, at)
        name_at = at + 12
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if end > len(notes):
            return None
        if notes[name_at : name_at + namesz].rstrip(b"\0") == wanted:
            return _text(notes[desc_at : desc_at + descsz])
        at = end
    return None


def _kdump_vmcoreinfo(read: Read, head: bytes) -> str | None:
    if len(head) < KDUMP_BLOCK_SIZE_AT + 4:
        return None
    (block_size,) = struct.unpack_from("<I", head, KDUMP_BLOCK_SIZE_AT)
    if not 512 <= block_size <= 1 << 20:
        return None
    sub = read(block_size, KDUMP_VMCOREINFO_AT + 16)
    if len(sub) < KDUMP_VMCOREINFO_AT + 16:
        return None
    offset, size = struct.unpack_from("<QQ", sub, KDUMP_VMCOREINFO_AT)
    if offset == 0 or size == 0 or size > _MAX_VMCOREINFO:
        return None
    return _text(read(offset, size))


def _text(data: bytes) -> str | None:
    text = data.split(b"\0", 1)[0].decode("ascii", errors="replace")
    return text if "OSRELEASE=" in text else None


def _align4(size: int) -> int:
    return (size + 3) & ~3
