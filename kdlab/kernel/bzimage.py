"""What a kernel image says about itself (the x86 boot protocol's setup header)."""

from __future__ import annotations

import struct

HEADER_BYTES = 64 * 1024
"""Enough of a bzImage for the header and its version string."""

# Documentation/arch/x86/boot.rst: kernel_version, at 0x20e, is the offset of
# the version string minus 0x200. (kdlabd.core.validate.kernel_image checks
# the magic.)
_VERSION_POINTER = 0x20E
_SETUP_BASE = 0x200


def bzimage_release(header: bytes) -> str:
    """The release (``uname -r``) a bzImage announces, or "" when it tells none."""
    if len(header) < _VERSION_POINTER + 2:
        return ""
    (pointer,) = struct.unpack_from("<H", header, _VERSION_POINTER)
    start = pointer + _SETUP_BASE
    if not pointer or start >= len(header):
        return ""
    version = header[start : header.find(b"\0", start, start + 512)]
    words = version.decode("ascii", "replace").split()
    # Only printable ASCII: the release goes into domain XML and on the bus.
    return "".join(c for c in words[0] if " " < c <= "~") if words else ""
