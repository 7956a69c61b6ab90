"""Serial consoles shared by any number of viewers.

The hypervisor gives one console session per VM. kdlabd holds that session
and hands every viewer its own socket: output goes to all viewers, input from
any viewer goes to the VM, so two viewers never steal bytes from each other.
A viewer that cannot keep up loses output (the per-boot log keeps it all)
rather than stall the VM or the other viewers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import structlog

from kdlabd.core.hypervisor import ConsoleStream, Hypervisor
from kdlabd.errors import InvalidState

log = structlog.get_logger(__name__)

_READ_SIZE = 4096


class _Session:
    """One VM's console session and the viewers attached to it."""

    def __init__(self, name: str, on_closed: Callable[[str], None]) -> None:
        self.name = name
        self.stream: ConsoleStream | None = None
        self._viewers: dict[int, socket.socket] = {}
        self._on_closed = on_closed
        self._closed = False
        self._loop = asyncio.get_running_loop()

    def add_viewer(self) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self._viewers[ours.fileno()] = ours
        self._loop.add_reader(ours.fileno(), self._typed, ours)
        return theirs.detach()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def output(self, data: bytes) -> None:
        """Console output: copy to every viewer; ``b""`` ends the session."""
        if not data:
            self.close()
            return
        for viewer in list(self._viewers.values()):
            try:
                viewer.send(data)
            except BlockingIOError:
                log.debug("console.viewer_behind", vm=self.name, dropped=len(data))
            except OSError:
                self._drop(viewer)

    def close(self) -> None:
        """Disconnect every viewer and close the console session, once."""
        if self._closed:
            return
        self._closed = True
        for viewer in list(self._viewers.values()):
            self._drop(viewer)
        if self.stream is not None:
            self.stream.close()
        self._on_closed(self.name)

    def _typed(self, viewer: socket.socket) -> None:
        try:
            data = viewer.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(viewer)
        elif self.stream is not None:
            self.stream.send(data)

    def _drop(self, viewer: socket.socket) -> None:
        fd = viewer.fileno()
        if self._viewers.pop(fd, None) is None:
            return
        self._loop.remove_reader(fd)
        viewer.close()
        if not self._viewers:
            self.close()


class ConsoleHub:
    """Console sessions by VM name, opened on first viewer, closed after the last."""

    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hv = hypervisor
        self._sessions: dict[str, _Session] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def attach(self, name: str) -> int:
        """A new viewer's socket for the console of the running VM *name*."""
        async with self._opening.setdefault(name, asyncio.Lock()):
            session = self._sessions.get(name)
            if session is None:
                session = _Session(name, self._session_closed)
                session.stream = await self._hv.open_console(name, session.output)
                if session.closed:
                    raise InvalidState(f"the console of VM {name!r} closed at once")
                self._sessions[name] = session
                log.info("console.opened", vm=name)
            return session.add_viewer()

    def viewers(self, name: str) -> int:
        session = self._sessions.get(name)
        return 0 if session is None else session.viewers

    def close(self, name: str) -> None:
        """End the VM's console session (the VM stopped), disconnecting viewers."""
        session = self._sessions.get(name)
        if session is not None:
            session.close()

    def _session_closed(self, name: str) -> None:
        if self._sessions.pop(name, None) is not None:
            log.info("console.closed", vm=name)
