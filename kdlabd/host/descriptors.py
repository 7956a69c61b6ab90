"""Descriptors on this host: what a caller passed, and how many kdlabd has left.

The rules about them are core's (:mod:`kdlabd.core.validate`,
:mod:`kdlabd.core.descriptors`); this module only looks.
"""

from __future__ import annotations

import fcntl
import os
import resource
import stat

from kdlabd.core.descriptors import RESERVE
from kdlabd.core.host import FileFacts


class CallerDescriptors:
    """Looks at callers' descriptors with fstat, fcntl and pread (never open)."""

    def describe(self, fd: int) -> FileFacts:
        info = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        readable = not (flags & os.O_ACCMODE == os.O_WRONLY or flags & os.O_PATH)
        return FileFacts(stat.S_ISREG(info.st_mode), readable, info.st_size)

    def read_header(self, fd: int, size: int) -> bytes:
        return os.pread(fd, size, 0)


def free() -> int:
    """How many more descriptors kdlabd may open (its soft RLIMIT_NOFILE)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return RESERVE * 1024
    return soft - len(os.listdir("/proc/self/fd"))
