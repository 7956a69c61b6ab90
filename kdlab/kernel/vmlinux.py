"""What a vmlinux says about itself: its build ID, which names gdb's index of it.

gdb keys its index cache by the ELF build ID (the ``NT_GNU_BUILD_ID`` note
that ``ld --build-id``, which every kernel build passes, writes), so kdlabctl
reads it to know which cache entry belongs to which vmlinux. The notes are
found through the program headers, which sit at the start of the file: a
590 MB vmlinux is read only where its header and its notes are.
"""

from __future__ import annotations

import struct

HEADER_BYTES = 64 * 1024
"""Enough of an ELF file for its header and program headers."""

_ELF64_LSB = b"\x7fELF\x02\x01"  # ELFCLASS64, ELFDATA2LSB: x86_64's vmlinux
_PT_NOTE = 4
_NT_GNU_BUILD_ID = 3
_GNU = b"GNU\0"
# Elf64_Ehdr: e_phoff at 32, e_phentsize and e_phnum at 54 and 56.
_PHOFF = struct.Struct("<Q")
_PHENT = struct.Struct("<HH")
# Elf64_Phdr: p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz.
_PHDR = struct.Struct("<IIQQQQ")
_NOTE = struct.Struct("<III")  # namesz, descsz, type
NOTES_MAX = 1 << 20
"""Notes larger than this are not a kernel's (a corrupt or hostile header)."""


def note_segments(header: bytes) -> list[tuple[int, int]]:
    """(offset, size) in the file of each ``PT_NOTE`` segment of the ELF64
    little-endian file that begins with *header*; [] for anything else."""
    if not header.startswith(_ELF64_LSB) or len(header) < 64:
        return []
    (phoff,) = _PHOFF.unpack_from(header, 32)
    entry, count = _PHENT.unpack_from(header, 54)
    if entry < _PHDR.size or phoff + entry * count > len(header):
        return []
    found = []
    for index in range(count):
        kind, _, offset, _, _, size = _PHDR.unpack_from(header, phoff + index * entry)
        if kind == _PT_NOTE and 0 < size <= NOTES_MAX:
            found.append((offset, size))
    return found


def build_id(notes: bytes) -> str:
    """The GNU build ID in a note segment's bytes, in lowercase hex, or ""."""
    at = 0
    while at + _NOTE.size <= len(notes):
        name_size, desc_size, kind = _NOTE.unpack_from(notes, at)
        name_at = at + _NOTE.size
        desc_at = name_at + _aligned(name_size)
        end = desc_at + _aligned(desc_size)
        if end > len(notes):
            return ""
        name = notes[name_at : name_at + name_size]
        if kind == _NT_GNU_BUILD_ID and name == _GNU and desc_size:
            return notes[desc_at : desc_at + desc_size].hex()
        at = end
    return ""


def _aligned(size: int) -> int:
    """ELF notes pad names and descriptions to 4 bytes (on ELF64 too, in practice)."""
    return (size + 3) & ~3
