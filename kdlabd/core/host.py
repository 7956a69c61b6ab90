"""The seam between kdlab's use cases and the machine kdlabd runs on.

Core opens no socket, starts no process and reads no file: what it needs of
its host goes through :class:`Host` (:mod:`kdlabd.host.local` implements it;
image builds have their own port, :mod:`kdlabd.core.builder`). Methods marked
"blocks" are called in worker threads within time limits
(:mod:`kdlabd.core.blocking`): a caller's file, or a log file, may sit on a
filesystem that does not answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class FileFacts:
    """What a caller's descriptor is, as known before a byte of it is read."""

    regular: bool
    """A regular file: not a directory, FIFO, socket or device."""
    readable: bool
    """Open for reading (not write-only, not an ``O_PATH`` descriptor)."""
    size: int


@dataclass(frozen=True)
class Listener:
    """A listening unix socket kdlabd bound and handed over: what tells it
    again later without connecting (a connection would take the one its
    server answers)."""

    path: Path
    file: tuple[int, int]
    """The device and inode of the socket's file at *path*."""
    socket: int
    """The socket's own inode (``/proc/net/unix``'s), while any process holds it."""


Address = str | tuple[str, int]
"""A stream socket's address: a unix socket's path, or (host, TCP port)."""

ViewerInput = Callable[[bytes], None]
"""Receives, on the loop, what a console viewer typed; ``b""`` when it left."""


class Viewer(Protocol):
    """kdlabd's end of one console viewer's connection, used on the loop."""

    def send(self, data: bytes) -> None:
        """Copy console output to the viewer without blocking.

        Raises BlockingIOError when the viewer is behind (it misses *data*)
        and OSError when it is gone.
        """

    def reading(self, on: bool) -> None:
        """Start or stop reading what the viewer types."""

    def hung_up(self) -> bool:
        """Whether the viewer hung up (seen even while it is not read)."""

    def close(self) -> None:
        """Stop reading and close kdlabd's end: the viewer sees the end."""


class OutputPipe(Protocol):
    """kdlabd's end of a pipe a caller reads (a command's output), on the loop."""

    async def write(self, data: bytes) -> bool:
        """Write all of *data*, waiting while the pipe is full; False (and
        *data* dropped) once the reader is gone or the pipe was closed."""

    def hung_up(self) -> bool:
        """Whether the reader is gone (seen without writing)."""

    def close(self) -> None:
        """Close kdlabd's end: the reader sees the end; a writer wakes."""


class InputStream(Protocol):
    """A pipe or socket a caller passed to be read (a command's input)."""

    async def read(self, size: int) -> bytes:
        """At most *size* bytes, waiting for some; ``b""`` at the end."""

    def close(self) -> None:
        """Close kdlabd's copy; a reader wakes with ``b""``."""


class CallerFiles(Protocol):
    """Looks at descriptors callers pass; kdlabd never opens a caller's path."""

    def describe(self, fd: int) -> FileFacts:
        """What *fd* is; OSError if it is not an open descriptor. Blocks."""

    def read_header(self, fd: int, size: int) -> bytes:
        """The first *size* bytes of *fd* (fewer if it is shorter). Blocks."""


class Host(CallerFiles, Protocol):
    """What kdlabd does on its host besides the hypervisor's and builds' work."""

    def free_descriptors(self) -> int:
        """How many more descriptors kdlabd may open."""

    def console_viewer(self, typed: ViewerInput) -> tuple[Viewer, int]:
        """A new viewer's connection: kdlabd's end, and the descriptor to hand
        the viewer (the caller's to keep)."""

    async def connect(self, address: Address, *, seconds: float, what: str) -> int:
        """A stream socket connected to *address*, for the caller to keep.

        Raises OSError, or :class:`~kdlabd.core.blocking.Unanswered` after
        *seconds* (*what* names the attempt in the log).
        """

    async def open_stream(
        self, address: Address, *, seconds: float, what: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An asyncio stream on a connection to *address* (see :meth:`connect`)."""

    def output_pipe(self) -> tuple[OutputPipe, int]:
        """A new pipe: kdlabd's end, and the read end to hand a caller."""

    def input_stream(self, fd: int) -> InputStream:
        """kdlabd's own copy of the caller's *fd* to read from; InvalidArgument
        unless it is a readable pipe or stream socket."""

    async def listen_for_qemu(
        self, path: Path, *, seconds: float, what: str
    ) -> tuple[int, Listener]:
        """A unix stream socket listening at *path*, for the caller to keep,
        and what identifies it. What was at *path* is replaced; *path*'s
        directory and its parent are made so that only root and the QEMU user
        may enter them, and the socket so that only they may connect.

        Raises OSError, or :class:`~kdlabd.core.blocking.Unanswered` after
        *seconds* (*what* names the attempt in the log).
        """

    def listens(self, listener: Listener) -> bool:
        """Whether *listener*'s socket is still the one at its path and some
        process still holds it listening. Blocks."""

    def open_read_only(self, path: Path) -> int:
        """A read-only descriptor of kdlabd's file *path*, for a caller. Blocks."""

    def read_excerpt(self, path: Path, head: int, tail: int) -> str:
        """The text of *path*, or only its first *head* and last *tail* bytes
        (joined by a newline) when it is longer. Blocks."""

    def read_range(self, path: Path, offset: int, size: int) -> bytes:
        """At most *size* bytes of kdlabd's file *path* from *offset*. Blocks."""

    def file_size(self, path: Path) -> int:
        """The size of kdlabd's file *path*. Blocks."""

    def write_atomically(self, path: Path, data: bytes) -> None:
        """Make *path* hold *data*, whole or not at all, even across a crash
        (a temporary file, synced, renamed). Blocks."""

    def remove_file(self, path: Path) -> None:
        """Remove kdlabd's file *path* (FileNotFoundError if there is none)."""

    def digest(self, path: Path) -> str:
        """The SHA-256 of kdlabd's own file *path* (a staged kernel), in hex."""

    def has_file(self, path: Path) -> bool:
        """Whether kdlabd's file *path* exists."""

    def move(self, path: Path, new: Path) -> None:
        """Rename *path* to *new* (FileNotFoundError if there is no *path*)."""

    def make_private_dir(self, path: Path) -> None:
        """Make the directory *path* (and its parents), only root's to enter."""

    def names(self, path: Path) -> list[str]:
        """The names in the directory *path*; none if it does not exist."""

    def remove_tree(self, path: Path) -> None:
        """Remove *path* and all below it, as far as possible."""
