"""Serial consoles shared by viewers, within limits.

The hypervisor gives one console session per VM. kdlabd holds that session
and hands every viewer its own socket (made by the host:
:meth:`kdlabd.core.host.Host.console_viewer`): output goes to all viewers,
input from any viewer goes to the VM, so two viewers never steal bytes from
each other.
A viewer that cannot keep up loses output (the per-boot log keeps it all)
rather than stall the VM or the other viewers.

Input is bounded the other way round: while the guest does not take what
was typed (a paused VM, ``cat /dev/zero | kdlabctl console``), kdlabd stops
reading its viewers, so their writes block in their own process instead of
piling up in kdlabd or in libvirtd. Every viewer holds a descriptor in
kdlabd, so viewers are counted per VM and per user
(``max_console_viewers_per_vm``, ``max_console_viewers_per_user``) and never
take kdlabd's reserve of descriptors (kdlabd.core.descriptors).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from kdlab.errors import InvalidState
from kdlabd.core import descriptors
from kdlabd.core.host import Host, Viewer
from kdlabd.core.hypervisor import ConsoleStream, Hypervisor
from kdlabd.core.limits import Limits

log = structlog.get_logger(__name__)

# Typed bytes the hypervisor has not taken yet; above this no viewer is read.
INPUT_BACKLOG_MAX = 64 * 1024
# How long shutdown waits for the sessions' hypervisor streams to close.
CLOSE_ALL_SECONDS = 4.0
# While viewers are not read, how often kdlabd looks for ones that went away.
HANGUP_CHECK_SECONDS = 0.5


class _Session:
    """One VM's console session and the viewers attached to it."""

    def __init__(
        self, name: str, host: Host, on_closed: Callable[[_Session], None]
    ) -> None:
        self.name = name
        self.stream: ConsoleStream | None = None
        self._host = host
        self._viewers: dict[Viewer, int] = {}  # and their uids
        self._on_closed = on_closed
        self._closed = False
        self._reading = True
        self._hangup_check: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def add_viewer(self, uid: int) -> int:
        def typed(data: bytes) -> None:
            self._typed(viewer, data)

        viewer, theirs = self._host.console_viewer(typed)
        self._viewers[viewer] = uid
        viewer.reading(self._reading)
        return theirs

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    def viewers_of(self, uid: int) -> int:
        return sum(owner == uid for owner in self._viewers.values())

    def output(self, data: bytes) -> None:
        """Console output: copy to every viewer; ``b""`` ends the session."""
        if not data:
            self.close()
            return
        for viewer in list(self._viewers):
            try:
                viewer.send(data)
            except BlockingIOError:
                log.debug("console.viewer_behind", vm=self.name, dropped=len(data))
            except OSError:
                self._drop(viewer)

    def sent(self) -> None:
        """The hypervisor took typed input: read the viewers again once it is low."""
        stream = self.stream
        if self._reading or self._closed or stream is None:
            return
        if stream.backlog <= INPUT_BACKLOG_MAX // 2:
            self._reading = True
            if self._hangup_check is not None:
                self._hangup_check.cancel()
                self._hangup_check = None
            for viewer in self._viewers:
                viewer.reading(True)

    def close(self) -> None:
        """Disconnect every viewer and hand the session back, once."""
        if self._closed:
            return
        self._closed = True
        if self._hangup_check is not None:
            self._hangup_check.cancel()
        for viewer in list(self._viewers):
            self._drop(viewer)
        self._on_closed(self)

    def _typed(self, viewer: Viewer, data: bytes) -> None:
        stream = self.stream
        if not data:
            self._drop(viewer)
        elif stream is not None:
            stream.send(data)
            if stream.backlog >= INPUT_BACKLOG_MAX and self._reading:
                log.debug("console.input_paused", vm=self.name, backlog=stream.backlog)
                self._reading = False
                for paused in self._viewers:
                    paused.reading(False)
                self._check_hangups()

    def _check_hangups(self) -> None:
        """Drop viewers that hung up while they are not read (a detach on a
        paused VM): their unread input is moot, and they count against limits."""
        self._hangup_check = None
        if self._reading or self._closed:
            return
        for gone in [viewer for viewer in self._viewers if viewer.hung_up()]:
            self._drop(gone)
        if not self._closed:
            self._hangup_check = self._loop.call_later(
                HANGUP_CHECK_SECONDS, self._check_hangups
            )

    def _drop(self, viewer: Viewer) -> None:
        if self._viewers.pop(viewer, None) is None:
            return
        viewer.close()
        if not self._viewers:
            self.close()


class ConsoleHub:
    """Console sessions by VM name, opened on first viewer, closed after the last."""

    def __init__(
        self, hypervisor: Hypervisor, host: Host, limits: Limits | None = None
    ) -> None:
        self._hv = hypervisor
        self._host = host
        self._limits = limits or Limits()
        self._sessions: dict[str, _Session] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def attach(self, name: str, uid: int) -> int:
        """A new viewer's socket for the console of the running VM *name*."""
        self._check_limits(name, uid)
        async with self._opening.setdefault(name, asyncio.Lock()):
            session = self._sessions.get(name)
            if session is None:
                session = _Session(name, self._host, self._session_closed)
                stream = await self._hv.open_console(name, session.output, session.sent)
                if session.closed:
                    self._close_stream(stream)
                    raise InvalidState(f"the console of VM {name!r} closed at once")
                session.stream = stream
                self._sessions[name] = session
                log.info("console.opened", vm=name)
            # Others may have attached while the session was opening.
            self._check_limits(name, uid)
            try:
                return session.add_viewer(uid)
            except BaseException:
                if not session.viewers:
                    session.close()
                raise

    def viewers(self, name: str) -> int:
        session = self._sessions.get(name)
        return 0 if session is None else session.viewers

    def close(self, name: str) -> None:
        """End the VM's console session (the VM stopped), disconnecting viewers."""
        session = self._sessions.get(name)
        if session is not None:
            session.close()

    def forget(self, name: str) -> None:
        """The VM is gone: end its session and drop what was kept for it."""
        self.close(name)
        self._opening.pop(name, None)

    async def close_all(self) -> None:
        """Shutting down: end every session and wait (a bounded time) for their
        streams to close."""
        for session in list(self._sessions.values()):
            session.close()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=CLOSE_ALL_SECONDS)

    def _check_limits(self, name: str, uid: int) -> None:
        descriptors.require(self._host.free_descriptors(), "a console viewer")
        session = self._sessions.get(name)
        on_vm = 0 if session is None else session.viewers
        mine = sum(s.viewers_of(uid) for s in self._sessions.values())
        self._limits.room_for_viewer(name, on_vm, uid, mine)

    def _session_closed(self, session: _Session) -> None:
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]
            log.info("console.closed", vm=session.name)
        if session.stream is not None:
            self._close_stream(session.stream)

    def _close_stream(self, stream: ConsoleStream) -> None:
        """Close *stream* in the background; shutdown waits for it (a bounded time)."""
        task = asyncio.get_running_loop().create_task(stream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
