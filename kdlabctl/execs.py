"""``kdlabctl exec``: run a command in a running VM's guest, as ``ssh HOST CMD``.

kdlabd starts the command through kdlab's agent in the guest (VM.Exec) and
hands back two pipes, the command's stdout and stderr, which are copied here
to kdlabctl's own as they come; kdlabctl's stdin, when it is not a terminal,
becomes the command's (passed to kdlabd as it is when it is a pipe or a
socket, through a pipe of kdlabctl's otherwise). kdlabctl exits with the
command's status: its exit code, 128 + N when signal N ended it, 124 when it
ran past ``--timeout``, 255 when the VM stopped under it.

Ctrl-C is the command's: without ``-t`` kdlabctl sends it SIGINT (SIGTERM and
SIGHUP go the same way); with ``-t`` the terminal is raw and the byte goes to
the command's own terminal in the guest, window changes following.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kdlab.errors import EXIT_LOST, EXIT_TIMEOUT, InvalidState, NoAgent
from kdlab.states import VMState
from kdlab.wire import (
    BUS_NAME,
    PROCESS_EXITED,
    PROCESS_INTERFACE,
    PROCESS_KILLED,
    PROCESS_PATH_PREFIX,
    PROCESS_SIGNALED,
    PROCESS_TIMEOUT,
)
from kdlabctl.quickbus import RemoteError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dbus_next import Message

    from kdlabctl.client import Client

EXITED_RULE = (
    f"type='signal',sender='{BUS_NAME}',interface='{PROCESS_INTERFACE}',"
    f"member='Exited',path_namespace='{PROCESS_PATH_PREFIX}'"
)
AGENT_RETRY_SECONDS = 0.5
"""How often ``--wait`` asks again for a guest whose agent is not up yet."""
LATE_EXIT_SECONDS = 10.0
"""How long kdlabctl waits for Exited once the output ended."""
COPY_SIZE = 1 << 20
DEFAULT_SIZE = (24, 80)
"""A terminal's rows and columns where kdlabctl has no terminal (``-t`` with
its output to a file)."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@dataclass(frozen=True)
class Command:
    """What to run, and how (``kdlabctl exec``'s options)."""

    argv: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = ""
    tty: bool = False
    timeout: float = 0.0
    wait: float = 0.0
    """Seconds to wait for the guest's agent to come up (a VM still booting)."""


@dataclass
class _Ends:
    """How a command ended, by its object's path: filled in by Exited."""

    exited: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def receive(self, message: Message) -> None:
        if message.member == "Exited" and message.interface == PROCESS_INTERFACE:
            code, signo, how = message.body
            self.exited[str(message.path)] = (int(code), int(signo), str(how))
            self.arrived.set()


def status(code: int, signo: int, how: str) -> int:
    """kdlabctl's exit status for a command that ended *how*."""
    if how == PROCESS_EXITED:
        return code
    if how in (PROCESS_SIGNALED, PROCESS_KILLED):
        return 128 + (signo or signal.SIGKILL)
    if how == PROCESS_TIMEOUT:
        return EXIT_TIMEOUT
    return EXIT_LOST


def ending(argv: Sequence[str], how: str, timeout: float) -> str | None:
    """What kdlabctl says about an end the command's own output cannot tell."""
    if how == PROCESS_TIMEOUT:
        return f"{argv[0]} ran past --timeout {timeout:g} and was killed"
    if how == PROCESS_KILLED:
        return f"{argv[0]} was killed"
    if how not in (PROCESS_EXITED, PROCESS_SIGNALED):
        return f"the VM stopped, or its agent went away, before {argv[0]} ended"
    return None


async def run(
    client: Client, name: str, command: Command, source: int | None = 0
) -> int:
    """Run *command* in VM *name* with kdlabctl's stdout and stderr, and
    *source* as its input (kdlabctl's stdin by default; None: none); its
    exit status."""
    with _hearing_ends(client) as ends:
        await client.add_match(EXITED_RULE)
        code, signo, how = await _run(client, name, command, source, ends)
        # One rule left per command would end the 513th of a connection
        # (modules load runs one per module) with the bus's limit.
        await client.remove_match(EXITED_RULE)
    if (said := ending(command.argv, how, command.timeout)) is not None:
        print(f"kdlabctl: {said}", file=sys.stderr)
    return status(code, signo, how)


@contextlib.contextmanager
def _hearing_ends(client: Client) -> Iterator[_Ends]:
    """The ends of commands, heard while the context lasts."""
    ends = _Ends()
    client.bus.add_message_handler(ends.receive)
    try:
        yield ends
    finally:
        client.bus.remove_message_handler(ends.receive)


async def _run(
    client: Client, name: str, command: Command, source: int | None, ends: _Ends
) -> tuple[int, int, str]:
    """:func:`run`'s command, its output copied; how it ended."""
    with _stdin(source, command.tty) as (stdin, raw):
        stdout, stderr, path = await _start(client, name, command, stdin)
        with _forwarding(client, path, raw):
            # Copied only once signals go to the command: what it printed
            # (a prompt: "press Ctrl-C") is seen when Ctrl-C reaches it.
            copies = [
                _copy_in_thread(stdout, sys.stdout.fileno()),
                _copy_in_thread(stderr, sys.stderr.fileno()),
            ]
            done = asyncio.gather(*(asyncio.to_thread(copy.join) for copy in copies))
            await done
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LATE_EXIT_SECONDS):
                    while path not in ends.exited:
                        ends.arrived.clear()
                        await ends.arrived.wait()
    return ends.exited.get(path) or await _read_end(client, path)


async def _read_end(client: Client, path: str) -> tuple[int, int, str]:
    """The end from the command's properties, when no Exited was heard."""
    try:
        props = await client.process(path)
    except RemoteError:
        return -1, 0, ""  # kdlabd went away: the command is lost
    return int(props["ExitCode"]), int(props["ExitSignal"]), str(props["How"])


async def _start(
    client: Client, name: str, command: Command, stdin: int | None
) -> tuple[int, int, str]:
    """Exec, asked again while the agent is not up and ``--wait`` allows."""
    options: dict[str, object] = {
        "env": command.env,
        "cwd": command.cwd or None,
        "tty": command.tty or None,
        "timeout": command.timeout or None,
    }
    if command.tty:
        options["rows"], options["cols"] = _size()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + command.wait
    while True:
        try:
            return await client.exec(name, command.argv, options, stdin)
        except RemoteError as err:
            if err.name != NoAgent.dbus_name() or loop.time() >= deadline:
                raise
            if (state := (await client.vm(name)).state) is not VMState.RUNNING:
                raise RemoteError(
                    InvalidState.dbus_name(),
                    f"VM {name} is {state}: it stopped before its agent answered "
                    f"(kdlabctl logs {name} shows its boot)",
                ) from None
        await asyncio.sleep(AGENT_RETRY_SECONDS)


@contextlib.contextmanager
def _stdin(fd: int | None, with_tty: bool) -> Iterator[tuple[int | None, bool]]:
    """The descriptor the command reads for *fd* (None: nothing), and whether
    the terminal was made raw for it (``-t`` on a terminal)."""
    if fd is None:
        yield None, False
        return
    if os.isatty(fd):
        if not with_tty:
            yield None, False  # like ssh -T: a terminal's input is not read
            return
        saved = termios.tcgetattr(fd)
        tty.setraw(fd)
        try:
            with _fed_by_loop(fd) as ours:
                yield ours, True
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        return
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        yield fd, False  # kdlabd reads it itself
        return
    with _fed_by_thread(fd) as ours:  # a file: kdlabd takes pipes only
        yield ours, False


@contextlib.contextmanager
def _fed_by_loop(terminal: int) -> Iterator[int]:
    """A pipe's read end that the event loop fills with what is typed on
    *terminal* (read when it has something: a thread blocked in a read of
    the terminal would outlive the command)."""
    loop = asyncio.get_running_loop()
    theirs, ours = os.pipe2(os.O_CLOEXEC)

    def typed() -> None:
        try:
            data = os.read(terminal, COPY_SIZE)
            if data:
                os.write(ours, data)
                return
        except OSError:
            pass
        loop.remove_reader(terminal)

    loop.add_reader(terminal, typed)
    try:
        yield theirs
    finally:
        loop.remove_reader(terminal)
        os.close(theirs)
        os.close(ours)


@contextlib.contextmanager
def _fed_by_thread(source: int) -> Iterator[int]:
    """A pipe's read end that a thread fills from *source* until its end."""
    theirs, ours = os.pipe2(os.O_CLOEXEC)
    _copy_in_thread(source, ours, close_source=False)
    try:
        yield theirs
    finally:
        os.close(theirs)


def _copy_in_thread(
    source: int, target: int, *, close_source: bool = True
) -> threading.Thread:
    """Copy *source* to *target* until the end, in a daemon thread (a blocked
    write to kdlabctl's stdout stalls neither stream's copy nor signals).
    The end of *source* closes a pipe *target* of kdlabctl's own."""

    def copy() -> None:
        try:
            _copy(source, target)
        except OSError:
            pass  # a reader that left (EPIPE), or a source that failed
        finally:
            if close_source:
                os.close(source)
            elif target not in (1, 2):
                os.close(target)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def _copy(source: int, target: int) -> None:
    """splice(2) while one side is a pipe and the other takes it, read and
    write otherwise."""
    splice: Callable[[int, int, int], int] | None = getattr(os, "splice", None)
    while True:
        if splice is not None:
            try:
                if splice(source, target, COPY_SIZE) == 0:
                    return
                continue
            except OSError:
                splice = None  # neither end is a pipe, or the target refuses
        data = os.read(source, COPY_SIZE)
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(target, view) :]


def _size() -> tuple[int, int]:
    """The size of kdlabctl's terminal (stdin's, or stdout's); 24x80 without."""
    for fd in (sys.stdin.fileno(), sys.stdout.fileno()):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        return max(size.lines, 1), max(size.columns, 1)
    return DEFAULT_SIZE


@contextlib.contextmanager
def _forwarding(client: Client, path: str, raw: bool) -> Iterator[None]:
    """Signals to kdlabctl go to the command; with a raw terminal, its
    window changes."""
    loop = asyncio.get_running_loop()
    sent: set[asyncio.Task[None]] = set()

    def forward(signo: int) -> None:
        task = loop.create_task(_quietly(client.signal_process(path, signo)))
        sent.add(task)
        task.add_done_callback(sent.discard)

    def resize() -> None:
        task = loop.create_task(_quietly(client.resize_process(path, *_size())))
        sent.add(task)
        task.add_done_callback(sent.discard)

    # A raw terminal sends Ctrl-C as a byte; a kill(1) still comes here.
    for signo in FORWARDED_SIGNALS:
        loop.add_signal_handler(signo, forward, signo)
    if raw:
        loop.add_signal_handler(signal.SIGWINCH, resize)
    try:
        yield
    finally:
        for signo in FORWARDED_SIGNALS:
            loop.remove_signal_handler(signo)
        if raw:
            loop.remove_signal_handler(signal.SIGWINCH)


async def _quietly(call: object) -> None:
    """A call whose failure does not matter (the command ended meanwhile)."""
    with contextlib.suppress(RemoteError):
        await call  # type: ignore[misc]
