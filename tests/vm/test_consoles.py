"""Consoles under abuse by a member, on real libvirt and QEMU (issue 11).

A member of group kdlab (a real login user, tests/support/logins.py) owns the VMs
and drives ``kdlabctl console`` from a login shell the way a person or a
script would; root's calls must keep answering meanwhile. Checked, and
recorded as figures:

- a detach from a paused VM after typing 64 KiB leaves kdlabd answering and
  stoppable (it used to sit in virStreamAbort on its event loop);
- ``cat /dev/zero | kdlabctl console`` into a paused and a running VM: every
  call of another client (list, image create and delete) is answered within
  1 s (the shared libvirt connection used to stall, then drop);
- viewer limits per VM and per user: Error.LimitExceeded;
- a kdlabd whose descriptor table is full says so (LimitExceeded naming
  LimitNOFILE=), also for calls whose descriptors the kernel dropped;
- no descriptor is left after 1000 viewer attach/detach cycles;
- SIGTERM after all this, and after a libvirt reconnection, exits at once.

This module's kdlabd has small viewer limits (the defaults are checked in
tests/unit/test_consoles.py), so that reaching them costs a few viewers.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Message, MessageType, Variant

from kdlab.errors import LimitExceeded
from kdlab.wire import (
    BUS_NAME,
    IMAGE_INTERFACE,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    VM_INTERFACE,
    vm_path,
)
from tests.support import figures, logins
from tests.support.bus import BusClient
from tests.support.clients import assert_no_traceback, kdlabctl, kdlabctl_argv
from tests.support.daemon import Kdlabd
from tests.support.logins import Logins, LoginUser
from tests.support.system import system_kdlabd, virsh
from tests.vm.conftest import MARKER, Lab

pytestmark = pytest.mark.vm

POOL_PREFIX = f"kdlab-vmcon{os.getpid()}"
VM_PREFIX = f"con{os.getpid()}-"
PER_VM, PER_USER = 3, 4
LIMITS = (
    f"max_console_viewers_per_vm = {PER_VM}\n"
    f"max_console_viewers_per_user = {PER_USER}\n"
)
ANSWER_SECONDS = 1.0  # "answered": within this, or the call counts as not answered
TYPED = 64 * 1024
FLOOD_SECONDS = 10.0
CYCLES = 1000
SESSION_CYCLES = 50
# Low enough that console viewers fill it; kdlabd needs about 40 to start.
SMALL_NOFILE = 160
LIMIT_EXCEEDED = LimitExceeded.dbus_name()


def unique(purpose: str) -> str:
    return f"{VM_PREFIX}{purpose}-{uuid.uuid4().hex[:6]}"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Viewer:
    """``kdlabctl console NAME`` run by *user* (root if None) reading a pipe, or
    in *user*'s login shell ``SOURCE | kdlabctl console NAME``."""

    def __init__(
        self, address: str, name: str, user: LoginUser | None, source: str = ""
    ) -> None:
        if user is None:
            argv = kdlabctl_argv(address, "console", name)
        else:
            command = logins.kdlabctl_command(address, "console", name, source=source)
            argv = logins.login_argv(user, command)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if source else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=logins.LOGIN_ENV,
            cwd="/",
        )
        self.stderr = b""

    def attached(self, timeout: float = 30) -> bool:
        """Wait for the banner (True) or for kdlabctl to give up (False)."""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while b"escape character is ^]" not in self.stderr:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"kdlabctl console said {self.stderr!r}"
            ready, _, _ = select.select([self.proc.stderr], [], [], remaining)
            chunk = os.read(self.proc.stderr.fileno(), 4096) if ready else b""
            if ready and not chunk:
                self.proc.wait(timeout=10)
                assert_no_traceback(self.stderr.decode())
                return False
            self.stderr += chunk
        return True

    def type(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def end(self) -> None:
        logins.kill(self.proc)  # runuser, the shell, cat and kdlabctl
        assert self.proc.stderr is not None
        if not self.proc.stderr.closed:
            self.stderr += self.proc.stderr.read()
            self.proc.stderr.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


@dataclass
class ConsoleLab:
    """This module's kdlabd, what it boots and the member who abuses it."""

    daemon: Kdlabd
    lab: Lab
    logins: Logins
    viewers: list[Viewer]

    @property
    def member(self) -> LoginUser:
        return self.logins.alice

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """kdlabctl as root."""
        return kdlabctl(self.daemon.address, *args)

    def member_vm(self, purpose: str, *, paused: bool) -> str:
        """A VM of the member's, started (paused: its CPUs never run)."""
        name = unique(purpose)
        for args in (
            ("create", name, "--kernel", str(self.lab.kernel.vmlinuz),
             "--initrd", str(self.lab.initramfs), "--memory", "256"),
            ("start", *(["--paused"] if paused else []), name),
        ):  # fmt: skip
            done = self.logins.kdlabctl(self.member, self.daemon.address, *args)
            assert done.returncode == 0, done.stderr
        return name

    def viewer(self, name: str, user: LoginUser | None, source: str = "") -> Viewer:
        viewer = Viewer(self.daemon.address, name, user, source)
        self.viewers.append(viewer)
        return viewer

    def wait_for_console(self, name: str, text: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while text not in (log := self.ctl("logs", name).stdout):
            assert time.monotonic() < deadline, f"{text!r} not in {log[-2000:]!r}"
            time.sleep(0.5)


ROOT = None  # a Viewer of root's


@pytest.fixture(scope="module")
def conlab(lab: Lab, logins: Logins) -> Iterator[ConsoleLab]:
    with system_kdlabd(POOL_PREFIX, config=LIMITS) as daemon:
        conlab = ConsoleLab(daemon, lab, logins, [])
        try:
            yield conlab
        finally:
            for viewer in conlab.viewers:
                viewer.end()
            for domain in virsh("list", "--all", "--name").stdout.split():
                if domain.startswith(f"kdlab-{VM_PREFIX}"):
                    conlab.ctl("delete", "--force", domain.removeprefix("kdlab-"))
                    virsh("destroy", domain)
                    virsh("undefine", domain)


@pytest.fixture(scope="module")
def paused_vm(conlab: ConsoleLab) -> str:
    return conlab.member_vm("paused", paused=True)


@pytest.fixture(scope="module")
def running_vm(conlab: ConsoleLab) -> str:
    name = conlab.member_vm("running", paused=False)
    conlab.wait_for_console(name, MARKER)
    return name


def call_within(
    client: BusClient, seconds: float, path: str, interface: str, member: str, *,
    signature: str = "", body: list[Any] | None = None,
    unix_fds: list[int] | None = None,
) -> Message | None:  # fmt: skip
    """The reply to a call, or None if none came within *seconds*."""
    message = Message(
        destination=BUS_NAME, path=path, interface=interface, member=member,
        signature=signature, body=body or [], unix_fds=unix_fds or [],
    )  # fmt: skip
    try:
        return client.run(client.bus.call(message), timeout=seconds)
    except TimeoutError:
        return None


def answered(reply: Message | None) -> bool:
    return reply is not None and reply.message_type is MessageType.METHOD_RETURN


def libvirt_round(client: BusClient, seconds: float) -> list[bool]:
    """Calls that need kdlabd's libvirt connection: create and delete an image."""
    name = f"{VM_PREFIX}probe-{uuid.uuid4().hex[:6]}"
    created = call_within(client, seconds, MANAGER_PATH, MANAGER_INTERFACE,
                          "CreateImage", signature="sta{sv}",
                          body=[name, 1 << 20, {}])  # fmt: skip
    if not answered(created):
        return [False]
    assert created is not None
    deleted = call_within(client, seconds, created.body[0], IMAGE_INTERFACE, "Delete")
    return [True, answered(deleted)]


# --- a detach from a paused VM ------------------------------------------------------


def test_detach_from_a_paused_vm_leaves_kdlabd_answering_and_stoppable(
    conlab: ConsoleLab, paused_vm: str
) -> None:
    viewer = conlab.viewer(paused_vm, conlab.member)
    assert viewer.attached()
    viewer.type(b"x" * TYPED + b"\x1d")  # 64 KiB, then Ctrl-]
    assert viewer.proc.wait(timeout=30) == 0, viewer.stderr
    client = BusClient(conlab.daemon.address)
    try:
        listed = call_within(
            client, ANSWER_SECONDS, MANAGER_PATH, MANAGER_INTERFACE, "ListVMs"
        )
        assert answered(listed), "ListVMs unanswered after the detach"
        assert all(libvirt_round(client, 15)), "kdlabd's libvirt calls fail"
    finally:
        client.close()
    # The viewer is gone: the member may attach again, PER_VM times.
    time.sleep(1)  # kdlabd looks for hang-ups of unread viewers twice a second
    again = [conlab.viewer(paused_vm, conlab.member) for _ in range(PER_VM)]
    assert all(v.attached() for v in again)
    for v in again:
        v.end()
    conlab.daemon.stop()  # exit 0 within STOP_SECONDS, or the test fails
    conlab.daemon.start()


# --- a flood of input ---------------------------------------------------------------


def test_figure_calls_answered_while_a_member_floods_a_console(
    conlab: ConsoleLab, paused_vm: str, running_vm: str
) -> None:
    floods = [conlab.viewer(name, conlab.member, source="cat /dev/zero")
              for name in (paused_vm, running_vm)]  # fmt: skip
    for flood in floods:
        assert flood.attached(), flood.stderr
    client = BusClient(conlab.daemon.address)
    outcomes: list[bool] = []
    try:
        deadline = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < deadline:
            listed = call_within(
                client, ANSWER_SECONDS, MANAGER_PATH, MANAGER_INTERFACE, "ListVMs"
            )
            outcomes.append(answered(listed))
            outcomes += libvirt_round(client, ANSWER_SECONDS)
        flooding = [flood.proc.poll() is None for flood in floods]
    finally:
        client.close()
        for flood in floods:
            flood.end()
    figure = figures.record(
        "kdlabd calls answered within 1 s while one member floods a console",
        outcomes.count(True),
        f"== {len(outcomes)}",
        detail=f"{outcomes.count(True)}/{len(outcomes)} calls of root (ListVMs, "
        f"CreateImage, Image.Delete) during {FLOOD_SECONDS:g} s of cat /dev/zero "
        "| kdlabctl console into a paused and a running VM of a kdlab member",
    )
    assert figure.met
    assert flooding == [True, True], [(f.proc.returncode, f.stderr) for f in floods]
    # The running VM's console still works for its owner.
    after = conlab.viewer(running_vm, conlab.member)
    assert after.attached()
    after.type(b"\x15\recho after-$((6*7))\r")
    conlab.wait_for_console(running_vm, "after-42", timeout=60)
    after.end()


# --- limits -------------------------------------------------------------------------


def test_viewers_per_vm_and_per_user_are_limited(
    conlab: ConsoleLab, paused_vm: str, running_vm: str
) -> None:
    def refused(viewer: Viewer, key: str) -> None:
        assert not viewer.attached()
        assert viewer.proc.returncode == LimitExceeded.exit_code, viewer.stderr
        assert key.encode() in viewer.stderr

    first = [conlab.viewer(paused_vm, conlab.member) for _ in range(PER_VM)]
    assert all(v.attached() for v in first)
    refused(conlab.viewer(paused_vm, conlab.member), "max_console_viewers_per_vm")
    other = conlab.viewer(running_vm, conlab.member)
    assert other.attached()  # PER_USER (4) in all
    refused(conlab.viewer(running_vm, conlab.member), "max_console_viewers_per_user")
    root = conlab.viewer(running_vm, ROOT)
    assert root.attached(), "another user's viewers count apart"
    first.pop().end()
    time.sleep(1)  # kdlabd notices the hang-up
    again = conlab.viewer(running_vm, conlab.member)
    assert again.attached()
    for viewer in [*first, other, root, again]:
        viewer.end()


# --- descriptors --------------------------------------------------------------------


def open_console(client: BusClient, name: str) -> tuple[str, int | None]:
    reply = client.call(vm_path(name), VM_INTERFACE, "OpenConsole")
    if reply.message_type is MessageType.METHOD_RETURN:
        (fd,) = reply.unix_fds
        return "return", fd
    return str(reply.error_name), None


def test_figure_descriptors_left_after_viewer_cycles(
    conlab: ConsoleLab, running_vm: str
) -> None:
    conlab.daemon.stop()  # a fresh kdlabd: nothing left of the other tests
    conlab.daemon.start()
    pid = conlab.daemon.pid
    client = BusClient(conlab.daemon.address)
    retries = 0

    def cycle() -> None:
        nonlocal retries
        outcome, fd = open_console(client, running_vm)
        while outcome == LIMIT_EXCEEDED:  # the last detach is not processed yet
            retries += 1
            client.sleep(0.01)
            outcome, fd = open_console(client, running_vm)
        assert fd is not None, outcome
        os.close(fd)

    try:
        client.sleep(1)
        before = open_fds(pid)
        outcome, anchor = open_console(client, running_vm)  # keeps the session open
        assert anchor is not None, outcome
        for _ in range(CYCLES):
            cycle()
        os.close(anchor)
        for _ in range(SESSION_CYCLES):  # each opens and closes a session
            cycle()
            client.sleep(0.05)
        deadline = time.monotonic() + 30
        while (after := open_fds(pid)) != before and time.monotonic() < deadline:
            client.sleep(0.5)
    finally:
        client.close()
    figure = figures.record(
        f"descriptors left after {CYCLES} viewer attach/detach cycles",
        after - before,
        "== 0",
        detail=f"kdlabd had {before} open before, {after} after; one viewer kept "
        f"the session open, then {SESSION_CYCLES} more cycles opened and closed it "
        f"(a libvirt connection each); {retries} attaches retried",
    )
    assert figure.met


@dataclass
class Exhaustion:
    """What a kdlabd with a small descriptor table answered, viewers filling it."""

    viewers: list[int]
    last: str = ""  # the outcome that ended the filling
    refused: dict[str, Message] = field(default_factory=dict)  # must be refused
    served: dict[str, Message] = field(default_factory=dict)  # must work
    after_release: str = ""  # OpenConsole once some viewers were closed


def exhaust(client: BusClient, files: list[int], name: str, vms: tuple[str, str]
            ) -> Exhaustion:  # fmt: skip
    running_vm, paused_vm = vms
    found = Exhaustion([])
    found.last, fd = open_console(client, running_vm)
    while fd is not None:
        found.viewers.append(fd)
        assert len(found.viewers) < SMALL_NOFILE, "the limit did not apply"
        found.last, fd = open_console(client, running_vm)
    for call, vm in (("OpenConsole", running_vm), ("new session", paused_vm)):
        found.refused[call] = client.call(vm_path(vm), VM_INTERFACE, "OpenConsole")
    options = {"kernel": Variant("h", 0), "initrd": Variant("h", 1)}
    found.served = {
        "CreateVM": client.call(MANAGER_PATH, MANAGER_INTERFACE, "CreateVM",
                                "sa{sv}", [name, options], unix_fds=files[:2]),
        "ImportImage": client.call(MANAGER_PATH, MANAGER_INTERFACE, "ImportImage",
                                   "sha{sv}", [name, 0, {}], unix_fds=files[2:]),
    }  # fmt: skip
    for fd in found.viewers[:8]:  # descriptors given back: viewers are served again
        os.close(fd)
    del found.viewers[:8]
    client.sleep(1)
    found.after_release, fd = open_console(client, running_vm)
    found.viewers += [] if fd is None else [fd]
    return found


def test_a_full_descriptor_table_is_refused_clearly_and_kdlabd_keeps_serving(
    conlab: ConsoleLab, running_vm: str, paused_vm: str, tmp_path: Path
) -> None:
    """Viewers fill a kdlabd started with a small RLIMIT_NOFILE (and limits per
    VM and user it never reaches): it refuses more with LimitExceeded naming
    LimitNOFILE=, keeps a reserve for itself, and other calls that need
    descriptors (a kernel and an initrd passed in, an image) work."""
    many = "max_console_viewers_per_vm = 10000\nmax_console_viewers_per_user = 10000\n"
    raw = tmp_path / "small.raw"
    raw.write_bytes(b"a small raw image\n" * 4096)
    paths = (conlab.lab.kernel.vmlinuz, conlab.lab.initramfs, raw)
    files = [os.open(path, os.O_RDONLY) for path in paths]
    name = unique("full")
    found = Exhaustion([])
    try:
        with system_kdlabd(
            f"{POOL_PREFIX}-full", config=many, nofile=SMALL_NOFILE
        ) as daemon:
            client = BusClient(daemon.address)
            try:
                found = exhaust(client, files, name, (running_vm, paused_vm))
            finally:
                client.close()
    finally:
        for fd in files + found.viewers:
            os.close(fd)
        conlab.ctl("delete", "--force", name)
    assert len(found.viewers) > SMALL_NOFILE // 3, "viewers got most of the table"
    assert found.last == LIMIT_EXCEEDED
    wrong = {
        call: (reply.error_name, reply.body)
        for call, reply in found.refused.items()
        if reply.error_name != LIMIT_EXCEEDED or "LimitNOFILE" not in reply.body[0]
    }
    assert wrong == {}
    failed = {
        call: (reply.error_name, reply.body)
        for call, reply in found.served.items()
        if reply.message_type is not MessageType.METHOD_RETURN
    }
    assert failed == {}
    assert found.after_release == "return"


# --- SIGTERM after a reconnection ---------------------------------------------------


def libvirt_clients_of(pid: int) -> list[str]:
    """libvirtd's ids of the connections process *pid* holds (virt-admin)."""
    listing = subprocess.run(
        ["virt-admin", "srv-clients-list", "libvirtd"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    ids = [line.split()[0] for line in listing.splitlines()[2:] if line.strip()]
    mine = []
    for client_id in ids:
        info = subprocess.run(
            ["virt-admin", "client-info", "libvirtd", client_id],
            capture_output=True, text=True, check=False,
        ).stdout  # fmt: skip
        found = re.search(r"unix_process_id\s*:\s*(\d+)", info)
        if found and int(found[1]) == pid:
            mine.append(client_id)
    return mine


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.2)


def test_sigterm_after_a_libvirt_reconnection_with_consoles_open(
    conlab: ConsoleLab, running_vm: str, paused_vm: str
) -> None:
    """libvirtd drops every connection of kdlabd (``virt-admin
    client-disconnect``, which leaves other clients alone) while consoles are
    open, one of them stuck on typed input; kdlabd reconnects, and stops at
    once."""
    stuck = conlab.viewer(paused_vm, conlab.member)
    live = conlab.viewer(running_vm, conlab.member)
    assert stuck.attached()
    assert live.attached()
    stuck.type(b"y" * TYPED * 2)
    pid = conlab.daemon.pid
    dropped = libvirt_clients_of(pid)
    assert len(dropped) >= 3, "the main connection and one per console session"
    for client_id in dropped:
        subprocess.run(["virt-admin", "client-disconnect", "libvirtd", client_id],
                       capture_output=True, check=True)  # fmt: skip
    client = BusClient(conlab.daemon.address)
    try:
        wait_for(lambda: all(libvirt_round(client, 5)), timeout=20)
    finally:
        client.close()
    wait_for(lambda: live.proc.poll() is not None, timeout=10)  # its session ended
    assert len(libvirt_clients_of(pid)) == 1, "the consoles' connections are closed"
    conlab.daemon.stop()
    conlab.daemon.start()
    shown = json.loads(conlab.ctl("show", running_vm, "--json").stdout)
    assert shown["state"] == "running"


def test_kdlabd_log_has_no_traceback(conlab: ConsoleLab) -> None:
    assert "Traceback" not in conlab.daemon.log()
