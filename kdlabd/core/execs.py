"""Commands run in guests (``kdlabctl exec``), through kdlab's agent.

Each VM has a virtio-serial port, ``org.kdlab.agent.0``, whose host side is a
unix socket only root and QEMU reach (:meth:`Layout.agent_socket`); the
guest's agent (``kdlab/agent/agent.c``) serves it. kdlabd keeps one
connection per running VM (an :class:`~kdlabd.core.agentlink.AgentLink`),
made on the first command and closed when the VM stops, and runs any number
of commands over it at once.

A command's output goes to pipes kdlabd makes and the caller reads; its
input comes from a pipe or socket the caller passed. Bytes flow only as fast
as the caller reads: the agent sends at most a window of a stream before
kdlabd has written it on, so a caller that stops reading stops its own
command in the guest, and kdlabd holds at most a window per stream. Nothing
the guest sends names a host file; kdlabd writes only into the pipes.

A command is a :class:`ProcessRecord`, told to observers (the bus exports
``org.kdlab.Kdlab1.Process`` objects): added when it starts, exited once it
ended and its output was all written on, removed :data:`PROCESS_LINGER_SECONDS`
later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from kdlab import wire
from kdlab.errors import ExecFailed, InvalidArgument, InvalidState, NoAgent
from kdlab.states import VMState
from kdlabd.core import blocking, descriptors
from kdlabd.core.agentlink import AgentError, AgentLink, AgentSession
from kdlabd.core.host import Host, InputStream, OutputPipe
from kdlabd.core.limits import Limits
from kdlabd.core.models import VMRecord
from kdlabd.core.observers import Observers
from kdlabd.core.vms import VMService

log = structlog.get_logger(__name__)

PROCESS_LINGER_SECONDS = 60.0
"""How long a command's object stays after it ended, for late readers."""
CONNECT_SECONDS = 5.0
"""Time limit of connecting to a VM's exec channel."""
HANDSHAKE_SECONDS = 5.0
"""How long the agent has to answer kdlabd's greeting."""
SPAWN_SECONDS = 15.0
"""How long the agent has to start a command (fork and exec in the guest)."""
HANGUP_CHECK_SECONDS = 1.0
"""How often kdlabd looks whether a command's caller closed its pipes."""
ARGV_MAX_WORDS = 4096
SPAWN_MAX_BYTES = 60 * 1024
"""What the command, its environment and cwd may take together: the agent
gets them in one frame."""
PATH_MAX = 4096
STDIN_READ_SIZE = 64 * 1024
SIGNAL_MAX = 64
DEFAULT_ROWS, DEFAULT_COLS = 24, 80


@dataclass(frozen=True)
class ExecRequest:
    """A command to run, as a caller asked for it (checked by :func:`check`)."""

    argv: tuple[str, ...]
    stdin_fd: int | None = None
    env: tuple[str, ...] = ()
    cwd: str = ""
    tty: bool = False
    rows: int = DEFAULT_ROWS
    cols: int = DEFAULT_COLS
    timeout: float = 0.0


@dataclass(frozen=True)
class ProcessRecord:
    """A command run in a guest, as the bus shows it."""

    id: int
    vm: str
    owner_uid: int
    argv: tuple[str, ...]
    pid: int = 0
    state: str = wire.PROCESS_STATE_RUNNING
    how: str = ""
    code: int = -1
    signal: int = 0


class ProcessObserver(Protocol):
    """Told of every command (the bus layer exports objects)."""

    def process_added(self, process: ProcessRecord) -> None: ...

    def process_exited(self, process: ProcessRecord) -> None: ...

    def process_removed(self, process: ProcessRecord) -> None: ...


def _has_nul(word: str) -> bool:
    return "\0" in word


def check(request: ExecRequest) -> None:
    """Refuse, before anything runs, a request the agent could not carry out."""
    argv = request.argv
    if not argv or not argv[0]:
        raise InvalidArgument("no command: give the command to run after --")
    if any(map(_has_nul, argv)):
        raise InvalidArgument("a word of the command has a NUL byte")
    for word in request.env:
        key, equals, _value = word.partition("=")
        if not key or not equals or _has_nul(word):
            raise InvalidArgument(f"env {word!r} is not KEY=VALUE")
    words = (*argv, *request.env, request.cwd)
    if len(words) > ARGV_MAX_WORDS or sum(len(w.encode()) + 5 for w in words) > (
        SPAWN_MAX_BYTES
    ):
        raise InvalidArgument(
            f"the command and its environment are too long (at most "
            f"{ARGV_MAX_WORDS} words and {SPAWN_MAX_BYTES // 1024} KiB): pass "
            "data on stdin instead"
        )
    if _has_nul(request.cwd) or len(request.cwd.encode()) >= PATH_MAX:
        raise InvalidArgument("cwd is not a usable guest path")
    if not (0 < request.rows <= 0xFFFF and 0 < request.cols <= 0xFFFF):
        raise InvalidArgument("a terminal has at least 1 row and 1 column")
    if not (math.isfinite(request.timeout) and request.timeout >= 0):
        raise InvalidArgument("timeout is a number of seconds, 0 for none")


class _Outputs:
    """Where a command's output goes: the caller's two pipes (an agent
    session's output sink). A pipe whose reader left drops what comes."""

    def __init__(self, stdout: OutputPipe, stderr: OutputPipe) -> None:
        self._pipes = {1: stdout, 2: stderr}
        self._ended: set[int] = set()
        """Streams the command ended: kdlabd closed their pipes itself."""
        self.reader_gone = asyncio.Event()
        """A stream's reader left while the command wrote to it."""

    async def write(self, stream: int, data: bytes) -> None:
        if not await self._pipes[stream].write(data):
            self.reader_gone.set()

    async def eof(self, stream: int) -> None:
        self._ended.add(stream)
        self._pipes[stream].close()

    def hung_up(self) -> bool:
        """Whether the caller closed the pipes it still had: it went away.
        A pipe kdlabd closed at the command's end of output tells nothing:
        a command that ended both runs on, its caller waiting for its end."""
        open_pipes = [p for s, p in self._pipes.items() if s not in self._ended]
        return bool(open_pipes) and all(pipe.hung_up() for pipe in open_pipes)

    def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.close()


@dataclass
class _Process:
    record: ProcessRecord
    session: AgentSession
    outputs: _Outputs
    stdin: InputStream | None
    killed: bool = False
    task: asyncio.Task[None] | None = None
    removal: asyncio.TimerHandle | None = None
    helpers: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)


class ExecService:
    """Runs commands in running VMs; one agent connection per VM."""

    def __init__(
        self,
        vms: VMService,
        host: Host,
        limits: Limits | None = None,
        *,
        linger: float = PROCESS_LINGER_SECONDS,
    ) -> None:
        self._vms = vms
        self._host = host
        self._limits = limits or Limits()
        self._linger = linger
        self._links: dict[str, AgentLink] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._processes: dict[int, _Process] = {}
        self._ids = itertools.count(1)
        self._closing: set[asyncio.Task[None]] = set()
        self._observers: Observers[ProcessObserver] = Observers()
        vms.subscribe(self)

    def subscribe(self, observer: ProcessObserver) -> Callable[[], None]:
        return self._observers.subscribe(observer)

    # -- running a command -------------------------------------------------

    async def exec(
        self, name: str, uid: int, request: ExecRequest
    ) -> tuple[int, int, ProcessRecord]:
        """Run *request* in VM *name*'s guest for *uid*: the read ends of its
        stdout and stderr pipes (the caller's to keep), and its record."""
        check(request)
        record = self._vms.get(name)
        agent_socket = self._usable(record)
        running = sum(
            p.record.vm == name and p.record.state == wire.PROCESS_STATE_RUNNING
            for p in self._processes.values()
        )
        self._limits.room_for_exec(name, running)
        descriptors.require(self._host.free_descriptors(), "a command's pipes")
        with contextlib.ExitStack() as undo:
            stdin = None
            if request.stdin_fd is not None:
                stdin = self._host.input_stream(request.stdin_fd)
                undo.callback(stdin.close)
            link = await self._link(name, agent_socket)
            stdout, stdout_theirs = self._host.output_pipe()
            undo.callback(stdout.close)
            undo.callback(_close_fd, stdout_theirs)
            stderr, stderr_theirs = self._host.output_pipe()
            undo.callback(stderr.close)
            undo.callback(_close_fd, stderr_theirs)
            outputs = _Outputs(stdout, stderr)
            session = await self._spawn(name, link, request, outputs, stdin)
            undo.pop_all()
        process = _Process(
            ProcessRecord(next(self._ids), name, uid, request.argv, pid=session.pid),
            session,
            outputs,
            stdin,
        )
        self._processes[process.record.id] = process
        log.info(
            "exec.started",
            vm=name,
            process=process.record.id,
            pid=session.pid,
            command=request.argv[0],
        )
        for observer in self._observers:
            observer.process_added(process.record)
        process.task = asyncio.get_running_loop().create_task(
            self._follow(process, request.timeout)
        )
        return stdout_theirs, stderr_theirs, process.record

    def _usable(self, record: VMRecord) -> Path:
        """The VM's exec channel, if its guest can run a command now."""
        name = record.name
        if record.state is VMState.PAUSED:
            raise InvalidState(
                f"VM {name!r} is paused: its guest cannot run a command until it "
                "continues (continue it in gdb)"
            )
        if record.state is not VMState.RUNNING:
            raise InvalidState(
                f"VM {name!r} is {record.state}: start it first (kdlabctl start {name})"
            )
        if record.boot.run is not None:
            raise InvalidState(
                f"VM {name!r} runs a {record.boot.run.mode}: a command from "
                "outside would make the run differ from its recording"
            )
        if record.spec.agent_socket is None:
            raise NoAgent(
                f"VM {name!r} was created before kdlab could run commands in "
                "guests: delete and create it again"
            )
        return record.spec.agent_socket

    async def _link(self, name: str, path: Path) -> AgentLink:
        """The VM's agent connection, made and greeted on first use."""
        async with self._connecting.setdefault(name, asyncio.Lock()):
            link = self._links.get(name)
            if link is not None and not link.closed:
                return link
            try:
                reader, writer = await self._host.open_stream(
                    str(path),
                    seconds=CONNECT_SECONDS,
                    what=f"connecting to the exec channel of {name}",
                )
            except (OSError, blocking.Unanswered) as err:
                why = err.strerror if isinstance(err, OSError) else "no answer"
                raise NoAgent(
                    f"cannot reach VM {name!r}'s exec channel: {why}"
                ) from None
            link = AgentLink(reader, writer)
            try:
                await link.handshake(HANDSHAKE_SECONDS)
            except AgentError:
                await link.close()
                raise NoAgent(
                    f"no kdlab agent answers in VM {name!r}: it may still be "
                    "booting (kdlabctl exec --wait S waits for it), or its "
                    "guest runs none (kdlab's initramfs starts one; an image "
                    "needs kdlab-agent, see the README)"
                ) from None
            self._links[name] = link
            log.info("exec.agent_connected", vm=name)
            return link

    async def _spawn(
        self,
        name: str,
        link: AgentLink,
        request: ExecRequest,
        outputs: _Outputs,
        stdin: InputStream | None,
    ) -> AgentSession:
        env = dict(word.partition("=")[::2] for word in request.env)
        try:
            async with asyncio.timeout(SPAWN_SECONDS):
                return await link.spawn(
                    request.argv,
                    env=env,
                    cwd=request.cwd or None,
                    tty=(request.rows, request.cols) if request.tty else None,
                    stdin=stdin is not None,
                    output=outputs,
                )
        except TimeoutError:
            await self._drop_link(name, link)
            raise NoAgent(
                f"the kdlab agent of VM {name!r} did not start the command "
                f"within {SPAWN_SECONDS:g} s"
            ) from None
        except ValueError as err:  # what one frame cannot carry
            raise InvalidArgument(str(err)) from None
        except AgentError as err:
            if link.closed:
                raise NoAgent(
                    f"the kdlab agent of VM {name!r} went away: {err}"
                ) from None
            raise ExecFailed(
                f"VM {name!r} cannot run {request.argv[0]!r}: {err}"
            ) from None

    async def _follow(self, process: _Process, timeout: float) -> None:
        """Carry the command to its end: input in, hangups, the time limit."""
        session = process.session
        loop = asyncio.get_running_loop()
        if process.stdin is not None:
            process.helpers.append(loop.create_task(self._feed(process)))
        process.helpers.append(loop.create_task(self._watch_caller(process)))
        process.helpers.append(loop.create_task(self._broken_pipe(process)))
        code, signo, how = -1, 0, wire.PROCESS_LOST
        try:
            async with asyncio.timeout(timeout or None):
                # Once everything it wrote was written on.
                status = await session.wait()
            code, signo = status.code, status.signal
            how = wire.PROCESS_SIGNALED if signo else wire.PROCESS_EXITED
        except TimeoutError:
            how = wire.PROCESS_TIMEOUT
            await _kill(session)
        except AgentError:
            how = wire.PROCESS_LOST
        if process.killed:
            how, code, signo = wire.PROCESS_KILLED, -1, signal.SIGKILL
        elif how in (wire.PROCESS_TIMEOUT, wire.PROCESS_LOST):
            code, signo = -1, signal.SIGKILL if how == wire.PROCESS_TIMEOUT else 0
        self._ended(process, code, signo, how)

    def _ended(self, process: _Process, code: int, signo: int, how: str) -> None:
        for helper in process.helpers:
            helper.cancel()
        if process.stdin is not None:
            process.stdin.close()
        process.outputs.close()
        process.record = dataclasses.replace(
            process.record,
            state=wire.PROCESS_STATE_EXITED,
            how=how,
            code=code,
            signal=signo,
        )
        log.info(
            "exec.ended",
            vm=process.record.vm,
            process=process.record.id,
            how=how,
            code=code,
            signal=signo,
        )
        for observer in self._observers:
            observer.process_exited(process.record)
        process.removal = asyncio.get_running_loop().call_later(
            self._linger, self._remove, process.record.id
        )

    async def _feed(self, process: _Process) -> None:
        """Copy the caller's input to the command, as fast as it takes it."""
        assert process.stdin is not None
        try:
            while data := await process.stdin.read(STDIN_READ_SIZE):
                await process.session.write_stdin(data)
            await process.session.close_stdin()
        except AgentError:
            pass  # the command ended, or the link went: _follow tells

    async def _broken_pipe(self, process: _Process) -> None:
        """The command wrote to a stream nobody reads any more: SIGPIPE, as a
        local pipe would give it (``kdlabctl exec VM -- yes | head -1``)."""
        await process.outputs.reader_gone.wait()
        with contextlib.suppress(AgentError):
            await process.session.signal(signal.SIGPIPE)

    async def _watch_caller(self, process: _Process) -> None:
        """Kill the command once its caller closed both pipes (it is gone:
        nobody would see the output, and nobody would stop it)."""
        while not process.outputs.hung_up():
            await asyncio.sleep(HANGUP_CHECK_SECONDS)
        log.info("exec.caller_gone", vm=process.record.vm, process=process.record.id)
        process.killed = True
        await _kill(process.session)

    def _remove(self, process_id: int) -> None:
        process = self._processes.pop(process_id, None)
        if process is not None:
            for observer in self._observers:
                observer.process_removed(process.record)

    # -- a running command -------------------------------------------------

    async def signal(self, process_id: int, signo: int) -> None:
        if not 0 < signo <= SIGNAL_MAX:
            raise InvalidArgument(f"{signo} is not a signal number (1 to 64)")
        process = self._running(process_id)
        if process is not None:
            with contextlib.suppress(AgentError):
                await process.session.signal(signo)

    async def resize(self, process_id: int, rows: int, cols: int) -> None:
        if not (rows and cols):
            raise InvalidArgument("a terminal has at least 1 row and 1 column")
        process = self._running(process_id)
        if process is not None:
            with contextlib.suppress(AgentError):
                await process.session.resize(rows, cols)

    async def kill(self, process_id: int) -> None:
        process = self._running(process_id)
        if process is not None:
            process.killed = True
            await _kill(process.session)

    def _running(self, process_id: int) -> _Process | None:
        process = self._processes.get(process_id)
        if process is None or process.record.state != wire.PROCESS_STATE_RUNNING:
            return None
        return process

    # -- VMs coming and going (a VMObserver) --------------------------------

    def vm_added(self, record: VMRecord) -> None:
        pass

    def vm_changed(self, record: VMRecord) -> None:
        if not record.state.active:
            self._forget_link(record.name)

    def vm_removed(self, name: str) -> None:
        self._forget_link(name)
        self._connecting.pop(name, None)

    def _forget_link(self, name: str) -> None:
        """The VM stopped: its connection closes, its commands are lost."""
        link = self._links.pop(name, None)
        if link is not None:
            # Kept until done: the loop holds only a weak reference to a task.
            task = asyncio.get_running_loop().create_task(link.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _drop_link(self, name: str, link: AgentLink) -> None:
        if self._links.get(name) is link:
            del self._links[name]
        await link.close()

    async def close(self) -> None:
        """Shutting down: kill every command, close every connection."""
        for process in list(self._processes.values()):
            if process.record.state == wire.PROCESS_STATE_RUNNING:
                process.killed = True
                await _kill(process.session)
        for name in list(self._links):
            link = self._links.pop(name)
            await link.close()
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=CONNECT_SECONDS)
        tasks = [p.task for p in self._processes.values() if p.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=CONNECT_SECONDS)
        for process in self._processes.values():
            if process.removal is not None:
                process.removal.cancel()


async def _kill(session: AgentSession) -> None:
    with contextlib.suppress(AgentError):
        await session.kill()


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
