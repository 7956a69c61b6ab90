"""kdlabctl against kdlabd on another host: its D-Bus connection over ssh.

``kdlabctl --host HOST COMMAND`` runs the whole command here: files named on
the command line are read here, gdb and the terminal are this machine's,
``up`` builds here. Only the bus is the host's. kdlabctl starts ssh with
``kdlabctl --bus BUS __bridge`` on the host (the *back*), and serves a unix
socket in a directory only its user may enter (the *front*, a thread of the
local kdlabctl); the command's bus is that socket. Each connection to it
becomes one connection of the back to the host's bus, as the ssh user: the
host's kdlabd authorizes that uid, as for any local caller there. Messages
are relayed as they are (serials, names, errors); descriptors in them cross
as well, each as a channel of its own:

- a regular file (a kernel, an image, a dump, a console log) is streamed and
  spooled into an anonymous file on the other side, which the message
  carries instead; a file that grows (a log being written) keeps growing
  there, and its new bytes are sent before every later message, so a signal
  never overtakes what was written before it;
- the read or write end of a pipe, or a connected stream socket (a gdbstub,
  a console, a command's output), is relayed as it is used, both ways, with
  end-of-file passed on (a socket's ``shutdown``).

Anything else (a listening socket, a terminal) cannot cross: a call that
passes one is refused, a reply that carries one becomes an error.

The protocol, over ssh's stdin and stdout. The back writes :data:`MAGIC`
first (what a login shell prints before it is skipped), then frames with
the exec agent's 12-byte header (:mod:`kdlab.agent.protocol`: length,
channel, type, flags; at most 64 KiB of payload):

- HELLO (back, channel 0): JSON ``protocol``, ``uid``, ``user``,
  ``hostname``, ``version`` (kdlab's), ``bus_error`` (why the host's bus
  cannot be reached, or empty).
- CONNECT (front): a new D-Bus connection on the channel; the back answers
  CONNECTED once it is authenticated to its bus, or CLOSE with the reason.
- OPEN ``u8 kind``: a descriptor of the next MESSAGE (:class:`Kind`).
- MESSAGE: ``u16 count, count x u32 channel``, then the D-Bus message's
  bytes; flag MORE: the payload continues in the next MESSAGE frame.
- DATA, EOF (this direction ended), SYNC (a file's content as it was when
  sent is all there), ACK ``u32 bytes`` (consumed: credit given back),
  CLOSE (the channel is gone; payload: why).

Flow control is the agent's: at most :data:`WINDOW` unacknowledged bytes
per channel and direction, so a reader that does not read holds back only
its own stream. Channels the front opens are odd, the back's even.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import fcntl
import json
import os
import pwd
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from kdlab.agent.protocol import HEADER, HEADER_SIZE, MAX_PAYLOAD
from kdlabctl import quickbus

PROTOCOL = 1
MAGIC = b"\0KDLAB-BRIDGE-1\0"
MAGIC_SEARCH = 65536  # what may come before MAGIC (a login shell's words)
WINDOW = 256 * 1024
MORE = 1
FOLLOW_SECONDS = 0.5
CONNECT_SECONDS = 25.0
LINGER_SECONDS = 5.0
_MAX_FDS = 253  # SCM_MAX_FD
_BACKLOG_MESSAGES = 64
# What may wait for a local client that does not read (dbus-daemon's default
# max_incoming_bytes): beyond, its connection is closed.
_MAX_UNREAD = 1 << 27
# Descriptors of the other side's this side holds at once (each one or two of
# ours): far more than any command passes, far fewer than a process may have.
_MAX_HELD = 256
_LEFT: tuple[bytes, list[int]] = (b"", [])  # in a queue: the connection closed
_MAX_MESSAGE_FRAMES = (
    (1 << 27) + 2 + _MAX_FDS * 4
)  # a D-Bus message, its channels  # a connection's messages waiting for the channel
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_REFUSED = "org.kdlab.Kdlab1.Error.InvalidArgument"
_NO_REPLY_EXPECTED = 0x1


class Frame(enum.IntEnum):
    HELLO = 1
    CONNECT = 2
    CONNECTED = 3
    OPEN = 4
    MESSAGE = 5
    DATA = 6
    EOF = 7
    SYNC = 8
    ACK = 9
    CLOSE = 10


class Kind(enum.IntEnum):
    """What a descriptor is, from the side that had it."""

    FILE = 1  # a regular file: streamed, spooled on the other side
    READER = 2  # a pipe's read end: what comes out of it crosses
    WRITER = 3  # a pipe's write end: what is written on the other side crosses
    SOCKET = 4  # a connected stream socket: both ways


class Unreachable(Exception):
    """The host, or kdlabctl on it, could not be reached (exit 69)."""


class Refused(Exception):
    """A descriptor that cannot cross hosts."""


@dataclass(frozen=True)
class RemoteInfo:
    """Who the back is on its host."""

    uid: int
    user: str
    version: str
    hostname: str


def _nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def classify(fd: int) -> Kind:
    """How the descriptor *fd* crosses; :class:`Refused` when it cannot."""
    info = os.fstat(fd)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_PATH:
        raise Refused("a descriptor opened with O_PATH cannot be read")
    access = flags & os.O_ACCMODE
    if stat.S_ISREG(info.st_mode) and access != os.O_WRONLY:
        return Kind.FILE
    if stat.S_ISFIFO(info.st_mode) and access == os.O_RDONLY:
        return Kind.READER
    if stat.S_ISFIFO(info.st_mode) and access == os.O_WRONLY:
        return Kind.WRITER
    if stat.S_ISSOCK(info.st_mode):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.type == socket.SOCK_STREAM and not listening:
                return Kind.SOCKET
        finally:
            sock.close()
        raise Refused("a listening or packet socket cannot cross hosts")
    raise Refused(
        f"a descriptor of mode {stat.filemode(info.st_mode)} cannot cross hosts"
    )


def _spool() -> int:
    """An anonymous file for a file that crossed: on disk, gone when closed."""
    where = os.environ.get("TMPDIR") or "/var/tmp"
    try:
        return os.open(where, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        fd, path = tempfile.mkstemp(prefix="kdlab-bridge-")
        os.unlink(path)
        return fd


class Link:
    """Frames over the ssh channel (one byte stream each way)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reading: int,
        writing: int,
        on_frame: Callable[[int, int, int, bytes], None],
        on_lost: Callable[[str], None],
        *,
        hunt: bool,
    ) -> None:
        self._loop = loop
        self._reading, self._writing = reading, writing
        self._on_frame, self._on_lost = on_frame, on_lost
        self._in = bytearray()
        self._out = bytearray()
        self._hunting = hunt
        self.skipped = b""  # what came before MAGIC
        self.lost = False
        self._drained: list[asyncio.Future[None]] = []
        _nonblocking(reading)
        _nonblocking(writing)
        loop.add_reader(reading, self._readable)

    def send(
        self, kind: Frame, channel: int, payload: bytes = b"", flags: int = 0
    ) -> None:
        if self.lost:
            return
        pending = bool(self._out)
        self._out += HEADER.pack(len(payload), channel, kind, flags) + payload
        if not pending:
            self._writable()

    @property
    def backlog(self) -> int:
        return len(self._out)

    async def drained(self) -> None:
        """Until everything sent was written to the channel (or it was lost)."""
        if self._out and not self.lost:
            waiter = self._loop.create_future()
            self._drained.append(waiter)
            await waiter

    def _writable(self) -> None:
        try:
            written = os.write(self._writing, self._out)
        except BlockingIOError:
            written = 0
        except OSError as err:
            self.lose(f"the ssh channel broke: {err.strerror}")
            return
        del self._out[:written]
        if self._out:
            self._loop.add_writer(self._writing, self._writable)
            return
        self._loop.remove_writer(self._writing)
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        self._drained.clear()

    def _readable(self) -> None:
        try:
            data = os.read(self._reading, 1 << 18)
        except BlockingIOError:
            return
        except OSError as err:
            self.lose(f"the ssh channel broke: {err.strerror}")
            return
        if not data:
            self.lose("the ssh channel closed")
            return
        self._in += data
        if self._hunting and not self._hunt():
            return
        while len(self._in) >= HEADER_SIZE and not self.lost:
            length, channel, kind, flags = HEADER.unpack_from(self._in)
            if length > MAX_PAYLOAD:
                self.lose(
                    f"a frame of {length} bytes: the other side is not kdlab's bridge"
                )
                return
            if len(self._in) < HEADER_SIZE + length:
                return
            payload = bytes(self._in[HEADER_SIZE : HEADER_SIZE + length])
            del self._in[: HEADER_SIZE + length]
            self._on_frame(kind, channel, flags, payload)

    def _hunt(self) -> bool:
        at = self._in.find(MAGIC)
        if at < 0:
            if len(self._in) > MAGIC_SEARCH:
                self.lose("the host's kdlabctl did not answer as kdlab's bridge")
            return False
        self.skipped = bytes(self._in[:at])
        del self._in[: at + len(MAGIC)]
        self._hunting = False
        return True

    def lose(self, why: str) -> None:
        if self.lost:
            return
        self.lost = True
        self._loop.remove_reader(self._reading)
        self._loop.remove_writer(self._writing)
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        self._on_lost(why)


class Channel:
    """Something relayed under a channel number."""

    def __init__(self, bridge: Bridge, number: int) -> None:
        self.bridge = bridge
        self.number = number

    def on_frame(self, kind: int, flags: int, payload: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Forget the channel and free what it holds (nothing is sent)."""
        self.bridge.channels.pop(self.number, None)

    def acked(self, credit: int, payload: bytes) -> int:
        """*credit* with what the ACK *payload* gives back; more than was
        sent is the other side's lie, and the link's end."""
        given: int = credit + _U32.unpack(payload)[0]
        if given > WINDOW:
            self.bridge.link.lose("an ACK of bytes that were never sent")
            return credit
        return given


class Stream(Channel):
    """A pipe end or a connected socket of this side, relayed with credit."""

    def __init__(
        self, bridge: Bridge, number: int, fd: int, *, reads: bool, writes: bool
    ) -> None:
        super().__init__(bridge, number)
        self.fd = fd
        self.reads, self.writes = reads, writes
        self.credit = WINDOW
        self.pending = bytearray()
        self.consumed = 0
        self.ended = False  # EOF came: shut our writing once pending is out
        self._loop = bridge.loop
        _nonblocking(fd)
        if reads:
            self._loop.add_reader(fd, self._readable)

    def on_frame(self, kind: int, _flags: int, payload: bytes) -> None:
        if kind == Frame.DATA and self.writes and not self.ended:
            if len(self.pending) + self.consumed + len(payload) > WINDOW:
                self.bridge.link.lose("more bytes than the window, without credit")
                return
            self.pending += payload
            self._flush()
        elif kind == Frame.ACK and len(payload) == _U32.size:
            resume = self.credit == 0
            self.credit = self.acked(self.credit, payload)
            if resume and self.credit and self.reads:
                self._loop.add_reader(self.fd, self._readable)
        elif kind == Frame.EOF:
            self.ended = True
            self._flush()
        elif kind == Frame.CLOSE:
            self.close()

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, min(MAX_PAYLOAD, self.credit))
        except BlockingIOError:
            return
        except OSError:
            self.abort()
            return
        if not data:
            self.bridge.link.send(Frame.EOF, self.number)
            self._stop_reading()
            return
        self.credit -= len(data)
        self.bridge.link.send(Frame.DATA, self.number, data)
        if not self.credit:
            self._loop.remove_reader(self.fd)

    def _flush(self) -> None:
        if not self.writes:
            return
        written = 0
        try:
            while self.pending:
                count = os.write(self.fd, self.pending)
                del self.pending[:count]
                written += count
        except BlockingIOError:
            pass
        except OSError:  # the reader of this end is gone
            self.abort()
            return
        self.consumed += written
        if self.consumed and (not self.pending or self.consumed >= WINDOW // 4):
            self.bridge.link.send(Frame.ACK, self.number, _U32.pack(self.consumed))
            self.consumed = 0
        if self.pending:
            self._loop.add_writer(self.fd, self._flush)
            return
        self._loop.remove_writer(self.fd)
        if self.ended:
            self._stop_writing()

    def _stop_reading(self) -> None:
        self.reads = False
        self._loop.remove_reader(self.fd)
        self._done_if_idle()

    def _stop_writing(self) -> None:
        self.writes = False
        if self.reads:  # a socket: the other way goes on
            with contextlib.suppress(OSError):
                socket.socket(fileno=os.dup(self.fd)).shutdown(socket.SHUT_WR)
        self._done_if_idle()

    def _done_if_idle(self) -> None:
        if not (self.reads or self.writes):
            self.close()

    def abort(self) -> None:
        self.bridge.link.send(Frame.CLOSE, self.number)
        self.close()

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            self._loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = -1


class FileSource(Channel):
    """A regular file of this side, sent as it is and then as it grows."""

    def __init__(self, bridge: Bridge, number: int, fd: int) -> None:
        super().__init__(bridge, number)
        self.fd = fd
        self.offset = 0
        self.credit = WINDOW
        self.target = os.fstat(fd).st_size
        self.synced: asyncio.Future[None] = bridge.loop.create_future()
        bridge.followed.add(self)
        self.pump()

    def pump(self) -> None:
        """Send what the file has beyond what was sent, as credit allows."""
        exhausted = False
        while self.credit and self.fd >= 0:
            try:
                chunk = os.pread(self.fd, min(MAX_PAYLOAD, self.credit), self.offset)
            except OSError:
                chunk = b""
            if not chunk:
                exhausted = True  # at its end (or shrunk): what there was is sent
                break
            self.offset += len(chunk)
            self.credit -= len(chunk)
            self.bridge.link.send(Frame.DATA, self.number, chunk)
        if not self.synced.done() and (self.offset >= self.target or exhausted):
            self.bridge.link.send(Frame.SYNC, self.number)
            self.synced.set_result(None)

    def on_frame(self, kind: int, _flags: int, payload: bytes) -> None:
        if kind == Frame.ACK and len(payload) == _U32.size:
            self.credit = self.acked(self.credit, payload)
            self.pump()
        elif kind == Frame.CLOSE:
            self.close()

    def close(self) -> None:
        super().close()
        self.bridge.followed.discard(self)
        if not self.synced.done():
            self.synced.set_result(None)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileSink(Channel):
    """The spool a file of the other side's is written into."""

    def __init__(self, bridge: Bridge, number: int) -> None:
        super().__init__(bridge, number)
        self.fd = _spool()
        self.synced = False

    def reader(self) -> int:
        """A read-only descriptor of the spool, at its start."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def on_frame(self, kind: int, _flags: int, payload: bytes) -> None:
        if kind == Frame.DATA and self.fd >= 0:
            try:
                os.write(self.fd, payload)  # a local file: written at once
            except OSError as err:
                self.bridge.link.lose(f"cannot spool a file: {err.strerror}")
                return
            self.bridge.link.send(Frame.ACK, self.number, _U32.pack(len(payload)))
        elif kind == Frame.SYNC:
            self.synced = True
        elif kind == Frame.CLOSE:
            self.close()

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Connection(Channel):
    """One D-Bus connection: a local socket whose messages cross."""

    def __init__(
        self, bridge: Bridge, number: int, sock: socket.socket, initial: bytes = b""
    ) -> None:
        super().__init__(bridge, number)
        self.sock = sock
        sock.setblocking(False)
        self._in = bytearray(initial)
        self._fds: deque[int] = deque()
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._queued = 0  # bytes of _out
        self._parts = bytearray()
        self._queue: asyncio.Queue[tuple[bytes, list[int]]] = asyncio.Queue()
        self._loop = bridge.loop
        self._loop.add_reader(sock, self._readable)
        self._task = self._loop.create_task(self._forward())
        self._split()

    def _readable(self) -> None:
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                1 << 18, socket.CMSG_SPACE(_MAX_FDS * 4)
            )
        except BlockingIOError:
            return
        except OSError:
            self.abort()
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self.abort()
            return
        if not data:  # what it sent before leaving still goes
            self._loop.remove_reader(self.sock)
            self._queue.put_nowait(_LEFT)
            return
        self._in += data
        self._split()

    def _split(self) -> None:
        """Queue the whole messages read, each with its descriptors."""
        while len(self._in) >= 16:
            try:
                length = quickbus.message_length(bytes(self._in[:16]))
            except quickbus.RemoteError:
                self.abort()
                return
            if len(self._in) < length:
                break
            message = bytes(self._in[:length])
            del self._in[:length]
            count = _unix_fds(message)
            if count is None or count > len(self._fds):
                self.abort()
                return
            self._queue.put_nowait(
                (message, [self._fds.popleft() for _ in range(count)])
            )
        if self._queue.qsize() >= _BACKLOG_MESSAGES:
            self._loop.remove_reader(self.sock)

    async def _forward(self) -> None:
        """Send the messages read, in order, each once its files crossed."""
        while True:
            message, fds = await self._queue.get()
            if not message:  # _LEFT
                self.abort()
                return
            if self._queue.qsize() == _BACKLOG_MESSAGES // 2:
                self._loop.add_reader(self.sock, self._readable)
            try:
                await self.bridge.send_message(self.number, message, fds)
            except Refused as err:
                self._refused(message, str(err))

    def _refused(self, message: bytes, why: str) -> None:
        """A call that passed what cannot cross is answered here; a reply that
        carries it becomes an error, sent on."""
        kind, serial, fields, _ = quickbus.parse(message)  # read once already
        text = f"{why}: run kdlabctl on the VM's host itself for this"
        if kind == quickbus.METHOD_CALL and not message[2] & _NO_REPLY_EXPECTED:
            self.deliver(quickbus.error_reply(serial, serial, _REFUSED, text, {}), [])
        elif kind == quickbus.METHOD_RETURN:
            reply_to = fields.get(quickbus.REPLY_SERIAL, 0)
            error = quickbus.error_reply(serial, reply_to, _REFUSED, text, fields)
            self.bridge.spawn(self.bridge.send_message(self.number, error, []))

    def on_frame(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == Frame.MESSAGE:
            self._parts += payload
            if len(self._parts) > _MAX_MESSAGE_FRAMES:
                self.bridge.link.lose("a MESSAGE over the D-Bus limit")
            elif not flags & MORE:
                whole, self._parts = bytes(self._parts), bytearray()
                self._received(whole)
        elif kind == Frame.CLOSE:
            self.close()

    def _received(self, payload: bytes) -> None:
        try:
            (count,) = _U16.unpack_from(payload)
            numbers = struct.unpack_from(f">{count}I", payload, _U16.size)
        except struct.error:
            self.bridge.link.lose("a malformed MESSAGE frame")
            return
        message = payload[_U16.size + count * _U32.size :]
        fds = [self.bridge.take_descriptor(number) for number in numbers]
        if -1 in fds or not _whole(message, len(fds)):
            # A client would read the next message's bytes as this one's, or
            # wait for descriptors that never come: the other side is broken.
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            self.bridge.link.lose("a MESSAGE that is no D-Bus message with its files")
            return
        self.deliver(message, fds)

    def deliver(self, message: bytes, fds: list[int]) -> None:
        self._out.append((message, fds))
        self._queued += len(message)
        if self._queued > _MAX_UNREAD:  # a client that reads nothing
            self.abort()
        elif len(self._out) == 1:
            self._flush()

    def _flush(self) -> None:
        while self._out:
            data, fds = self._out[0]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            try:
                sent = self.sock.sendmsg([data], rights if fds else [])
            except BlockingIOError:
                self._loop.add_writer(self.sock, self._flush)
                return
            except OSError:
                self.abort()
                return
            for fd in fds:
                os.close(fd)
            self._queued -= sent
            if sent < len(data):
                self._out[0] = (data[sent:], [])
                self._loop.add_writer(self.sock, self._flush)
                return
            self._out.popleft()
        self._loop.remove_writer(self.sock)

    def abort(self) -> None:
        self.bridge.link.send(Frame.CLOSE, self.number)
        self.close()

    def close(self) -> None:
        super().close()
        self._task.cancel()
        self._loop.remove_reader(self.sock)
        self._loop.remove_writer(self.sock)
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()


def _whole(message: bytes, fds: int) -> bool:
    """Whether *message* is one whole D-Bus message that carries *fds*."""
    try:
        length = quickbus.message_length(message[:16])
    except (quickbus.RemoteError, struct.error):
        return False
    return len(message) == length and _unix_fds(message) == fds


def _unix_fds(message: bytes) -> int | None:
    """How many descriptors the message says it carries (None: malformed)."""
    try:
        count = quickbus.parsed(message)[2].get(quickbus.UNIX_FDS, 0)
    except quickbus.RemoteError:
        return None
    return count if isinstance(count, int) else None


class Bridge:
    """One side's channels over the link."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, front: bool) -> None:
        self.loop = loop
        self.front = front
        self.channels: dict[int, Channel] = {}
        self.followed: set[FileSource] = set()
        self._descriptors: dict[int, int] = {}  # OPENed, for the next MESSAGE
        self._sinks: dict[int, FileSink] = {}
        self._next = 1 if front else 2
        self.link: Link  # set by the side that made the link
        self._following: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run *work* as a task this side holds until it is done."""
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def new_number(self) -> int:
        number, self._next = self._next, self._next + 2
        return number

    # --- what crosses from here -------------------------------------------------

    async def send_message(self, number: int, message: bytes, fds: list[int]) -> None:
        """Send *message* on connection *number*, its descriptors (ours now,
        closed here) as channels first; :class:`Refused` before anything is
        sent when one cannot cross."""
        try:
            kinds = [classify(fd) for fd in fds]
        except (Refused, OSError) as err:
            for fd in fds:
                os.close(fd)
            raise Refused(str(err)) from None
        numbers, sources = [], []
        for fd, kind in zip(fds, kinds, strict=True):
            channel = self.new_number()
            numbers.append(channel)
            self.link.send(Frame.OPEN, channel, bytes([kind]))
            if kind == Kind.FILE:
                source = FileSource(self, channel, fd)
                self.channels[channel] = source
                sources.append(source)
            else:
                reads = kind in (Kind.READER, Kind.SOCKET)
                writes = kind in (Kind.WRITER, Kind.SOCKET)
                self.channels[channel] = Stream(
                    self, channel, fd, reads=reads, writes=writes
                )
        for source in sources:
            await source.synced
        self.follow()
        payload = (
            _U16.pack(len(numbers)) + b"".join(_U32.pack(n) for n in numbers) + message
        )
        for at in range(0, len(payload), MAX_PAYLOAD):
            last = at + MAX_PAYLOAD >= len(payload)
            chunk = payload[at : at + MAX_PAYLOAD]
            self.link.send(Frame.MESSAGE, number, chunk, 0 if last else MORE)
            if self.link.backlog > WINDOW:
                await self.link.drained()
        self._follow_later()

    def follow(self) -> None:
        """Send what followed files gained since they were sent."""
        for source in list(self.followed):
            source.pump()

    def _follow_later(self) -> None:
        if self.followed and self._following is None:
            self._following = self.loop.call_later(FOLLOW_SECONDS, self._followed)

    def _followed(self) -> None:
        self._following = None
        self.follow()
        self._follow_later()

    # --- what crosses to here ---------------------------------------------------

    def on_frame(self, kind: int, number: int, flags: int, payload: bytes) -> None:
        if kind == Frame.OPEN:
            self._open(number, payload)
            return
        channel = self.channels.get(number)
        if channel is not None:
            channel.on_frame(kind, flags, payload)
        # Frames of a channel this side closed already are dropped.

    def _open(self, number: int, payload: bytes) -> None:
        theirs = number % 2 == (0 if self.front else 1)
        valid = len(payload) == 1 and payload[0] in {kind.value for kind in Kind}
        if number in self.channels or not theirs or not valid:
            self.link.lose("a malformed OPEN frame")
            return
        held = [
            channel
            for n, channel in self.channels.items()
            if n % 2 == number % 2 and not isinstance(channel, Connection)
        ]
        if len(held) >= _MAX_HELD:
            self.link.lose(f"more than {_MAX_HELD} descriptors opened at once")
            return
        kind = Kind(payload[0])
        try:
            if kind == Kind.FILE:
                sink = FileSink(self, number)
                self.channels[number] = sink
                self._sinks[number] = sink
                return
            if kind == Kind.SOCKET:
                here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                fd, recipient = here.detach(), there.detach()
            else:
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                # READER: their reader reads what we write; WRITER: the opposite.
                fd, recipient = (
                    (write_end, read_end)
                    if kind == Kind.READER
                    else (read_end, write_end)
                )
        except OSError as err:
            self.link.lose(f"cannot make a descriptor: {err.strerror}")
            return
        self.channels[number] = Stream(
            self,
            number,
            fd,
            reads=kind in (Kind.WRITER, Kind.SOCKET),
            writes=kind in (Kind.READER, Kind.SOCKET),
        )
        self._descriptors[number] = recipient

    def take_descriptor(self, number: int) -> int:
        """The descriptor a MESSAGE carries for channel *number* (-1: none)."""
        sink = self._sinks.pop(number, None)
        if sink is not None:
            if not sink.synced or sink.fd < 0:
                return -1
            fd = sink.reader()
            if not self.front:  # kdlabd copies what it is given: no growth needed
                self.link.send(Frame.CLOSE, number)
                sink.close()
            return fd
        return self._descriptors.pop(number, -1)

    async def finish(self) -> None:
        """:meth:`close`, then the tasks' ends (they close what they hold)."""
        self.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        for channel in list(self.channels.values()):
            channel.close()
        for fd in self._descriptors.values():
            os.close(fd)
        self._descriptors.clear()
        if self._following is not None:
            self._following.cancel()
        for task in self._tasks:
            task.cancel()


# --- the back: on the host, on ssh's stdin and stdout ----------------------------


def serve(bus: str) -> int:
    """``kdlabctl --bus BUS __bridge``: relay for a kdlabctl elsewhere until
    ssh's channel closes."""
    reading, writing = os.dup(0), os.dup(1)
    # Nothing else may write on the channel: stray output goes to stderr.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        asyncio.run(_serve(bus, reading, writing))
    except Exception as err:  # whatever broke, the user reads one line
        print(f"kdlabctl __bridge: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


async def _serve(bus: str, reading: int, writing: int) -> None:
    loop = asyncio.get_running_loop()
    bridge = Bridge(loop, front=False)
    ended: asyncio.Future[None] = loop.create_future()

    def on_frame(kind: int, number: int, flags: int, payload: bytes) -> None:
        if kind == Frame.CONNECT and number % 2 and number not in bridge.channels:
            bridge.spawn(connect(number))
        else:
            bridge.on_frame(kind, number, flags, payload)

    def on_lost(_why: str) -> None:
        if not ended.done():
            ended.set_result(None)

    async def connect(number: int) -> None:
        try:
            sock = await asyncio.wait_for(
                asyncio.to_thread(
                    quickbus.open_socket, bus, CONNECT_SECONDS, unix_fds=True
                ),
                CONNECT_SECONDS,
            )
        except (quickbus.RemoteError, TimeoutError) as err:
            bridge.link.send(Frame.CLOSE, number, str(err).encode())
            return
        connection = socket.socket(fileno=sock.detach())
        bridge.channels[number] = Connection(bridge, number, connection)
        bridge.link.send(Frame.CONNECTED, number)

    bridge.link = Link(loop, reading, writing, on_frame, on_lost, hunt=False)
    os.write(writing, MAGIC)
    bridge.link.send(Frame.HELLO, 0, json.dumps(await _hello(bus)).encode())
    await ended
    bridge.close()


async def _hello(bus: str) -> dict[str, Any]:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        sock = await asyncio.to_thread(quickbus.open_socket, bus, CONNECT_SECONDS)
        sock.close()
        bus_error = ""
    except quickbus.RemoteError as err:
        bus_error = str(err)
    from kdlab.roff import version

    return {
        "protocol": PROTOCOL,
        "uid": uid,
        "user": user,
        "hostname": socket.gethostname(),
        "version": version(),
        "bus_error": bus_error,
    }


# --- the front: in the kdlabctl that was given --host ----------------------------


class Session:
    """A host's bus, reached through ssh: :attr:`bus` is its address here."""

    def __init__(self, argv: Sequence[str], where: str, timeout: float) -> None:
        self.where = where
        self.directory = tempfile.mkdtemp(prefix="kdlab-host-")
        path = os.path.join(self.directory, "bus")
        self.bus = f"unix:path={path}"
        self._remote: RemoteInfo | None = None
        self._failure = ""
        # Why the channel ended under the command ("" while it is up).
        self.lost = ""
        self._ready = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, name="kdlab-host", daemon=True
        )
        try:
            self._ssh = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # the terminal's Ctrl-C is kdlabctl's
            )
        except OSError as err:
            self._loop.close()
            self._cleanup()
            raise Unreachable(f"cannot run {argv[0]}: {err.strerror}") from None
        try:
            self._thread.start()
            if not self._ready.wait(timeout):
                self._failure = f"{where} did not answer over ssh within {timeout:g} s"
        except BaseException:  # Ctrl-C: neither ssh nor the directory stays
            self._failure = self._failure or "interrupted"
            self._ssh.kill()
            self.close()
            raise
        if self._remote is None:
            self.close()
            raise Unreachable(self._failure)

    @property
    def remote(self) -> RemoteInfo:
        """Who the caller is on the host (known once the session is open)."""
        assert self._remote is not None
        return self._remote

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._front())
        finally:
            self._loop.close()

    async def _front(self) -> None:
        loop = asyncio.get_running_loop()
        bridge = Bridge(loop, front=True)
        pending: dict[int, asyncio.Future[str]] = {}
        assert self._ssh.stdout is not None
        assert self._ssh.stdin is not None
        assert self._ssh.stderr is not None
        errors = self._errors = _Stderr(loop, self._ssh.stderr.fileno())

        def on_frame(kind: int, number: int, flags: int, payload: bytes) -> None:
            if kind == Frame.HELLO and self._remote is None:
                self._hello(payload)
            elif kind in (Frame.CONNECTED, Frame.CLOSE) and number in pending:
                waiter = pending.pop(number)
                if not waiter.done():
                    waiter.set_result(
                        ""
                        if kind == Frame.CONNECTED
                        else payload.decode(errors="replace") or "refused"
                    )
            else:
                bridge.on_frame(kind, number, flags, payload)

        def on_lost(why: str) -> None:
            if self._remote is not None and not self.lost:
                self.lost = f"the connection to {self.where} was lost: {why}"
            self._stop()

        async def serve_client(sock: socket.socket) -> None:
            number = bridge.new_number()
            waiter: asyncio.Future[str] = loop.create_future()
            pending[number] = waiter
            bridge.link.send(Frame.CONNECT, number)
            try:
                rest = await _authenticate(loop, sock, waiter)
            except BaseException as err:  # refused, gone, or the session ended
                pending.pop(number, None)
                bridge.link.send(Frame.CLOSE, number)
                sock.close()
                if isinstance(err, (OSError, ValueError)):
                    return
                raise
            # Bytes after BEGIN are the first message (Hello).
            bridge.channels[number] = Connection(bridge, number, sock, rest)

        def accept() -> None:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            if _peer_uid(sock) != os.getuid():
                sock.close()
                return
            bridge.spawn(serve_client(sock))

        bridge.link = Link(
            loop,
            self._ssh.stdout.fileno(),
            self._ssh.stdin.fileno(),
            on_frame,
            on_lost,
            hunt=True,
        )
        self._listener.setblocking(False)
        loop.add_reader(self._listener, accept)
        await self._stopping
        loop.remove_reader(self._listener)
        await self._end(bridge, errors)

    async def _end(self, bridge: Bridge, errors: _Stderr) -> None:
        """The front's end: why it failed to start, or what was on its way."""
        self._listener.close()  # who comes now is refused, not kept waiting
        if self._remote is None:
            self._failure = await self._why(errors, bridge.link)
            self._ready.set()
        else:
            await self._drain(bridge)
        await bridge.finish()
        errors.close()

    def _hello(self, payload: bytes) -> None:
        try:
            hello = json.loads(payload)
            if hello.get("protocol") != PROTOCOL:
                self._failure = (
                    f"kdlabctl on {self.where} speaks bridge protocol "
                    f"{hello.get('protocol')}, this one {PROTOCOL}: install the same "
                    "kdlab on both"
                )
            elif hello.get("bus_error"):
                self._failure = f"on {self.where}: {hello['bus_error']}"
            else:
                self._remote = _remote_info(hello)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._failure = f"kdlabctl on {self.where} sent a malformed hello"
        if self._remote is None:
            self._stop()
        else:
            self._errors.passing = True  # the host's kdlabctl speaks to the user
        self._ready.set()

    async def _why(self, errors: _Stderr, link: Link) -> str:
        """Why ssh or the host's kdlabctl ended before its hello."""
        if self._failure:
            return self._failure
        try:
            code = await asyncio.wait_for(
                asyncio.to_thread(self._ssh.wait), LINGER_SECONDS
            )
        except TimeoutError:
            code = None
        await errors.ended()
        said = errors.text().strip() or link.skipped.decode(errors="replace").strip()
        said = " ".join(said.split("\n")[-3:]) or "no message"
        if code == 255:
            return f"cannot reach {self.where} over ssh: {said}"
        return f"kdlabctl on {self.where} did not start (exit {code}): {said}"

    async def _drain(self, bridge: Bridge) -> None:
        """At the end: let what is on its way go out, then end the channel."""
        await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bridge.link.drained(), LINGER_SECONDS)

    def close(self) -> None:
        """End the session: the channel, ssh, the socket and its directory."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # its loop just ended
                self._loop.call_soon_threadsafe(self._stop)
            self._thread.join(LINGER_SECONDS * 2)
        assert self._ssh.stdin is not None
        with contextlib.suppress(OSError):
            self._ssh.stdin.close()
        try:
            self._ssh.wait(LINGER_SECONDS)
        except subprocess.TimeoutExpired:
            self._ssh.kill()
            self._ssh.wait()
        self._cleanup()

    def _stop(self) -> None:
        if not self._stopping.done():
            self._stopping.set_result(None)

    def _cleanup(self) -> None:
        self._listener.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class _Stderr:
    """ssh's stderr: kept until the hello (it says why a host is unreachable),
    passed on to kdlabctl's after it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self._loop, self._fd = loop, fd
        self._kept = bytearray()
        self._done: asyncio.Future[None] = loop.create_future()
        self.passing = False
        _nonblocking(fd)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        if self.passing:
            with contextlib.suppress(OSError):
                os.write(2, data)
        else:
            self._kept += data[: max(0, 65536 - len(self._kept))]

    def text(self) -> str:
        return self._kept.decode(errors="replace")

    async def ended(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._done), LINGER_SECONDS)

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        if not self._done.done():
            self._done.set_result(None)


def _remote_info(hello: dict[str, Any]) -> RemoteInfo:
    """Who the hello says the caller is; ValueError unless a uid and names."""
    uid, names = hello["uid"], [hello[key] for key in ("user", "version", "hostname")]
    if type(uid) is not int or not 0 <= uid < 1 << 32:
        raise ValueError(f"uid {uid!r}")
    if not all(isinstance(name, str) for name in names):
        raise ValueError("a name that is not a string")
    return RemoteInfo(uid, *names)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    return int(struct.unpack("3i", creds)[1])


async def _authenticate(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, connected: asyncio.Future[str]
) -> bytes:
    """The bus's side of a client's handshake (the uid was checked on accept:
    any mechanism is answered OK once the back reached the host's bus); the
    bytes after BEGIN. ValueError for a client that is not one.

    A client may send its identity with AUTH (libdbus, dbus-next) or wait to
    be asked for it (sd-bus: ``AUTH EXTERNAL``, then ``DATA``)."""
    sock.setblocking(False)
    buffer = b""
    while True:
        while b"\r\n" not in buffer:
            data = await loop.sock_recv(sock, 4096)
            if not data or len(buffer) > 16384:
                raise ValueError("the client left during the handshake")
            buffer += data
        line, buffer = buffer.split(b"\r\n", 1)
        command, *arguments = line.lstrip(b"\0").split(b" ")
        if command == b"AUTH" and not arguments:
            answer = b"REJECTED EXTERNAL\r\n"  # the mechanisms there are
        elif command == b"AUTH" and len(arguments) == 1:
            answer = b"DATA\r\n"  # a mechanism without its initial response
        elif command in (b"AUTH", b"DATA"):
            refused = await connected
            if refused:
                await loop.sock_sendall(sock, b"REJECTED EXTERNAL\r\n")
                raise ValueError(refused)
            answer = b"OK " + os.urandom(16).hex().encode() + b"\r\n"
        elif command == b"NEGOTIATE_UNIX_FD":
            answer = b"AGREE_UNIX_FD\r\n"
        elif command == b"BEGIN":
            return buffer
        else:
            answer = b"ERROR\r\n"
        await loop.sock_sendall(sock, answer)


def open_session(
    argv: Sequence[str], where: str, timeout: float = CONNECT_SECONDS
) -> Session:
    """Start ``argv`` (ssh running ``kdlabctl ... __bridge`` on *where*) and
    serve its bus here; :class:`Unreachable` when that fails."""
    return Session(argv, where, timeout)
