"""The bridge (``kdlabctl --host``'s transport) relays a bus with its descriptors.

Here the back runs as a plain child process (``kdlabctl.bridge.serve`` on the
private bus), not through ssh: what is tested is the relay. The vm tier
(tests/vm/test_remote.py) runs it through a real sshd.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Message, Variant

from kdlab.agent.protocol import HEADER
from kdlab.errors import EXIT_UNAVAILABLE
from kdlab.wire import VM_INTERFACE
from kdlabctl import bridge, quickbus
from tests.bus import hostileback
from tests.bus.conftest import Ctl
from tests.bus.gdbstub import RemoteStub
from tests.support import REPO
from tests.support.bus import BusClient, PrivateBus
from tests.support.clients import (
    NOBODY,
    assert_no_traceback,
    client_env,
    kdlabctl,
    kdlabctl_argv,
    read_until,
    run_tool,
)
from tests.support.testdriver import Lab
from tests.support.timeouts import CALL_TIMEOUT

pytestmark = pytest.mark.bus


def back_argv(address: str) -> list[str]:
    """The back, as ssh would start it on the host, but here and at once."""
    code = (
        f"import sys; from kdlabctl import bridge; sys.exit(bridge.serve({address!r}))"
    )
    return [sys.executable, "-c", code]


@pytest.fixture
def session(bus: PrivateBus) -> Iterator[bridge.Session]:
    opened = bridge.open_session(back_argv(bus.address), "test-host")
    yield opened
    opened.close()


def test_hello_says_who_the_caller_is_on_the_host(session: bridge.Session) -> None:
    assert session.remote is not None
    assert session.remote.uid == 0
    assert session.remote.user == "root"


@pytest.mark.usefixtures("kdlabd")
def test_list_through_the_bridge_is_the_same(session: bridge.Session, ctl: Ctl) -> None:
    direct = ctl("list", "--json")
    relayed = kdlabctl(session.bus, "list", "--json")
    assert relayed.returncode == 0, relayed.stderr
    assert json.loads(relayed.stdout) == json.loads(direct.stdout)
    shown = kdlabctl(session.bus, "show", "--json", "booted")
    assert shown.returncode == 0, shown.stderr


@pytest.mark.usefixtures("kdlabd")
def test_errors_keep_their_names_and_exit_codes(
    session: bridge.Session, ctl: Ctl
) -> None:
    direct = ctl("show", "no-such-vm")
    relayed = kdlabctl(session.bus, "show", "no-such-vm")
    assert direct.returncode == 4
    assert (relayed.returncode, relayed.stderr) == (direct.returncode, direct.stderr)


@pytest.mark.usefixtures("kdlabd")
def test_files_cross_and_are_judged_by_their_content(
    session: bridge.Session, ctl: Ctl, kernels: dict[str, Path]
) -> None:
    """kdlabd reads what crossed: a bzImage passes its checks (and reaches the
    test driver's upload, which it does not have), text is no kernel."""
    for kernel, expected in (("bzImage", 7), ("text", 2), ("empty", 2)):
        args = ("create", f"crossed-{kernel}", "--kernel", str(kernels[kernel]))
        direct = ctl(*args, "--no-initramfs")
        relayed = kdlabctl(session.bus, *args, "--no-initramfs")
        assert direct.returncode == expected, direct.stderr
        assert (relayed.returncode, relayed.stderr) == (expected, direct.stderr)


def test_logs_follow_a_log_that_grows_on_the_host(
    kdlabd: Lab, client: BusClient, session: bridge.Session
) -> None:
    log = kdlabd.layout.console_log("busy")
    logs = subprocess.Popen(
        kdlabctl_argv(session.bus, "logs", "-f", "busy"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=client_env(),
        cwd=REPO,
    )
    try:
        assert logs.stdout is not None
        read = read_until(logs.stdout.fileno(), "console of busy\n", CALL_TIMEOUT)
        with log.open("a") as boot:
            boot.write("later line\n")
        read += read_until(logs.stdout.fileno(), "later line\n", CALL_TIMEOUT)
        with log.open("a") as boot:
            boot.write("last words\n")
        stop = {"force": Variant("b", True)}
        client.ok(client.vm_path("busy"), VM_INTERFACE, "Stop", "a{sv}", [stop])
        out, err = logs.communicate(timeout=CALL_TIMEOUT)
    finally:
        if logs.poll() is None:
            logs.kill()
            logs.wait()
    assert_no_traceback(err.decode())
    assert logs.returncode == 0, err
    # What the boot wrote before it stopped is printed before the follow ends.
    assert read + out.decode() == "console of busy\nlater line\nlast words\n"


@pytest.mark.usefixtures("guest")
def test_exec_streams_cross_both_ways(session: bridge.Session) -> None:
    """A command's stdin (a pipe of ours), its stdout and stderr (pipes of
    kdlabd's) and its status, relayed; 16 MiB of output arrives intact."""
    script = "cat; echo err >&2; head -c 16777216 /dev/urandom | tee /tmp/kdlab-$$ "
    script += "| sha256sum >&2; cat /tmp/kdlab-$$; rm /tmp/kdlab-$$; exit 7"
    done = subprocess.run(
        kdlabctl_argv(session.bus, "exec", "busy", "--", "sh", "-c", script),
        input=b"typed here\n",
        capture_output=True,
        env=client_env(),
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 7, done.stderr
    assert done.stdout[:11] == b"typed here\n"
    err, digest = done.stderr.decode().split("\n")[:2]
    assert err == "err"
    assert digest.split()[0] == hashlib.sha256(done.stdout[11:]).hexdigest()
    assert len(done.stdout) == 11 + (16 << 20)


def rss_kib() -> int:
    """This process's resident memory (the front runs in it)."""
    status = Path("/proc/self/status").read_text()
    (line,) = [ln for ln in status.splitlines() if ln.startswith("VmRSS:")]
    return int(line.split()[1])


@pytest.mark.usefixtures("guest")
def test_a_reader_that_does_not_read_holds_back_only_its_own_stream(
    session: bridge.Session,
) -> None:
    """One command's output nobody reads stalls that command, not the link:
    another command on the same session runs; nothing buffers the flood."""
    script = "echo started >&2; head -c 1073741824 /dev/zero"
    stalled = subprocess.Popen(
        kdlabctl_argv(session.bus, "exec", "busy", "--", "sh", "-c", script),
        stdout=subprocess.PIPE,  # never read
        stderr=subprocess.PIPE,
        env=client_env(),
        cwd=REPO,
    )
    try:
        assert stalled.stderr is not None
        read_until(stalled.stderr.fileno(), "started\n", CALL_TIMEOUT)
        before = rss_kib()
        quick = subprocess.run(
            kdlabctl_argv(session.bus, "exec", "busy", "--", "echo", "through"),
            capture_output=True,
            env=client_env(),
            cwd=REPO,
            timeout=CALL_TIMEOUT,
            check=False,
        )
        time.sleep(1)  # the flood keeps pushing meanwhile: it must not pile up here
        grown = rss_kib() - before
    finally:
        stalled.kill()
        stalled.wait()
    assert (quick.returncode, quick.stdout) == (0, b"through\n"), quick.stderr
    assert grown < 32 * 1024, f"the front grew by {grown} KiB"


def test_gdb_runs_here_on_the_hosts_stub(
    kdlabd: Lab, session: bridge.Session, tmp_path: Path
) -> None:
    """gdb runs on this side with a file of this side; the stub's stream
    crosses (a socket of kdlabd's): gdb attaches, reads registers, detaches."""
    vmlinux = tmp_path / "vmlinux"
    shutil.copy("/bin/true", vmlinux)
    stub = RemoteStub(kdlabd.layout.gdb_socket("busy"))
    try:
        done = subprocess.run(
            kdlabctl_argv(
                session.bus, "gdb", "busy", "--vmlinux", str(vmlinux), "--batch",
                "-ex", "p/x $rsp",
            ),
            capture_output=True,
            text=True,
            env=client_env(),
            cwd=REPO,
            timeout=CALL_TIMEOUT,
            check=False,
        )  # fmt: skip
    finally:
        stub.close()
    assert done.returncode == 0, done.stderr
    assert "$1 = 0x0" in done.stdout
    assert stub.attached == [True]


@pytest.mark.parametrize(
    "argv",
    [
        # systemd's sd-bus (cockpit-bridge's: kdlabctl web --host's page)
        # sends AUTH EXTERNAL without the uid and waits for DATA.
        ["busctl", "--address={bus}", "call", "org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId"],
        # libdbus sends its uid with AUTH EXTERNAL.
        ["dbus-send", "--bus={bus}", "--print-reply",
         "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
         "org.freedesktop.DBus.GetId"],
    ],
    ids=["sd-bus", "libdbus"],
)  # fmt: skip
def test_other_clients_handshakes_are_answered(
    session: bridge.Session, client: BusClient, argv: list[str]
) -> None:
    """Each D-Bus library's way of authenticating reaches the host's bus."""
    done = run_tool([word.format(bus=session.bus) for word in argv])
    assert done.returncode == 0, done.stderr
    bus = "org.freedesktop.DBus"
    get_id = client.call("/org/freedesktop/DBus", bus, "GetId", destination=bus)
    assert re.findall(r"[0-9a-f]{32}", done.stdout) == get_id.body


@pytest.mark.usefixtures("kdlabd")
def test_nobody_else_may_use_the_session(session: bridge.Session) -> None:
    """The session's socket is the host's bus as the ssh user: another local
    user must not reach it (a directory only its user may enter)."""
    done = kdlabctl(session.bus, "list", user=NOBODY)
    assert done.returncode == EXIT_UNAVAILABLE
    assert "Permission denied" in done.stderr
    assert stat.S_IMODE(os.stat(session.directory).st_mode) == 0o700


def test_an_unreachable_host_says_what_ssh_said() -> None:
    said = "ssh: connect to host lab port 22: Connection refused"
    argv = ["sh", "-c", f"echo '{said}' >&2; exit 255"]
    began = time.monotonic()
    with pytest.raises(bridge.Unreachable) as caught:
        bridge.open_session(argv, "lab")
    assert str(caught.value) == f"cannot reach lab over ssh: {said}"
    assert time.monotonic() - began < CALL_TIMEOUT


def test_a_host_without_kdlabctl_says_so() -> None:
    argv = ["sh", "-c", "exec kdlabctl-is-not-here"]
    with pytest.raises(bridge.Unreachable) as caught:
        bridge.open_session(argv, "lab")
    assert "kdlabctl on lab did not start (exit 127)" in str(caught.value)
    assert "not found" in str(caught.value)


def test_a_host_whose_bus_is_down_is_unreachable() -> None:
    with pytest.raises(bridge.Unreachable) as caught:
        bridge.open_session(back_argv("unix:path=/nonexistent/bus"), "lab")
    assert str(caught.value).startswith("on lab: cannot connect to the unix:path=")


# --- a host that breaks the rules, and faults -----------------------------------

# ssh as kdlabctl --host runs it: this one starts $FAKE_SSH_BACK (a JSON argv)
# in its place, after writing its pid to $FAKE_SSH_PID.
FAKE_SSH = """#!{python}
import json, os
with open(os.environ["FAKE_SSH_PID"], "w") as pid:
    pid.write(str(os.getpid()))
argv = json.loads(os.environ["FAKE_SSH_BACK"])
os.execv(argv[0], argv)
"""


class FakeHost:
    """``kdlabctl --host evil`` where ssh runs a back of the test's choosing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "bin").mkdir()
        (directory / "tmp").mkdir()
        ssh = directory / "bin" / "ssh"
        ssh.write_text(FAKE_SSH.format(python=sys.executable))
        ssh.chmod(0o755)
        self.pid_file = directory / "ssh.pid"

    def env(self, back: list[str]) -> dict[str, str]:
        return {
            "PATH": f"{self.directory / 'bin'}:{os.environ['PATH']}",
            "TMPDIR": str(self.directory / "tmp"),
            "XDG_CONFIG_HOME": str(self.directory),
            "FAKE_SSH_BACK": json.dumps(back),
            "FAKE_SSH_PID": str(self.pid_file),
        }

    def popen(self, back: list[str], *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "kdlabctl", "--host", "evil", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**client_env(), **self.env(back)},
            cwd=REPO,
        )

    def run(self, back: list[str], *args: str) -> tuple[int, str]:
        """kdlabctl's status and stderr; it must end within CALL_TIMEOUT."""
        process = self.popen(back, *args)
        try:
            _, err = process.communicate(timeout=CALL_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = err.decode(errors="replace")
        assert_no_traceback(text)
        return process.returncode, text

    def ssh_pid(self) -> int:
        deadline = time.monotonic() + CALL_TIMEOUT
        while not self.pid_file.exists() or not self.pid_file.read_text():
            assert time.monotonic() < deadline, "ssh did not start"
            time.sleep(0.05)
        return int(self.pid_file.read_text())

    def left_behind(self) -> list[str]:
        return sorted(os.listdir(self.directory / "tmp"))


@pytest.fixture
def fake_host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path)


def test_a_hello_whose_uid_is_no_uid_is_a_malformed_hello(fake_host: FakeHost) -> None:
    status, err = fake_host.run(hostileback.argv("huge_uid"), "list")
    assert status == EXIT_UNAVAILABLE
    assert err == "kdlabctl: kdlabctl on evil sent a malformed hello\n"
    assert fake_host.left_behind() == []


def test_a_host_that_dies_before_it_answers_a_connection(fake_host: FakeHost) -> None:
    """The command's connection waited for the host's CONNECTED: the end of
    ssh ends it (it waited for ever), with why."""
    status, err = fake_host.run(hostileback.argv("accept_and_vanish"), "list")
    assert status == EXIT_UNAVAILABLE
    assert err.endswith(
        "kdlabctl: the connection to evil was lost: the ssh channel closed\n"
    )
    assert fake_host.left_behind() == []


@pytest.mark.usefixtures("guest")
def test_a_command_ends_when_ssh_dies_under_it(
    bus: PrivateBus, fake_host: FakeHost
) -> None:
    """ssh killed while a command runs on the host: kdlabctl ends with why
    (it waited for ever for the command's end)."""
    script = "echo started; sleep 100"
    running = fake_host.popen(back_argv(bus.address), "exec", "busy", "--", "sh",
                              "-c", script)  # fmt: skip
    try:
        assert running.stdout is not None
        read_until(running.stdout.fileno(), "started\n", CALL_TIMEOUT)
        os.kill(fake_host.ssh_pid(), signal.SIGKILL)
        _, err = running.communicate(timeout=CALL_TIMEOUT)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert_no_traceback(err.decode())
    assert running.returncode == EXIT_UNAVAILABLE, err
    assert err.decode().endswith(
        "kdlabctl: the connection to evil was lost: the ssh channel closed\n"
    )
    assert fake_host.left_behind() == []


class Side:
    """The front's bridge, its link a socket pair whose other end the test
    plays: whatever it sends, the front must end the link with why, never
    raise, never hold more than its window."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.raised: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, seen: self.raised.append(seen))
        self._ours, self.peer = socket.socketpair()
        self.lost = ""
        self.bridge = bridge.Bridge(self.loop, front=True)
        self.bridge.link = bridge.Link(
            self.loop,
            self._ours.fileno(),
            self._ours.fileno(),
            self.bridge.on_frame,
            self._lose,
            hunt=False,
        )
        self._writers: list[threading.Thread] = []

    def _lose(self, why: str) -> None:
        self.lost = why

    def send(self, *frames: tuple[int, int, bytes]) -> None:
        """Frames (kind, channel, payload) from the other side, written by a
        thread (the front reads them while it runs)."""
        data = b"".join(
            HEADER.pack(len(payload), number, kind, 0) + payload
            for kind, number, payload in frames
        )
        writer = threading.Thread(target=self._write, args=(data,), daemon=True)
        writer.start()
        self._writers.append(writer)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the front ended the link
            self.peer.sendall(data)

    def why_lost(self) -> str:
        """Run the front until it ends the link: why it did."""
        self.run_until(lambda: bool(self.lost))
        return self.lost

    def run_until(self, done: Callable[[], bool]) -> None:
        """Run the front until *done* holds (or the tests' time runs out)."""
        deadline = self.loop.time() + CALL_TIMEOUT
        while not done() and self.loop.time() < deadline:
            self.loop.run_until_complete(asyncio.sleep(0.05))
        assert self.raised == []

    def close(self) -> None:
        self.bridge.close()
        self.loop.close()
        self._ours.close()
        self.peer.close()
        for writer in self._writers:
            writer.join(CALL_TIMEOUT)


@pytest.fixture
def side() -> Iterator[Side]:
    played = Side()
    yield played
    played.close()


def open_frame(number: int, kind: bridge.Kind) -> tuple[int, int, bytes]:
    return bridge.Frame.OPEN, number, bytes([kind])


def test_a_host_that_opens_descriptors_without_end(side: Side) -> None:
    """Each OPEN costs the front descriptors (it ran out of them, with a
    traceback, and kept going)."""
    before = len(os.listdir("/proc/self/fd"))
    side.send(*(open_frame(n, bridge.Kind.READER) for n in range(2, 200_000, 2)))
    assert side.why_lost() == "more than 256 descriptors opened at once"
    assert len(os.listdir("/proc/self/fd")) < before + 2 * 256 + 16


def test_a_host_that_sends_beyond_the_window(side: Side) -> None:
    """A pipe's bytes past its window, for a reader that does not read: the
    front kept them all."""
    chunk = bytes(65536)
    flood = [(bridge.Frame.DATA, 2, chunk)] * 64
    side.send(open_frame(2, bridge.Kind.READER), *flood)
    assert side.why_lost() == "more bytes than the window, without credit"


def test_a_host_that_acks_bytes_never_sent(side: Side, tmp_path: Path) -> None:
    """Credit beyond the window: the front read the whole file into memory."""
    kernel = tmp_path / "kernel"
    kernel.write_bytes(os.urandom(1 << 20) * 8)
    fd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    side.loop.create_task(side.bridge.send_message(1, b"call", [fd]))
    side.send((bridge.Frame.ACK, 1, struct.pack(">I", 0xFFFFFFFF)))
    assert side.why_lost() == "an ACK of bytes that were never sent"
    assert side.bridge.link.backlog <= 2 * bridge.WINDOW


def signal_with_a_file() -> bytes:
    with open(os.devnull, "rb") as null:
        message = Message.new_signal("/", "org.example.T", "F", "h", [0])
        message.unix_fds = [null.fileno()]
        return bytes(message._marshall(negotiate_unix_fd=True))


@pytest.mark.parametrize(
    ("sent", "carried"),
    [
        # A file that never SYNCed: the client waited for a descriptor.
        ([open_frame(2, bridge.Kind.FILE), (bridge.Frame.DATA, 2, b"x")], [2]),
        # A message cut short: the client read the next one's bytes as its own.
        ([], []),
    ],
)
def test_a_host_whose_message_is_not_what_a_client_can_read(
    side: Side, sent: list[tuple[int, int, bytes]], carried: list[int]
) -> None:
    client, ours = socket.socketpair()
    side.bridge.channels[1] = bridge.Connection(side.bridge, 1, ours)
    message = signal_with_a_file()
    if not carried:
        message = message[:-1]
    numbers = struct.pack(f">H{len(carried)}I", len(carried), *carried)
    side.send(*sent, (bridge.Frame.MESSAGE, 1, numbers + message))
    assert side.why_lost() == "a MESSAGE that is no D-Bus message with its files"
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(1)
    client.close()


def test_a_client_that_reads_nothing_loses_its_connection(
    side: Side, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages for a local client that does not read pile up only to a
    limit (dbus-daemon's, here made small): then its connection closes."""
    monkeypatch.setattr(bridge, "_MAX_UNREAD", 1 << 20)
    client, ours = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    side.bridge.channels[1] = connection = bridge.Connection(side.bridge, 1, ours)
    call = quickbus.Call("a.b", "/a", "a.b", "M", signature="s", body=["x" * 60000])
    message = struct.pack(">H", 0) + quickbus.message(1, call)
    side.send(*[(bridge.Frame.MESSAGE, 1, message)] * 64)
    side.run_until(lambda: connection.sock.fileno() == -1)
    assert connection.sock.fileno() == -1, "the connection is still open"
    assert 1 not in side.bridge.channels
    assert not side.lost, "only that connection ended"
    client.close()


def test_ctrl_c_while_the_host_is_reached_leaves_nothing(fake_host: FakeHost) -> None:
    """Ctrl-C before the host answered: ssh ended, the session's directory
    gone (both were left behind)."""
    reaching = fake_host.popen(["/bin/sleep", "60"], "list")
    try:
        ssh = fake_host.ssh_pid()
        reaching.send_signal(signal.SIGINT)
        _, err = reaching.communicate(timeout=CALL_TIMEOUT)
    finally:
        if reaching.poll() is None:
            reaching.kill()
            reaching.wait()
    assert_no_traceback(err.decode())
    assert reaching.returncode == 130
    assert fake_host.left_behind() == []
    with pytest.raises(ProcessLookupError):
        os.kill(ssh, 0)
