"""A command's streams between a guest and a caller: pipes read on the loop.

The command's output goes to the caller through a pipe kdlabd makes (the
caller reads the other end); its input comes from a pipe or socket the
caller passed. Neither ever blocks the loop: a full pipe makes the writer
wait for room, and an empty one the reader wait for bytes. Which bytes go
where, and the limits, are core's (:mod:`kdlabd.core.execs`).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import select
import stat

from kdlab.errors import InvalidArgument


class _Descriptor:
    """A non-blocking descriptor of kdlabd's, and whoever waits on it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._waiting: asyncio.Future[None] | None = None

    async def _ready(self, *, write: bool) -> None:
        """Wait until the descriptor is writable (or readable), or closed."""
        loop = asyncio.get_running_loop()
        fd = self._fd
        ready = self._waiting = loop.create_future()
        add, remove = (
            (loop.add_writer, loop.remove_writer)
            if write
            else (loop.add_reader, loop.remove_reader)
        )

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        add(fd, wake)
        try:
            await ready
        finally:
            self._waiting = None
            if self._fd >= 0:
                remove(fd)

    def close(self) -> None:
        """Close it; a waiter wakes and finds it closed."""
        if self._fd < 0:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._fd)
        loop.remove_writer(self._fd)
        os.close(self._fd)
        self._fd = -1
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)


class OutputPipe(_Descriptor):
    """kdlabd's (write) end of a pipe a caller reads (a
    :class:`kdlabd.core.host.OutputPipe`)."""

    @classmethod
    def make(cls) -> tuple[OutputPipe, int]:
        """A new pipe: kdlabd's end, and the read end to hand the caller."""
        theirs, ours = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(ours, False)
        return cls(ours), theirs

    async def write(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if self._fd < 0:
                return False
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                await self._ready(write=True)
            except OSError as err:
                if err.errno == errno.EPIPE:
                    return False
                raise
        return True

    def hung_up(self) -> bool:
        if self._fd < 0:
            return True
        poller = select.poll()
        poller.register(self._fd, 0)  # POLLERR comes when no reader is left
        return any(event & select.POLLERR for _fd, event in poller.poll(0))


class InputStream(_Descriptor):
    """A caller's pipe or socket, read on the loop: kdlabd's own duplicate of
    the descriptor (the call's copy is closed when the call ends)."""

    @classmethod
    def of(cls, fd: int) -> InputStream:
        """Take *fd*, which must be a readable pipe or stream socket."""
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise InvalidArgument(
                "stdin must be a pipe or a socket (pipe a file in, e.g. "
                "'kdlabctl exec VM -- cmd < file' does)"
            )
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            raise InvalidArgument("stdin is open only for writing")
        ours = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        # O_NONBLOCK is set on the open file, which the caller shares: a caller
        # passes a pipe or socket it does not read itself (kdlabctl's stdin).
        os.set_blocking(ours, False)
        return cls(ours)

    async def read(self, size: int) -> bytes:
        while self._fd >= 0:
            try:
                return os.read(self._fd, size)
            except BlockingIOError:
                await self._ready(write=False)
            except OSError:
                return b""  # a socket reset by its peer: the input ended
        return b""
