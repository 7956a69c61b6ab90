"""Debug access brokered by kdlabd: a connected gdbstub stream handed over D-Bus.

The test driver runs no QEMU, so a stand-in gdbstub listens where kdlabd
expects the VM's private stub socket; kdlabd connects to it and passes the
connection to the caller as a descriptor (type ``h``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kdlab.wire import VM_INTERFACE
from tests.bus.gdbstub import RemoteStub
from tests.support.bus import BusClient, PrivateBus
from tests.support.clients import client_env, kdlabctl_argv
from tests.support.testdriver import Lab

pytestmark = pytest.mark.bus

PACKET = b"$?#3f"  # gdb: why did the target stop?
REPLY = b"+$S05#b8"  # ack, then: stopped by SIGTRAP


class FakeStub:
    """Answers one packet on a unix socket like QEMU's gdbstub, then hangs up."""

    def __init__(self, path: str) -> None:
        self.received = b""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        with conn:
            self.received = conn.recv(4096)
            conn.sendall(REPLY)

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._server.close()


@pytest.fixture
def stub(kdlabd: Lab) -> Iterator[FakeStub]:
    """A stand-in for the gdbstub of the running VM "busy"."""
    path = kdlabd.layout.gdb_socket("busy")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fake = FakeStub(str(path))
    yield fake
    fake.close()


def read_until_eof(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    return data


def test_open_gdb_hands_over_a_connected_stream(
    client: BusClient, stub: FakeStub
) -> None:
    reply = client.call(client.vm_path("busy"), VM_INTERFACE, "OpenGdb")
    assert reply.error_name is None, reply.body
    assert reply.signature == "h"
    (fd,) = reply.unix_fds
    try:
        os.write(fd, PACKET)
        assert read_until_eof(fd) == REPLY
    finally:
        os.close(fd)
    assert stub.received == PACKET


def test_gdb_proxy_relays_the_stub(bus: PrivateBus, stub: FakeStub) -> None:
    # What gdb's "target remote | kdlabctl gdb-proxy busy" runs.
    with subprocess.Popen(
        kdlabctl_argv(bus.address, "gdb-proxy", "busy"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    ) as proxy:
        assert proxy.stdin is not None
        assert proxy.stdout is not None
        assert proxy.stderr is not None
        proxy.stdin.write(PACKET)
        proxy.stdin.flush()
        # stdin stays open: the proxy ends when the stub hangs up after its reply.
        relayed = read_until_eof(proxy.stdout.fileno())
        status = proxy.wait(timeout=30)
        stderr = proxy.stderr.read()
    assert (status, relayed) == (0, REPLY), stderr
    assert stub.received == PACKET


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


@pytest.fixture
def remote(kdlabd: Lab) -> Iterator[RemoteStub]:
    """A stub of the running VM "busy" that gdb can attach to."""
    stub = RemoteStub(kdlabd.layout.gdb_socket("busy"))
    yield stub
    stub.close()


@contextlib.contextmanager
def gdb_waiting(
    bus: PrivateBus, tmp_path: Path, *commands: str
) -> Iterator[subprocess.Popen[str]]:
    """``kdlabctl gdb busy --batch`` running *commands*, then waiting 10 s in
    Python: yields once gdb waits, in a process group of its own (a terminal's)."""
    vmlinux = tmp_path / "vmlinux"
    shutil.copy("/bin/true", vmlinux)
    ready = tmp_path / "ready"
    wait = f"python import pathlib, time; pathlib.Path({str(ready)!r}).touch(); "
    argv = kdlabctl_argv(
        bus.address, "gdb", "busy", "--vmlinux", str(vmlinux), "--batch",
        *(arg for command in commands for arg in ("-ex", command)),
        "-ex", wait + "time.sleep(10)", "-ex", "echo survived\\n",
    )  # fmt: skip
    with subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=client_env(),
        start_new_session=True,
    ) as gdb:
        until(lambda: ready.exists() or gdb.poll() is not None, "gdb ran the command")
        yield gdb


def test_ctrl_c_in_gdb_ends_neither_gdb_nor_kdlabctl(
    bus: PrivateBus, remote: RemoteStub, tmp_path: Path
) -> None:
    """Ctrl-C is how gdb interrupts the kernel: the terminal sends SIGINT to
    kdlabctl and gdb alike, and only gdb may act on it."""
    with gdb_waiting(bus, tmp_path) as gdb:
        os.killpg(gdb.pid, signal.SIGINT)
        out, err = gdb.communicate(timeout=30)
    assert gdb.returncode == 0, err
    assert "survived" in out
    assert remote.attached == [True], "gdb attached, then detached at its end"


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of each child process of *pid*."""
    listed = subprocess.run(
        ["ps", "-o", "pid=,comm=", "--ppid", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    return [
        (int(fields[0]), fields[1])
        for fields in (line.split(None, 1) for line in listed.stdout.splitlines())
    ]


def test_kdlabctl_relays_the_stub_to_gdb_itself(
    bus: PrivateBus, remote: RemoteStub, tmp_path: Path
) -> None:
    """kdlabctl waits for gdb anyway: it relays the stream, and gdb runs no
    second kdlabctl (another Python start-up) as ``target remote | ...``."""
    with gdb_waiting(bus, tmp_path) as kdlabctl:
        (gdb,) = children(kdlabctl.pid)
        assert gdb[1] == "gdb"
        assert children(gdb[0]) == []
        os.killpg(kdlabctl.pid, signal.SIGINT)
        _, err = kdlabctl.communicate(timeout=30)
    assert kdlabctl.returncode == 0, err
    assert remote.attached == [True]


def test_detach_frees_the_stub_while_gdb_runs_on(
    bus: PrivateBus, remote: RemoteStub, tmp_path: Path
) -> None:
    """gdb holds the stream kdlabd gave it: detaching must still hang it up,
    or QEMU (one debugger at a time) would refuse the next one."""
    with gdb_waiting(bus, tmp_path, "detach") as gdb:
        until(lambda: remote.ended == 1, "the stub saw the debugger hang up")
        assert gdb.poll() is None, "gdb still runs"
        os.killpg(gdb.pid, signal.SIGINT)
        _, err = gdb.communicate(timeout=30)
    assert gdb.returncode == 0, err
    assert remote.attached == [True]
