"""Kernel debugging end to end: real gdb on Debian's debug vmlinux, the console."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from lxml import etree

from kdlab.errors import InvalidState
from kdlab.kernel.diagnosis import DEFAULT_PATIENCE
from kdlabctl import gdbcache
from kdlabd.core.vms import DIAGNOSIS_INTERVAL
from tests.support import debian
from tests.support.clients import NOBODY, Identity, ctl_env, kdlabctl, read_until
from tests.support.prereq import require_tool
from tests.support.system import remove_vm
from tests.vm.conftest import MARKER, Lab, virsh
from tests.vm.test_lifecycle import (
    QEMU_NS,
    create,
    state,
    wait_for_console,
)

pytestmark = pytest.mark.vm

SHELL_PROMPT = "/ # "


@pytest.fixture
def debug_vm(lab: Lab, vm_name: str, vmlinux: Path) -> str:
    """A VM of Debian's cloud kernel that knows its debug vmlinux."""
    result = lab.ctl(
        "create",
        vm_name,
        "--kernel",
        str(lab.kernel.vmlinuz),
        "--initrd",
        str(lab.initramfs),
        "--memory",
        "256",
        "--vmlinux",
        str(vmlinux),
    )
    assert result.returncode == 0, result.stderr
    return vm_name


def show(lab: Lab, name: str) -> dict[str, object]:
    import json

    result = lab.ctl("show", name, "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def tcp_listeners_of(domain: str) -> list[str]:
    """The TCP sockets the QEMU process of *domain* listens on."""
    pid = Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip()
    listening = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, check=True
    )
    return [line for line in listening.stdout.splitlines() if f"pid={pid}," in line]


def tcp_listening_on(port: int) -> list[str]:
    """The local addresses of every TCP socket on this host listening on *port*."""
    listening = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    )
    return [line.split()[3] for line in listening.stdout.splitlines()]


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_paused_start_then_gdb_stops_at_start_kernel(lab: Lab, debug_vm: str) -> None:
    require_tool("ss", "iproute2")
    assert lab.ctl("start", "--paused", debug_vm).returncode == 0
    props = show(lab, debug_vm)
    assert props["state"] == "paused"
    assert props["waiting_for_debugger"] is True
    assert props["kernel_release"] == lab.kernel.release

    live = etree.fromstring(virsh("dumpxml", f"kdlab-{debug_vm}").stdout.encode())
    assert "nokaslr" in live.findtext("os/cmdline", "").split()
    assert tcp_listeners_of(f"kdlab-{debug_vm}") == [], "no gdbstub on TCP"

    gdb = lab.ctl(
        "gdb",
        debug_vm,
        "--batch",
        "-ex",
        "hbreak start_kernel",
        "-ex",
        "continue",
        "-ex",
        "p init_uts_ns.name.release",
    )
    assert gdb.returncode == 0, gdb.stderr
    assert "start_kernel () at init/main.c" in gdb.stdout
    assert f'"{lab.kernel.release}"' in gdb.stdout
    # gdb detached on exit: the kernel goes on booting to userspace.
    wait_for_console(lab, debug_vm, MARKER)
    props = show(lab, debug_vm)
    assert props["state"] == "running"
    assert props["waiting_for_debugger"] is False


def test_a_vm_paused_for_the_debugger_is_not_diagnosed(lab: Lab, debug_vm: str) -> None:
    """Its CPUs wait for gdb: nothing is wrong, however long it waits; the
    diagnosis of the boot counts the time it ran, from its own start."""
    started = lab.ctl("start", "--paused", debug_vm)
    assert started.returncode == 0, started.stderr
    assert started.stderr == "", "start reports no problem"
    assert show(lab, debug_vm)["diagnosis"] is None
    # Longer than a running VM may stay silent, and than kdlabd takes to look.
    time.sleep(DEFAULT_PATIENCE + 2 * DIAGNOSIS_INTERVAL)
    props = show(lab, debug_vm)
    assert props["diagnosis"] is None
    assert props["waiting_for_debugger"] is True
    gdb = lab.ctl(
        "gdb", debug_vm, "--batch", "-ex", "hbreak start_kernel", "-ex", "continue"
    )
    assert gdb.returncode == 0, gdb.stderr
    assert "start_kernel () at init/main.c" in gdb.stdout
    wait_for_console(lab, debug_vm, MARKER)
    time.sleep(2 * DIAGNOSIS_INTERVAL)
    assert show(lab, debug_vm)["diagnosis"] is None, "a good boot"


def test_gdb_attaches_to_a_running_vm_again_and_again(lab: Lab, debug_vm: str) -> None:
    assert lab.ctl("start", debug_vm).returncode == 0
    wait_for_console(lab, debug_vm, MARKER)
    for _ in range(2):
        gdb = lab.ctl("gdb", debug_vm, "--batch", "-ex", "p/x linux_banner[0]@5")
        assert gdb.returncode == 0, gdb.stderr
        assert "0x4c, 0x69, 0x6e, 0x75, 0x78" in gdb.stdout  # "Linux"
        assert state(lab, debug_vm) == "running"


class Console:
    """``kdlabctl console`` on a pseudo-terminal, as a person would run it.

    *command* runs another kdlabctl command that ends on the console
    (``up --console``); *argv*, with *env*, runs a command line of the
    caller's instead (a login user's kdlabctl).
    """

    def __init__(
        self,
        address: str,
        name: str,
        *,
        command: Sequence[str] = (),
        argv: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv or [sys.executable, "-m", "kdlabctl", *(command or ["console", name])],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=ctl_env(address) if env is None else env,
            start_new_session=True,
        )
        os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(remaining, 0))
            if not ready:
                raise AssertionError(f"{text!r} not seen; got {self.seen[-2000:]!r}")
            try:
                self.seen += os.read(self.master, 65536)
            except OSError:  # EIO: the client closed the terminal
                raise AssertionError(
                    f"console ended before {text!r}: {self.seen!r}"
                ) from None

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def detach(self) -> int:
        """Press Ctrl-]; return the exit code, with everything the client printed."""
        self.type(b"\x1d")
        code = self.proc.wait(timeout=10)
        while select.select([self.master], [], [], 0.5)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: no process has the terminal open any more
                break
            if not chunk:
                break
            self.seen += chunk
        os.close(self.master)
        return code


@pytest.fixture
def consoles() -> Iterator[list[Console]]:
    opened: list[Console] = []
    yield opened
    for console in opened:
        if console.proc.poll() is None:
            console.proc.kill()
            console.proc.wait()


def test_console_answers_and_two_viewers_share_it(
    lab: Lab, debug_vm: str, consoles: list[Console]
) -> None:
    assert lab.ctl("start", debug_vm).returncode == 0
    # The shell's prompt, not just the marker: busybox's line editing discards
    # what was typed before it set the terminal up.
    wait_for_console(lab, debug_vm, SHELL_PROMPT)
    first = Console(lab.daemon.address, debug_vm)
    second = Console(lab.daemon.address, debug_vm)
    consoles += [first, second]
    first.expect(b"escape character is ^]")
    second.expect(b"escape character is ^]")

    first.type(b"echo one-$((40+2))\r")
    first.expect(b"one-42")
    second.expect(b"one-42")
    second.type(b"echo two-$((2*21))x\r")
    first.expect(b"two-42x")
    second.expect(b"two-42x")

    assert first.detach() == 0
    assert b"detached" in first.seen
    second.type(b"echo still-$((6*7))\r")
    second.expect(b"still-42")
    assert second.detach() == 0
    assert state(lab, debug_vm) == "running"
    assert "still-42" in lab.ctl("logs", debug_vm).stdout


def test_caller_outside_group_kdlab_gets_no_descriptors(
    lab: Lab, debug_vm: str
) -> None:
    require_tool("setpriv", "util-linux")
    assert lab.ctl("start", debug_vm).returncode == 0
    wait_for_console(lab, debug_vm, MARKER)
    address = lab.daemon.address
    assert kdlabctl(address, "show", debug_vm, user=NOBODY).returncode == 0
    for command in (
        ["gdb-proxy", debug_vm],
        ["console", debug_vm],
        ["logs", debug_vm],
        ["stop", "--force", debug_vm],
    ):
        result = kdlabctl(address, *command, user=NOBODY, input_text="")
        assert result.returncode == 6, (command, result.stderr)
        assert "does not allow" in result.stderr or "belongs to" in result.stderr
    assert state(lab, debug_vm) == "running"


def test_gdb_tcp_puts_the_stub_on_loopback_only_where_any_local_gdb_attaches(
    lab: Lab, vm_name: str, vmlinux: Path
) -> None:
    require_tool("ss", "iproute2")
    require_tool("setpriv", "util-linux")
    port = free_tcp_port()
    create(lab, vm_name, "--gdb-tcp", str(port), "--vmlinux", str(vmlinux))
    assert show(lab, vm_name)["gdb_stub"] == f"tcp:127.0.0.1:{port}"
    assert lab.ctl("start", "--paused", vm_name).returncode == 0
    assert tcp_listening_on(port) == [f"127.0.0.1:{port}"], "nothing on 0.0.0.0/::"
    assert len(tcp_listeners_of(f"kdlab-{vm_name}")) == 1

    # A plain gdb of an unprivileged user, no kdlabd in between: on TCP any
    # local user can attach, as the README warns.
    gdb = subprocess.run(
        [
            *NOBODY.setpriv(),
            *("gdb", "-q", "-nx", "--batch", "-ex", f"target remote 127.0.0.1:{port}"),
            *("-ex", "hbreak start_kernel", "-ex", "continue"),
            *("-ex", "p init_uts_ns.name.release", str(vmlinux)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": os.environ["PATH"], "HOME": "/"},
        check=False,
    )
    assert gdb.returncode == 0, gdb.stderr
    assert f'"{lab.kernel.release}"' in gdb.stdout
    wait_for_console(lab, vm_name, MARKER)
    # kdlabctl gdb reaches the same stub through kdlabd.
    brokered = lab.ctl("gdb", vm_name, "--batch", "-ex", "p/x linux_banner[0]@5")
    assert brokered.returncode == 0, brokered.stderr
    assert "0x4c, 0x69, 0x6e, 0x75, 0x78" in brokered.stdout  # "Linux"


def test_no_gdb_means_no_stub_at_all(lab: Lab, vm_name: str) -> None:
    require_tool("ss", "iproute2")
    create(lab, vm_name, "--no-gdb")
    assert show(lab, vm_name)["gdb_stub"] == "off"
    assert lab.ctl("start", vm_name).returncode == 0
    live = etree.fromstring(virsh("dumpxml", f"kdlab-{vm_name}").stdout.encode())
    assert "-gdb" not in live.xpath("//qemu:arg/@value", namespaces=QEMU_NS)
    assert "nokaslr" not in live.findtext("os/cmdline", "").split()
    gdb_dir = lab.daemon.runtime_dir / "gdb"
    # Only the exec channel's socket (kdlabctl exec), which speaks no gdb.
    assert [p.name for p in gdb_dir.iterdir() if p.name.startswith(f"{vm_name}.")] == [
        f"{vm_name}.agent"
    ]
    assert tcp_listeners_of(f"kdlab-{vm_name}") == []
    refused = kdlabctl(lab.daemon.address, "gdb-proxy", vm_name, input_text="")
    assert refused.returncode == 3, refused.stderr  # Error.InvalidState
    assert "no gdbstub" in refused.stderr
    assert state(lab, vm_name) == "running"


@pytest.fixture
def distro_vmlinux(lab: Lab, vmlinux: Path) -> Iterator[Path]:
    """/usr/lib/debug/boot/vmlinux-RELEASE, where Debian's -dbg package puts it.

    Unless the package is installed, a hard link to the fixture's vmlinux is
    there while the test runs (under a lock: concurrent test runs share it).
    """
    path = Path(f"/usr/lib/debug/boot/vmlinux-{lab.kernel.release}")
    with debian._locked("usr-lib-debug-vmlinux"):
        if path.exists():
            yield path
            return
        made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(vmlinux, path)
        try:
            yield path
        finally:
            path.unlink()
            for directory in made:
                directory.rmdir()


def test_gdb_finds_vmlinux_in_the_documented_order(
    lab: Lab, vm_name: str, vmlinux: Path, distro_vmlinux: Path, tmp_path: Path
) -> None:
    """--vmlinux, the one given at create, the kernel's build tree, then
    /usr/lib/debug/boot/vmlinux-RELEASE: each candidate a distinct path (hard
    links of one vmlinux), removed in turn."""
    tree, given, recorded = (tmp_path / d for d in ("linux", "given", "recorded"))
    boot = tree / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    given.mkdir()
    recorded.mkdir()
    os.link(lab.kernel.vmlinuz, boot / "bzImage")
    for directory in (tree, given, recorded):
        os.link(vmlinux, directory / "vmlinux")
    result = lab.ctl(
        "create",
        vm_name,
        *("--kernel", str(boot / "bzImage"), "--initrd", str(lab.initramfs)),
        *("--vmlinux", str(recorded / "vmlinux"), "--memory", "256"),
    )
    assert result.returncode == 0, result.stderr
    assert lab.ctl("start", "--paused", vm_name).returncode == 0

    def symbols(*args: str) -> str:
        gdb = lab.ctl("gdb", vm_name, *args, "--batch", "-ex", "info files")
        assert gdb.returncode == 0, gdb.stderr
        found = re.search(r'^Symbols from "(.+)"\.$', gdb.stdout, re.MULTILINE)
        assert found, gdb.stdout
        return found.group(1)

    assert symbols("--vmlinux", str(given / "vmlinux")) == str(given / "vmlinux")
    assert symbols() == str(recorded / "vmlinux")
    (recorded / "vmlinux").unlink()
    assert symbols() == str(tree / "vmlinux")
    (tree / "vmlinux").unlink()
    assert symbols() == str(distro_vmlinux)


def gdb_session(
    lab: Lab, name: str
) -> tuple[subprocess.Popen[bytes], Callable[[bytes, str], str]]:
    """``kdlabctl gdb NAME`` reading commands from a pipe, and a function that
    sends it commands and reads its output until a text comes."""
    gdb = subprocess.Popen(
        [sys.executable, "-m", "kdlabctl", "gdb", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=ctl_env(lab.daemon.address),
    )

    def send(commands: bytes, until: str) -> str:
        assert gdb.stdin is not None
        assert gdb.stdout is not None
        gdb.stdin.write(commands)
        gdb.stdin.flush()
        return read_until(gdb.stdout.fileno(), until, timeout=300)

    return gdb, send


def test_one_debugger_at_a_time(lab: Lab, debug_vm: str) -> None:
    """QEMU serves one gdb connection; kdlabd connects a second caller anyway,
    into QEMU's queue. That gdb gets no answer and gives up; QEMU takes the
    queued connection when the first debugger detaches, and taking a debugger
    stops the VM: it stays paused until a debugger attaches and detaches again."""
    assert lab.ctl("start", "--paused", debug_vm).returncode == 0
    first, _ = gdb_session(lab, debug_vm)
    assert first.stdin is not None
    assert first.stdout is not None
    try:
        first.stdin.write(b"info registers rip\n")
        first.stdin.flush()
        read_until(first.stdout.fileno(), "rip ", timeout=120)

        # gdb's default timeouts make this take half a minute: shorten them.
        second = lab.ctl(
            "gdb",
            debug_vm,
            *("--batch", "-iex", "set remotetimeout 1"),
            *("-ex", "info registers rip"),
            timeout=300,
        )
        assert second.returncode != 0, second.stdout
        assert not re.search(r"^rip ", second.stdout, re.MULTILINE)

        # The first one is undisturbed.
        first.stdin.write(b"info registers rip\nquit\n")
        first.stdin.flush()
        assert "rip " in read_until(first.stdout.fileno(), "rip ", timeout=60)
        assert first.wait(timeout=60) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # The queued connection of the second one, served now, stopped the VM.
    deadline = time.monotonic() + 60
    while state(lab, debug_vm) != "paused" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert state(lab, debug_vm) == "paused"
    # (It may have stopped in the firmware: no kernel memory to read yet.)
    again = lab.ctl("gdb", debug_vm, "--batch", "-ex", "info registers rip")
    assert again.returncode == 0, again.stderr
    assert re.search(r"^rip ", again.stdout, re.MULTILINE)
    wait_for_console(lab, debug_vm, MARKER)
    assert state(lab, debug_vm) == "running"


# --- kdlabctl attach and start --attach ---------------------------------------------

RELEASE = "p init_uts_ns.name.release"
TO_START_KERNEL = ("-ex", "hbreak start_kernel", "-ex", "continue", "-ex", RELEASE)


def test_attach_runs_gdb_on_a_running_vm_and_the_console_with_console(
    lab: Lab, debug_vm: str, consoles: list[Console]
) -> None:
    assert lab.ctl("start", debug_vm).returncode == 0
    wait_for_console(lab, debug_vm, SHELL_PROMPT)
    gdb = lab.ctl("attach", debug_vm, "--", "--batch", "-ex", RELEASE)
    assert gdb.returncode == 0, gdb.stderr
    assert f'"{lab.kernel.release}"' in gdb.stdout
    assert state(lab, debug_vm) == "running", "gdb detached: the kernel runs on"

    console = Console(
        lab.daemon.address, debug_vm, command=["attach", "--console", debug_vm]
    )
    consoles.append(console)
    console.expect(b"escape character is ^]")
    console.type(b"echo attached-$((6*7))\r")
    console.expect(b"attached-42")
    assert console.detach() == 0
    assert b"detached" in console.seen
    assert state(lab, debug_vm) == "running"


def test_attach_to_a_paused_vm_stops_where_gdb_is_told(lab: Lab, debug_vm: str) -> None:
    assert lab.ctl("start", "--paused", debug_vm).returncode == 0
    gdb = lab.ctl("attach", debug_vm, "--", "--batch", *TO_START_KERNEL)
    assert gdb.returncode == 0, gdb.stderr
    assert "waits for the debugger" in gdb.stderr
    assert "start_kernel () at init/main.c" in gdb.stdout
    assert f'"{lab.kernel.release}"' in gdb.stdout
    wait_for_console(lab, debug_vm, MARKER)
    assert state(lab, debug_vm) == "running"


def test_start_attach_paused_has_gdb_before_the_first_instruction(
    lab: Lab, debug_vm: str
) -> None:
    """One command: start paused, gdb attached, stopped at start_kernel (a
    hardware breakpoint set before the kernel ran at all); gdb's detach lets it
    boot."""
    gdb = lab.ctl(
        "start", "--attach", "--paused", debug_vm, "--", "--batch", *TO_START_KERNEL
    )
    assert gdb.returncode == 0, gdb.stderr
    assert "start_kernel () at init/main.c" in gdb.stdout
    assert f'"{lab.kernel.release}"' in gdb.stdout
    wait_for_console(lab, debug_vm, MARKER)
    assert show(lab, debug_vm)["waiting_for_debugger"] is False


def test_start_attach_console_boots_on_the_console(
    lab: Lab, debug_vm: str, consoles: list[Console]
) -> None:
    console = Console(
        lab.daemon.address,
        debug_vm,
        command=["start", "--attach", "--console", debug_vm],
    )
    consoles.append(console)
    console.expect(b"escape character is ^]")
    console.expect(MARKER.encode(), timeout=90)
    console.expect(SHELL_PROMPT.encode())
    console.type(b"echo booted-$((6*7))\r")
    console.expect(b"booted-42")
    assert console.detach() == 0
    assert state(lab, debug_vm) == "running"


def test_attach_to_a_vm_that_is_off_is_refused_with_how_to_start_it(
    lab: Lab, debug_vm: str
) -> None:
    """Defined (never booted), then stopped: InvalidState's exit code and the
    hint, for gdb and the console; nothing is started."""
    for expected in ("defined", "stopped"):
        if expected == "stopped":
            assert lab.ctl("start", debug_vm).returncode == 0
            assert lab.ctl("stop", "--force", debug_vm).returncode == 0
        for console in ([], ["--console"]):
            refused = lab.ctl("attach", debug_vm, *console)
            assert refused.returncode == InvalidState.exit_code, refused.stderr
            assert f"VM {debug_vm} is {expected}: start it first" in refused.stderr
            assert f"kdlabctl start --attach {debug_vm}" in refused.stderr
            assert refused.stdout == "", "no gdb ran"
        assert state(lab, debug_vm) == expected


# gdb's index cache: per user, warmed when a VM gets its vmlinux.
INDEX_WARMUP_TIMEOUT = 300.0  # a niced gdb on a busy 2-core machine
CACHE_STATS = ("-ex", "show index-cache stats")


def wait_for_index(cache_home: Path, build: str, uid: int = 0) -> Path:
    """Until gdb's warmup has written *build*'s index in the cache under
    *cache_home* (uid's) and ended; the index."""
    cache = gdbcache.open_cache(uid, env={"XDG_CACHE_HOME": str(cache_home)})
    assert cache.wait(build, INDEX_WARMUP_TIMEOUT), "the warmup ended"
    assert cache.index(build).exists()
    return cache.index(build)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory every user may traverse (pytest's own is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kdlabt-cache-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_gdb_reads_the_index_from_the_users_own_cache_warmed_at_create(
    lab: Lab, vm_name: str, vmlinux: Path, kdlab_user: Identity, shared_tmp: Path
) -> None:
    """create starts indexing the VM's vmlinux in the creator's cache; the
    first ``kdlabctl gdb`` reads the index from there. A second user's VM of
    the same kernel gets an index in that user's cache, and root's is not
    touched: nothing is shared."""
    build = gdbcache.read_build_id(vmlinux)
    assert build, "Debian's vmlinux has a build ID"
    roots, theirs = shared_tmp / "root-cache", shared_tmp / "user-cache"
    roots.mkdir(mode=0o700)
    theirs.mkdir(mode=0o700)
    os.chown(theirs, kdlab_user.uid, kdlab_user.gid)
    as_root = {"XDG_CACHE_HOME": str(roots)}
    as_user = {"XDG_CACHE_HOME": str(theirs)}
    address = lab.daemon.address

    boot = ("--kernel", str(lab.kernel.vmlinuz), "--initrd", str(lab.initramfs))
    created = kdlabctl(
        address, "create", vm_name, *boot, "--vmlinux", str(vmlinux), env=as_root
    )
    assert created.returncode == 0, created.stderr
    index = wait_for_index(roots, build)
    assert lab.ctl("start", "--paused", vm_name).returncode == 0
    gdb = kdlabctl(
        address, "gdb", vm_name, "--batch", "-iex", "set debug index-cache on",
        *CACHE_STATS, env=as_root,
    )  # fmt: skip
    assert gdb.returncode == 0, gdb.stderr
    assert f"[index-cache] trying to read {index}" in gdb.stdout + gdb.stderr
    assert "Cache hits (this session): 1" in gdb.stdout
    root_files = sorted(p.name for p in index.parent.iterdir())

    other = f"{vm_name}-user"
    try:
        made = kdlabctl(
            address, "create", other, *boot, "--vmlinux", str(vmlinux),
            user=kdlab_user, env=as_user,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        info = wait_for_index(theirs, build, kdlab_user.uid).parent.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (kdlab_user.uid, 0o700)
        started = kdlabctl(address, "start", "--paused", other, user=kdlab_user)
        assert started.returncode == 0, started.stderr
        gdb = kdlabctl(
            address, "gdb", other, "--batch", *CACHE_STATS,
            user=kdlab_user, env=as_user,
        )  # fmt: skip
        assert gdb.returncode == 0, gdb.stderr
        assert "Cache hits (this session): 1" in gdb.stdout
    finally:
        remove_vm(lab.daemon, other)
    assert sorted(p.name for p in index.parent.iterdir()) == root_files
