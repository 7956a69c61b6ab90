"""The guest exec agent, built and run for real on the host, against kdlabd's link.

``kdlab-agent --fd N`` runs on one end of a socket pair, :class:`AgentLink` on
the other: the same protocol as over the VM's virtio-serial port, without a
VM (the vm tier runs the agent in a guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import pty
import random
import select
import signal
import socket
import subprocess
import time
import tty
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kdlab import agent
from kdlab.agent import protocol
from kdlab.agent.protocol import FrameType
from kdlabd.core.agentlink import AgentError, AgentLink, ExitStatus

SECONDS = 15  # a scenario that takes longer hangs


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent.build(tmp_path_factory.mktemp("agent-cache"))


@contextlib.contextmanager
def agent_on_socket(
    binary: Path,
) -> Iterator[tuple[socket.socket, subprocess.Popen[bytes]]]:
    """The agent on one end of a socket pair; the other end for the test.

    It starts with SIGINT ignored, as a shell leaves a command it starts in
    the background (``kdlab-agent &`` in an init script).
    """
    ours, theirs = socket.socketpair()
    process = subprocess.Popen(
        [
            "sh",
            "-c",
            'trap "" INT; exec "$0" "$@"',
            binary,
            "--fd",
            str(theirs.fileno()),
        ],
        pass_fds=[theirs.fileno()],
    )
    theirs.close()
    try:
        yield ours, process
    finally:
        ours.close()
        try:
            # The agent exits once its host hangs up (--fd).
            assert process.wait(timeout=5) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def open_link(sock: socket.socket) -> AgentLink:
    reader, writer = await asyncio.open_connection(sock=sock)
    link = AgentLink(reader, writer)
    await link.handshake(timeout=5)
    return link


def with_link(binary: Path, scenario: Callable[[AgentLink], Awaitable[None]]) -> None:
    """Run *scenario* on a link to a fresh agent."""

    async def main(sock: socket.socket) -> None:
        async with asyncio.timeout(SECONDS):
            link = await open_link(sock)
            try:
                await scenario(link)
            finally:
                await link.close()

    with agent_on_socket(binary) as (sock, _):
        asyncio.run(main(sock))


class Collect:
    """An output sink that keeps everything."""

    def __init__(self) -> None:
        self.data = {1: bytearray(), 2: bytearray()}
        self.eofs: list[int] = []
        self.grew = asyncio.Event()

    async def write(self, stream: int, data: bytes) -> None:
        assert stream not in self.eofs
        self.data[stream] += data
        self.grew.set()

    async def eof(self, stream: int) -> None:
        self.eofs.append(stream)

    @property
    def out(self) -> bytes:
        return bytes(self.data[1])

    @property
    def err(self) -> bytes:
        return bytes(self.data[2])

    async def until(self, text: bytes) -> None:
        while text not in self.out:
            self.grew.clear()
            await self.grew.wait()


class Digest:
    """An output sink that hashes stdout."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    async def write(self, stream: int, data: bytes) -> None:
        assert stream == 1
        self.sha.update(data)
        self.size += len(data)

    async def eof(self, stream: int) -> None:
        pass


async def run(
    link: AgentLink, argv: list[str], **options: Any
) -> tuple[ExitStatus, Collect]:
    sink = Collect()
    session = await link.spawn(argv, output=sink, **options)
    return await session.wait(), sink


def gone(pid: int) -> bool:
    """Whether *pid* died (a zombie: an agent that exited leaves it to init)."""
    try:
        return process_state(pid) == "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone while read
        return True


async def until_gone(pid: int) -> None:
    while not gone(pid):
        await asyncio.sleep(0.01)


def test_exit_status_and_both_streams(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        status, sink = await run(link, ["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert status == ExitStatus(7, 0)
        assert (sink.out, sink.err) == (b"out\n", b"err\n")
        assert sorted(sink.eofs) == [1, 2]

    with_link(binary, scenario)


def test_64_mib_of_stdout_arrive_intact(binary: Path, tmp_path: Path) -> None:
    data = random.Random(64).randbytes(64 << 20)
    (tmp_path / "data").write_bytes(data)

    async def scenario(link: AgentLink) -> None:
        sink = Digest()
        session = await link.spawn(["cat", str(tmp_path / "data")], output=sink)
        assert await session.wait() == ExitStatus(0, 0)
        assert sink.size == len(data)
        assert sink.sha.hexdigest() == hashlib.sha256(data).hexdigest()

    with_link(binary, scenario)


class Blocked(Collect):
    """A sink whose first write never returns until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def write(self, stream: int, data: bytes) -> None:
        await self.release.wait()
        await super().write(stream, data)


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


def test_a_blocked_sink_holds_back_its_command_and_no_other(
    binary: Path, tmp_path: Path
) -> None:
    size = 8 << 20
    (tmp_path / "data").write_bytes(b"x" * size)

    async def scenario(link: AgentLink) -> None:
        blocked = Blocked()
        slow = await link.spawn(["cat", str(tmp_path / "data")], output=blocked)
        while slow.held < protocol.WINDOW:  # the agent filled its window
            await asyncio.sleep(0.01)
        status, other = await run(
            link, ["head", "-c", str(size), str(tmp_path / "data")]
        )
        assert status == ExitStatus(0, 0)
        assert len(other.out) == size
        # cat is held back in the guest: alive, asleep on its full pipe, and
        # kdlabd holds no more of its output than the window.
        assert not slow.ended
        assert process_state(slow.pid) == "S"
        assert slow.held == protocol.WINDOW
        blocked.release.set()
        assert await slow.wait() == ExitStatus(0, 0)
        assert len(blocked.out) == size

    with_link(binary, scenario)


def test_stdin_waits_for_credit_while_the_command_does_not_read(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        session = await link.spawn(["sleep", "100"], stdin=True, output=Collect())
        writing = asyncio.create_task(session.write_stdin(bytes(4 * protocol.WINDOW)))
        done, _ = await asyncio.wait({writing}, timeout=0.5)
        assert not done
        assert session._credit == 0
        await session.kill()
        await writing  # returns once the session ended

    with_link(binary, scenario)


def test_eight_commands_in_parallel(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        script = 'head -c $((1 << 20)) /dev/zero | tr "\\0" "$1"; echo $1 >&2; exit $2'
        results = await asyncio.gather(
            *(
                run(link, ["sh", "-c", script, "sh", chr(ord("a") + n), str(n)])
                for n in range(8)
            )
        )
        for n, (status, sink) in enumerate(results):
            letter = chr(ord("a") + n).encode()
            assert status == ExitStatus(n, 0)
            assert sink.out == letter * (1 << 20)
            assert sink.err == letter + b"\n"

    with_link(binary, scenario)


def test_stdin_is_forwarded(binary: Path) -> None:
    data = random.Random(8).randbytes(8 << 20)

    async def scenario(link: AgentLink) -> None:
        sink = Collect()
        cat = await link.spawn(["cat"], stdin=True, output=sink)
        await cat.write_stdin(b"hello\n")
        await sink.until(b"hello\n")
        await cat.write_stdin(b"again")
        await cat.close_stdin()
        assert await cat.wait() == ExitStatus(0, 0)
        assert sink.out == b"hello\nagain"

        sink = Collect()
        digest = await link.spawn(["sha256sum"], stdin=True, output=sink)
        await digest.write_stdin(data)
        await digest.close_stdin()
        assert await digest.wait() == ExitStatus(0, 0)
        assert sink.out.split()[0].decode() == hashlib.sha256(data).hexdigest()

    with_link(binary, scenario)


def test_a_command_that_cannot_start_is_an_error_with_its_errno(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        with pytest.raises(AgentError) as missing:
            await link.spawn(["no-such-program-kdlab"], output=Collect())
        assert missing.value.errno == errno.ENOENT
        message = "no-such-program-kdlab: No such file or directory"
        assert missing.value.message == message

        with pytest.raises(AgentError) as nowhere:
            await link.spawn(["true"], cwd="/no/such/dir", output=Collect())
        assert nowhere.value.errno == errno.ENOENT
        assert "/no/such/dir" in nowhere.value.message
        # The link goes on.
        assert (await run(link, ["true"]))[0] == ExitStatus(0, 0)

    with_link(binary, scenario)


def test_sigint_ends_a_command(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        session = await link.spawn(["sleep", "100"], output=Collect())
        await session.signal(signal.SIGINT)
        assert await session.wait() == ExitStatus(-1, signal.SIGINT)

    with_link(binary, scenario)


def test_a_terminal(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        status, sink = await run(link, ["sh", "-c", "tty; stty size"], tty=(33, 101))
        assert status == ExitStatus(0, 0)
        name, size = sink.out.decode().splitlines()
        assert name.startswith("/dev/pts/")
        assert size == "33 101"
        assert sink.err == b""

        sink = Collect()
        script = "stty size; read line; stty size"
        session = await link.spawn(
            ["sh", "-c", script], tty=(24, 80), stdin=True, output=sink
        )
        await sink.until(b"24 80\r\n")
        await session.resize(50, 132)
        await session.write_stdin(b"\n")
        assert await session.wait() == ExitStatus(0, 0)
        assert sink.out.endswith(b"50 132\r\n")

        sleeper = await link.spawn(
            ["sleep", "100"], tty=(24, 80), stdin=True, output=Collect()
        )
        await sleeper.write_stdin(b"\x03")  # Ctrl-C
        assert await sleeper.wait() == ExitStatus(-1, signal.SIGINT)

    with_link(binary, scenario)


def test_environment_and_directory(binary: Path, tmp_path: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        script = 'echo "$FOO|$HOME|$PATH"; pwd'
        status, sink = await run(link, ["sh", "-c", script])
        assert status == ExitStatus(0, 0)
        defaults = protocol.DEFAULT_ENV
        assert sink.out.decode() == f"|{defaults['HOME']}|{defaults['PATH']}\n/\n"

        status, sink = await run(
            link,
            ["sh", "-c", script],
            env={"FOO": "a b=c", "HOME": "/x"},
            cwd=str(tmp_path),
        )
        assert sink.out.decode() == f"a b=c|/x|{defaults['PATH']}\n{tmp_path}\n"

    with_link(binary, scenario)


def test_kill_ends_the_command(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        sink = Collect()
        script = "sleep 100 & echo $!; sleep 100"
        session = await link.spawn(["sh", "-c", script], output=sink)
        await sink.until(b"\n")
        background = int(sink.out)
        await session.kill()
        assert await session.wait() == ExitStatus(-1, signal.SIGKILL)
        # The whole process group.
        await until_gone(session.pid)
        await until_gone(background)
        assert (await run(link, ["true"]))[0] == ExitStatus(0, 0)

    with_link(binary, scenario)


def test_closing_the_link_ends_sessions_and_kills_commands(binary: Path) -> None:
    async def main(sock: socket.socket) -> None:
        async with asyncio.timeout(SECONDS):
            link = await open_link(sock)
            session = await link.spawn(["sleep", "100"], output=Collect())
            await link.close()
            assert link.closed
            with pytest.raises(AgentError, match="the guest agent went away"):
                await session.wait()
            with pytest.raises(AgentError, match="the guest agent went away"):
                await link.spawn(["true"], output=Collect())
            await until_gone(session.pid)

    with agent_on_socket(binary) as (sock, _):
        asyncio.run(main(sock))


def test_no_answer_is_an_error() -> None:
    async def main() -> None:
        ours, silent = socket.socketpair()
        with ours, silent:
            link = AgentLink(*await asyncio.open_connection(sock=ours))
            with pytest.raises(AgentError, match="no answer from the guest agent"):
                await link.handshake(timeout=0.2)
            assert link.closed

    asyncio.run(main())


def read_frames(fd: int) -> Iterator[tuple[int, int, bytes]]:
    """Frames read from descriptor *fd* as (type, session, payload)."""
    buffer = b""

    def more() -> bytes:
        ready, _, _ = select.select([fd], [], [], SECONDS)
        assert ready, "the agent does not answer"
        chunk = os.read(fd, 1 << 16)
        assert chunk, "the agent hung up"
        return chunk

    while True:
        while len(buffer) < protocol.HEADER_SIZE:
            buffer += more()
        length, session, kind = protocol.parse_header(buffer[: protocol.HEADER_SIZE])
        while len(buffer) < protocol.HEADER_SIZE + length:
            buffer += more()
        end = protocol.HEADER_SIZE + length
        yield kind, session, buffer[protocol.HEADER_SIZE : end]
        buffer = buffer[end:]


def spawn_frame(session: int, argv: list[str]) -> bytes:
    return protocol.frame(
        FrameType.SPAWN, session, protocol.spawn(argv, {}, None, None, False)
    )


def test_a_new_hello_kills_the_sessions_of_the_last_host(binary: Path) -> None:
    with agent_on_socket(binary) as (sock, _):
        frames = read_frames(sock.fileno())
        sock.sendall(protocol.hello(11) + spawn_frame(5, ["sleep", "100"]))
        assert next(frames) == (FrameType.HELLO, 11, protocol.u32(1))
        kind, session, payload = next(frames)
        assert (kind, session) == (FrameType.STARTED, 5)
        pid = protocol.parse_u32(payload)
        assert not gone(pid)

        sock.sendall(protocol.hello(12))
        assert next(frames) == (FrameType.HELLO, 12, protocol.u32(1))
        deadline = time.monotonic() + SECONDS
        while not gone(pid):
            assert time.monotonic() < deadline, "the last host's command lives on"
            time.sleep(0.01)
        # Session 5 was forgotten: the new host may use its id again.
        sock.sendall(spawn_frame(5, ["true"]))
        assert next(frames)[:2] == (FrameType.STARTED, 5)


def garbage(rng: random.Random) -> bytes:
    """A few hundred frames of nonsense, some close to sense."""
    sessions = [0, 1, 2, 3, rng.getrandbits(32)]
    out = []
    for _ in range(400):
        session = rng.choice(sessions)
        roll = rng.random()
        kind = rng.choice(list(FrameType)) if roll < 0.85 else rng.getrandbits(16)
        if kind == FrameType.SPAWN and rng.random() < 0.3:
            argv = [rng.choice(["true", "cat", "sleep"]), "100"]
            payload = protocol.spawn(
                argv, {}, None, (rng.getrandbits(16), rng.getrandbits(16)), True
            )
        elif kind == FrameType.SPAWN:
            payload = b"".join(
                bytes([rng.randrange(8)])
                + rng.getrandbits(32).to_bytes(4, "big")[: rng.randrange(5)]
                + rng.randbytes(rng.randrange(20))
                for _ in range(rng.randrange(6))
            )
        else:
            payload = rng.randbytes(rng.choice([0, 1, 4, 5, 8, rng.randrange(3000)]))
        flags = rng.getrandbits(16) if rng.random() < 0.1 else 0
        out.append(protocol.HEADER.pack(len(payload), session, kind, flags) + payload)
        if rng.random() < 0.02:  # a length over the limit: the framing is lost
            out.append(protocol.HEADER.pack(protocol.MAX_PAYLOAD + 1, 1, 9, 0))
            out.append(rng.randbytes(rng.randrange(100)))
    return b"".join(out)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_garbage_frames_do_not_break_the_agent(binary: Path, seed: int) -> None:
    async def main(sock: socket.socket) -> None:
        async with asyncio.timeout(SECONDS):
            reader, writer = await asyncio.open_connection(sock=sock)

            async def discard() -> None:
                while await reader.read(1 << 16):
                    pass

            answers = asyncio.create_task(discard())
            writer.write(garbage(random.Random(seed)))
            await writer.drain()
            answers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answers
            link = AgentLink(reader, writer)
            await link.handshake(timeout=5)
            status, sink = await run(link, ["echo", "still here"])
            assert (status, sink.out) == (ExitStatus(0, 0), b"still here\n")
            await link.close()

    with agent_on_socket(binary) as (sock, _):
        asyncio.run(main(sock))


def test_build_reuses_the_binary(binary: Path) -> None:
    again = agent.build(binary.parent)
    assert again == binary
    assert binary.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in binary.parent.iterdir()] == [binary.name]


def test_build_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent, "CC", "no-such-cc-kdlab")
    with pytest.raises(agent.AgentBuildError, match="install gcc and libc6-dev"):
        agent.build(tmp_path)

    monkeypatch.setattr(agent, "CC", "cc")
    broken = tmp_path / "agent.c"
    broken.write_text("int main(void) { return missing; }\n")
    monkeypatch.setattr(agent, "SOURCE", broken)
    with pytest.raises(agent.AgentBuildError, match="install gcc and") as error:
        agent.build(tmp_path / "cache")
    assert "missing" in str(error.value)  # cc's own message
    assert list((tmp_path / "cache").iterdir()) == []


class Failing(Collect):
    async def write(self, stream: int, data: bytes) -> None:
        raise BrokenPipeError(f"{len(data)} bytes of stream {stream} refused")


def test_a_sink_that_fails_kills_its_command(binary: Path) -> None:
    async def scenario(link: AgentLink) -> None:
        script = "echo $$; exec sleep 100"
        session = await link.spawn(["sh", "-c", script], output=Failing())
        with pytest.raises(AgentError, match="output could not be written"):
            await session.wait()
        await until_gone(session.pid)
        assert (await run(link, ["true"]))[0] == ExitStatus(0, 0)

    with_link(binary, scenario)


def test_a_guest_cannot_make_kdlabd_hold_more_than_the_window() -> None:
    """A fake guest that ignores flow control: kdlabd keeps at most WINDOW
    bytes of a session in a bounded number of pieces, then drops the link."""
    more = asyncio.Event()

    async def guest(sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        header = await reader.readexactly(protocol.HEADER_SIZE)
        length, token, kind = protocol.parse_header(header)
        assert kind == FrameType.HELLO
        await reader.readexactly(length)
        writer.write(protocol.hello(token))
        length, session, kind = protocol.parse_header(
            await reader.readexactly(protocol.HEADER_SIZE)
        )
        assert kind == FrameType.SPAWN
        await reader.readexactly(length)
        writer.write(protocol.frame(FrameType.STARTED, session, protocol.u32(99)))
        # Tiny frames of both streams in turn: each one a piece of its own?
        for n in range(20000):
            kind = FrameType.STDOUT if n % 2 else FrameType.STDERR
            writer.write(protocol.frame(kind, session, b"x"))
        await writer.drain()
        await more.wait()
        for _ in range(5):
            writer.write(protocol.frame(FrameType.STDOUT, session, bytes(1 << 16)))
        await writer.drain()
        await reader.read()  # until kdlabd hangs up

    async def main() -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            async with asyncio.timeout(SECONDS):
                guest_task = asyncio.create_task(guest(theirs))
                link = AgentLink(*await asyncio.open_connection(sock=ours))
                await link.handshake(timeout=5)
                session = await link.spawn(["cat"], output=Blocked())
                while session.held < 20000:
                    await asyncio.sleep(0.01)
                assert len(session._items) <= 70
                more.set()
                with pytest.raises(AgentError, match="the guest agent went away"):
                    await session.wait()
                assert link.closed
                await guest_task

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_port_is_awaited_and_its_hang_up_survived(
    binary: Path, tmp_path: Path
) -> None:
    """--port, on a raw pseudo-terminal standing in for the virtio port: the
    agent waits for the port to appear; when the host hangs up it kills the
    commands, neither exits nor spins, and looks again every 100 ms."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    port = tmp_path / "port"
    process = subprocess.Popen(
        [binary, "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        ready, _, _ = select.select([process.stderr], [], [], SECONDS)
        assert ready, "the agent does not say it waits for its port"
        assert f"waiting for {port}" in process.stderr.readline()
        port.symlink_to(os.ttyname(slave))
        frames = read_frames(master)
        os.write(master, protocol.hello(7) + spawn_frame(1, ["sleep", "100"]))
        assert next(frames) == (FrameType.HELLO, 7, protocol.u32(1))
        kind, _, payload = next(frames)
        assert kind == FrameType.STARTED
        pid = protocol.parse_u32(payload)

        os.close(master)
        deadline = time.monotonic() + SECONDS
        while not gone(pid):
            assert time.monotonic() < deadline, "the command outlived its host"
            time.sleep(0.01)
        before = cpu_seconds(process.pid)
        time.sleep(1)
        assert process.poll() is None
        assert cpu_seconds(process.pid) - before < 0.3  # a spinning loop: ~1
    finally:
        os.close(slave)
        process.kill()
        process.wait()
