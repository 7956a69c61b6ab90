"""kdlabd's side of the exec agent's protocol, on a connected asyncio stream.

The caller connects to the VM's agent channel (host I/O, not core's job) and
hands the stream in; an :class:`AgentLink` then runs commands in the guest
(``kdlab/agent/protocol.py`` specifies the frames).

One reader task reads frames and routes them. A session's output goes to a
queue of its own, drained by a task of its own that calls the session's
:class:`OutputSink` and acks what the sink took: a slow sink holds back its
own command (the agent stops reading that command's pipe at WINDOW bytes
unacknowledged) and neither the reader nor other sessions.

What a guest can make kdlabd hold is bounded: a session's queue holds at most
WINDOW bytes per stream (a guest that sends more breaks the link) in at most
about ``_MAX_CHUNKS`` pieces (output joins the piece before it of its stream).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import secrets
import signal
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import structlog

from kdlab.agent import protocol
from kdlab.agent.protocol import FrameType, ProtocolError, Stream

log = structlog.get_logger(__name__)

GONE = "the guest agent went away"
_SESSION_IDS = 2**32 - 1
# Pieces of output a session's queue keeps apart; beyond, output joins the
# last piece of its stream even across the other stream's (they go to two
# descriptors, whose relative order a reader cannot rely on anyway).
_MAX_CHUNKS = 64


class AgentError(Exception):
    """The agent failed or went away; *errno* is the guest's for a failed spawn."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno


class ExitStatus(NamedTuple):
    """How a command ended: its exit code, or -1 and the signal that killed it."""

    code: int
    signal: int


class OutputSink(Protocol):
    """Where a session's output goes (stream 1 stdout, 2 stderr).

    An exception from either method kills the command; its session's
    :meth:`AgentSession.wait` raises :class:`AgentError` then. A call is
    cancelled when its session ends first (killed, or the link went away).
    """

    async def write(self, stream: int, data: bytes) -> None:
        """Take *data*; may be slow: the agent is acked once it returns."""

    async def eof(self, stream: int) -> None:
        """*stream* ended."""


class _Chunk:
    __slots__ = ("data", "stream")

    def __init__(self, stream: int, data: bytes) -> None:
        self.stream = stream
        self.data = bytearray(data)


class AgentSession:
    """One command running in the guest; made by :meth:`AgentLink.spawn`."""

    def __init__(
        self, link: AgentLink, session_id: int, output: OutputSink, stdin: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        self._link = link
        self.id = session_id
        self.pid = 0
        self._output = output
        self._stdin = stdin
        self._started: asyncio.Future[int] = loop.create_future()
        self._ended: asyncio.Future[ExitStatus] = loop.create_future()
        self._items: collections.deque[_Chunk | int | ExitStatus] = collections.deque()
        self._item_added = asyncio.Event()
        self._eof = {Stream.STDOUT: False, Stream.STDERR: False}
        self._exited = False
        # Output bytes received and not yet acked, per stream.
        self._held = {Stream.STDOUT: 0, Stream.STDERR: 0}
        self._credit = protocol.WINDOW  # stdin bytes the agent will take
        self._credit_or_end = asyncio.Event()
        self._stdin_lock = asyncio.Lock()
        self._drainer = asyncio.create_task(self._drain(), name=f"agent-{session_id}")

    @property
    def held(self) -> int:
        """Output bytes received from the guest and not yet taken by the sink."""
        return sum(self._held.values())

    @property
    def ended(self) -> bool:
        return self._ended.done()

    async def write_stdin(self, data: bytes) -> None:
        """Send *data* to the command's stdin as the agent gives credit.

        Returns at once (*data* dropped) when the command has ended;
        :class:`AgentError` when the link went away first.
        """
        if not self._stdin:
            raise ValueError("the session was spawned without stdin")
        view = memoryview(data)
        async with self._stdin_lock:
            while view:
                if self.ended:
                    self._ended.result()  # raises AgentError if the link went
                    return
                if not self._credit:
                    self._credit_or_end.clear()
                    await self._credit_or_end.wait()
                    continue
                count = min(len(view), self._credit, protocol.MAX_PAYLOAD)
                self._credit -= count
                await self._link.send(FrameType.STDIN, self.id, bytes(view[:count]))
                view = view[count:]

    async def close_stdin(self) -> None:
        """End the command's stdin once what was written reached it."""
        async with self._stdin_lock:
            await self._send(FrameType.STDIN_EOF)

    async def signal(self, signo: int) -> None:
        """Send *signo* to the command's process group."""
        await self._send(FrameType.SIGNAL, protocol.i32(signo))

    async def resize(self, rows: int, cols: int) -> None:
        """Give the command's terminal a new size."""
        await self._send(FrameType.RESIZE, protocol.size(rows, cols))

    async def wait(self) -> ExitStatus:
        """The command's status, once all its output went to the sink.

        :class:`AgentError` when the link went away first (or the sink failed).
        """
        return await asyncio.shield(self._ended)

    async def kill(self) -> None:
        """Kill the command's process group and forget the session.

        No more output reaches the sink, and :meth:`wait` returns
        ``ExitStatus(-1, SIGKILL)`` at once (the guest reports nothing more).
        """
        if self.ended:
            return
        self._end(ExitStatus(-1, signal.SIGKILL))
        with contextlib.suppress(AgentError):
            await self._link.send(FrameType.CLOSE, self.id)

    async def _send(self, kind: FrameType, payload: bytes = b"") -> None:
        if not self.ended:
            await self._link.send(kind, self.id, payload)

    def _end(self, result: ExitStatus | AgentError) -> None:
        self._link.forget(self.id)
        if asyncio.current_task() is not self._drainer:
            self._drainer.cancel()
        if not self._started.done():
            self._started.set_exception(
                result if isinstance(result, AgentError) else AgentError(GONE)
            )
            self._started.exception()
        if not self._ended.done():
            if isinstance(result, AgentError):
                self._ended.set_exception(result)
                self._ended.exception()  # nobody may wait: no "never retrieved"
            else:
                self._ended.set_result(result)
        self._credit_or_end.set()

    def _lost(self) -> None:
        """The link went away: a session whose EXIT came still delivers its output."""
        if not self._exited:
            self._end(AgentError(GONE))

    def _receive(self, kind: int, payload: bytes) -> None:
        """A frame of this session's, from the reader; ProtocolError if bad."""
        if self._exited:
            return
        if kind == FrameType.STARTED:
            if not self._started.done():
                self._started.set_result(protocol.parse_u32(payload))
        elif kind == FrameType.ERROR:
            number, message = protocol.parse_error(payload)
            self._end(AgentError(message, number))
        elif kind in (FrameType.STDOUT, FrameType.STDERR):
            stream = Stream.STDOUT if kind == FrameType.STDOUT else Stream.STDERR
            self._add_output(stream, payload)
        elif kind == FrameType.EOF:
            number = protocol.parse_stream(payload)
            if number not in (Stream.STDOUT, Stream.STDERR):
                raise ProtocolError(f"EOF of stream {number}")
            stream = Stream(number)
            if not self._eof[stream]:
                self._eof[stream] = True
                self._add(int(stream))
        elif kind == FrameType.EXIT:
            self._exited = True
            self._add(ExitStatus(*protocol.parse_exit(payload)))
        elif kind == FrameType.ACK:
            acked, count = protocol.parse_ack(payload)
            if acked == Stream.STDIN:
                self._credit = min(protocol.WINDOW, self._credit + count)
                self._credit_or_end.set()

    def _add(self, item: _Chunk | int | ExitStatus) -> None:
        self._items.append(item)
        self._item_added.set()

    def _add_output(self, stream: Stream, data: bytes) -> None:
        if self._eof[stream]:
            raise ProtocolError(f"output on stream {stream} after its EOF")
        self._held[stream] += len(data)
        if self._held[stream] > protocol.WINDOW:
            raise ProtocolError(
                f"over {protocol.WINDOW} unacknowledged bytes on stream {stream}"
            )
        last = self._items[-1] if self._items else None
        if not (isinstance(last, _Chunk) and last.stream == stream):
            last = None
            if len(self._items) >= _MAX_CHUNKS:
                last = next(
                    (
                        item
                        for item in reversed(self._items)
                        if isinstance(item, _Chunk) and item.stream == stream
                    ),
                    None,
                )
        if last is None:
            self._add(_Chunk(stream, data))
        else:
            last.data += data

    async def _drain(self) -> None:
        try:
            while True:
                while not self._items:
                    self._item_added.clear()
                    await self._item_added.wait()
                item = self._items.popleft()
                if isinstance(item, ExitStatus):
                    self._end(item)
                    return
                if isinstance(item, int):
                    await self._output.eof(item)
                    continue
                await self._output.write(item.stream, bytes(item.data))
                self._held[Stream(item.stream)] -= len(item.data)
                # Without a link, a session whose EXIT came still delivers.
                with contextlib.suppress(AgentError):
                    ack = protocol.ack(Stream(item.stream), len(item.data))
                    await self._link.send(FrameType.ACK, self.id, ack)
        except Exception as error:
            log.warning("agent output failed", session=self.id, error=str(error))
            self._end(AgentError(f"the command's output could not be written: {error}"))
            with contextlib.suppress(AgentError):
                await self._link.send(FrameType.CLOSE, self.id)


class AgentLink:
    """kdlabd's end of one guest agent's channel."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._sessions: dict[int, AgentSession] = {}
        self._ids = itertools.count(1)
        self._reading: asyncio.Task[None] | None = None
        self.closed = False

    async def handshake(self, timeout: float) -> None:
        """Greet the agent, wait for its answer, then start reading frames.

        What the channel held before the answer (output meant for an earlier
        connection) is dropped.
        """
        token = secrets.randbits(32) | 1
        try:
            await self.send(FrameType.HELLO, token, protocol.u32(protocol.VERSION))
            version = await asyncio.wait_for(self._answer(token), timeout)
        except TimeoutError:
            await self.close()
            raise AgentError("no answer from the guest agent") from None
        except (asyncio.IncompleteReadError, ConnectionError, AgentError):
            await self.close()
            raise AgentError(GONE) from None
        if version != protocol.VERSION:
            await self.close()
            raise AgentError(
                f"the guest agent speaks protocol {version} and kdlabd"
                f" {protocol.VERSION}: update the agent in the guest"
            )
        self._reading = asyncio.create_task(self._read(), name="agent-reader")

    async def _answer(self, token: int) -> int:
        wanted = protocol.hello_header(token)
        while True:
            try:
                await self._reader.readuntil(wanted)
                break
            except asyncio.LimitOverrunError as error:
                await self._reader.readexactly(error.consumed)
        return protocol.parse_u32(await self._reader.readexactly(4))

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        tty: tuple[int, int] | None = None,
        stdin: bool = False,
        output: OutputSink,
    ) -> AgentSession:
        """Start *argv* in the guest.

        :class:`AgentError` with the guest's errno when it cannot start (or
        without one when the link is gone); ``ValueError`` for what the
        protocol cannot carry (a NUL byte, over MAX_PAYLOAD bytes).
        """
        payload = protocol.spawn(argv, env or {}, cwd, tty, stdin)
        if self.closed:
            raise AgentError(GONE)
        if self._reading is None:
            raise RuntimeError("spawn before the handshake")
        session = AgentSession(self, self._new_id(), output, stdin)
        self._sessions[session.id] = session
        try:
            await self.send(FrameType.SPAWN, session.id, payload)
            session.pid = await session._started
        except BaseException:
            await session.kill()  # nothing once it ended (a spawn error)
            raise
        return session

    async def close(self) -> None:
        """Close the channel; every open session ends with :class:`AgentError`."""
        if self._reading is not None:
            self._reading.cancel()
        self._lost()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def send(self, kind: FrameType, session: int, payload: bytes = b"") -> None:
        """One frame to the agent (frames never interleave)."""
        data = protocol.frame(kind, session, payload)
        async with self._write_lock:
            if self.closed:
                raise AgentError(GONE)
            try:
                self._writer.write(data)
                await self._writer.drain()
            except ConnectionError:
                self._lost()
                raise AgentError(GONE) from None

    def forget(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)

    def _new_id(self) -> int:
        while True:
            session_id = next(self._ids) % _SESSION_IDS + 1
            if session_id not in self._sessions:
                return session_id

    def _lost(self) -> None:
        self.closed = True
        for session in list(self._sessions.values()):
            session._lost()

    async def _read(self) -> None:
        try:
            while True:
                header = await self._reader.readexactly(protocol.HEADER_SIZE)
                length, session_id, kind = protocol.parse_header(header)
                payload = await self._reader.readexactly(length)
                session = self._sessions.get(session_id)
                if session is not None:
                    session._receive(kind, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("agent channel closed")
        except ProtocolError as error:
            log.warning("agent broke the protocol", error=str(error))
        finally:
            self._lost()
            self._writer.close()
