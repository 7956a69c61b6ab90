"""Console viewers' connections: one socket pair each, read on the event loop.

The session logic (fan-out, limits, the input bound) is core's
(:mod:`kdlabd.core.consoles`); this is the socket under one viewer.
"""

from __future__ import annotations

import asyncio
import select
import socket

from kdlabd.core.host import ViewerInput

_READ_SIZE = 4096


class SocketViewer:
    """kdlabd's end of a viewer's socket pair (a :class:`kdlabd.core.host.Viewer`)."""

    def __init__(self, sock: socket.socket, typed: ViewerInput) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._typed = typed
        self._loop = asyncio.get_running_loop()
        self._reading = False

    @classmethod
    def pair(cls, typed: ViewerInput) -> tuple[SocketViewer, int]:
        """A new viewer, not read yet, and the descriptor of the viewer's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        return cls(ours, typed), theirs.detach()

    def send(self, data: bytes) -> None:
        self._sock.send(data)

    def reading(self, on: bool) -> None:
        if on == self._reading or self._sock.fileno() < 0:
            return
        self._reading = on
        if on:
            self._loop.add_reader(self._fd, self._ready)
        else:
            self._loop.remove_reader(self._fd)

    def _ready(self) -> None:
        try:
            data = self._sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._typed(data)

    def hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP)
        return bool(poller.poll(0))  # POLLHUP and POLLERR come anyway

    def close(self) -> None:
        self.reading(False)
        self._sock.close()
