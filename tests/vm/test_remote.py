"""Remote hosts over ssh (issue 19), with a second "host" made on this machine.

The host is tests/support/sshhost.py's: the tests' own sshd on 127.0.0.1 in a
network namespace of its own. alice (a real login user) names it ``lab`` in
her hosts.toml, reaching it as bob with a key made by the test; the lab's
kdlabd is the host's kdlabd. alice runs ``kdlabctl --host lab ...`` inside the
namespace: the whole command runs on her side (her files, her gdb, her
terminal) and only its D-Bus connection goes over ssh, where kdlabd sees bob.
So a kernel in a directory bob cannot read boots (it was streamed), the VM
is bob's, and errors keep their exit codes: the same command run by bob on
the host itself exits the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kdlab.errors import (
    EXIT_UNAVAILABLE,
    InvalidState,
    NoSuchVM,
    NotAuthorized,
)
from kdlabctl.cli import LIST_HEADERS
from kdlabd import __version__
from tests.support import browser
from tests.support.browser import PageServer
from tests.support.clients import assert_no_traceback, kdlabctl_argv, run_tool
from tests.support.logins import (
    LOGIN_ENV,
    Logins,
    LoginUser,
    kdlabctl_command,
    login_argv,
)
from tests.support.sshhost import SshHost, SshLogin
from tests.support.timeouts import CTL_TIMEOUT
from tests.vm.conftest import MARKER, Lab
from tests.vm.test_cockpit import (
    BOOT_SECONDS,
    as_page_shows,
    button,
    cell,
    wait_state,
)
from tests.vm.test_debug import SHELL_PROMPT, Console
from tests.vm.test_lifecycle import wait_for_console

pytestmark = pytest.mark.vm

HOST = "lab"
MEMORY = ("--memory", "256")
DUMP_TIMEOUT = 300.0  # a dump of a 256 MiB guest, then its way back over ssh


@dataclass(frozen=True)
class Remote:
    """The lab's kdlabd as alice's host ``lab``, reached over ssh as bob."""

    lab: Lab
    logins: Logins
    ssh_host: SshHost
    login: SshLogin

    @property
    def alice(self) -> LoginUser:
        return self.logins.alice

    @property
    def bob(self) -> LoginUser:
        return self.logins.bob

    def ctl(
        self, *args: str, host: str | None = HOST, timeout: float = CTL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """``kdlabctl --host HOST ARGS`` run by alice inside the namespace
        (without ``--host`` when *host* is None: ``hosts``, ``--all-hosts``)."""
        where = ("--host", host) if host is not None else ()
        return self.logins.kdlabctl(
            self.alice,
            self.lab.daemon.address,
            *where, *args,
            timeout=timeout,
            within=self.ssh_host.within,
        )  # fmt: skip

    def ok(
        self, *args: str, host: str | None = HOST, timeout: float = CTL_TIMEOUT
    ) -> str:
        """:meth:`ctl` that must succeed; its output."""
        done = self.ctl(*args, host=host, timeout=timeout)
        assert done.returncode == 0, done.stderr + self.ssh_host.log()[-3000:]
        return done.stdout

    def on_host(self, user: LoginUser, *args: str) -> subprocess.CompletedProcess[str]:
        """``kdlabctl ARGS`` run by *user* on the host itself (no ssh)."""
        return self.logins.kdlabctl(user, self.lab.daemon.address, *args)

    def show(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.ok("show", "--json", name)))

    def console_argv(self, name: str) -> list[str]:
        """alice's ``kdlabctl --host lab console NAME``, for a pseudo-terminal."""
        command = kdlabctl_command(
            self.lab.daemon.address, "--host", HOST, "console", name
        )
        return login_argv(self.alice, command, self.ssh_host.within)


@pytest.fixture(scope="module")
def remote(lab: Lab, logins: Logins, ssh_host: SshHost) -> Remote:
    """alice's hosts.toml names the lab's kdlabd ``lab``, reached as bob."""
    login = ssh_host.login(logins.alice, logins.bob)
    ssh_host.name(logins.alice, HOST, login, lab.daemon.address)
    return Remote(lab, logins, ssh_host, login)


@pytest.fixture(scope="module")
def private_boot(remote: Remote) -> tuple[Path, Path]:
    """Copies of the lab's kernel and initramfs in a 0700 directory of alice's."""
    alice = remote.alice
    private = alice.home / "private"
    private.mkdir(mode=0o700)
    os.chown(private, alice.uid, alice.gid)
    copies = []
    for source in (remote.lab.kernel.vmlinuz, remote.lab.initramfs):
        copy = Path(shutil.copy(source, private / source.name))
        os.chown(copy, alice.uid, alice.gid)
        copy.chmod(0o600)
        copies.append(copy)
    return copies[0], copies[1]


def test_the_second_host_is_reached_over_ssh_from_inside_its_namespace_only(
    ssh_host: SshHost, logins: Logins
) -> None:
    """The harness: alice's key logs her in as bob on the test's sshd, from
    inside the namespace; outside it nothing listens on that address."""
    alice, bob = logins.alice, logins.bob
    login = ssh_host.login(alice, bob)
    ssh = shlex.join(login.ssh_argv("id -un"))
    inside = ssh_host.run(alice, ssh)
    assert (inside.returncode, inside.stdout) == (0, f"{bob.name}\n"), (
        inside.stderr + ssh_host.log()
    )
    assert f"Accepted publickey for {bob.name}" in ssh_host.log()
    outside = logins.run(alice, ssh)
    assert outside.returncode == 255, outside.stdout
    assert "Connection refused" in outside.stderr

    # Root's variant (the benchmarks'): keys of the session's, not root's home.
    root = ssh_host.login(None, None)
    assert ssh_host.directory in root.key.parents
    as_root = run_tool([*ssh_host.within, *root.ssh_argv("id -un")])
    assert (as_root.returncode, as_root.stdout) == (0, "root\n"), as_root.stderr


def test_a_vm_on_another_host_from_create_to_dump(
    remote: Remote,
    private_boot: tuple[Path, Path],
    vmlinux: Path,
    vm_name: str,
    tmp_path: Path,
) -> None:
    """Issue 19's walk: create with files only alice can read, a paused start,
    gdb to start_kernel with alice's vmlinux, the console, a dump back."""
    kernel, initrd = private_boot
    bob, alice = remote.bob, remote.alice
    unread = remote.logins.run(bob, f"cat {shlex.quote(str(kernel))} >/dev/null")
    assert unread.returncode != 0, "bob can read alice's kernel"
    assert "Permission denied" in unread.stderr

    # The files are read by alice's kdlabctl and streamed.
    remote.ok(
        "create", vm_name, "--kernel", str(kernel), "--initrd", str(initrd), *MEMORY
    )
    shown = remote.show(vm_name)
    assert shown["owner"] == bob.uid, "the caller on the host is the ssh user"
    assert shown["kernel_release"] == remote.lab.kernel.release

    remote.ok("start", "--paused", vm_name)
    shown = remote.show(vm_name)
    assert (shown["state"], shown["waiting_for_debugger"]) == ("paused", True)

    # gdb runs on alice's side with her vmlinux; the stub's stream is tunnelled.
    gdb = remote.ctl(
        "gdb", vm_name, "--vmlinux", str(vmlinux), "--batch",
        "-ex", "hbreak start_kernel", "-ex", "continue",
        "-ex", "p init_uts_ns.name.release",
        timeout=CTL_TIMEOUT * 2,
    )  # fmt: skip
    assert gdb.returncode == 0, gdb.stdout + gdb.stderr
    assert "start_kernel () at init/main.c" in gdb.stdout
    assert f'"{remote.lab.kernel.release}"' in gdb.stdout
    wait_for_console(remote.lab, vm_name, MARKER)
    assert remote.show(vm_name)["state"] == "running"

    # The console on alice's terminal; busybox's line editing discards what is
    # typed before its prompt.
    wait_for_console(remote.lab, vm_name, SHELL_PROMPT)
    console = Console(
        remote.lab.daemon.address, vm_name,
        argv=remote.console_argv(vm_name), env=LOGIN_ENV,
    )  # fmt: skip
    try:
        console.expect(b"escape character is ^]")
        console.type(b"echo remote-$((6*7))\r")
        console.expect(b"remote-42")
        assert console.detach() == 0, console.seen
    finally:
        if console.proc.poll() is None:
            console.proc.kill()
            console.proc.wait()
    assert b"detached" in console.seen
    assert "remote-42" in remote.lab.ctl("logs", vm_name).stdout

    # A dump comes back as a file of alice's, the same bytes root gets on the host.
    dump_id = remote.ok("dump", "take", vm_name, timeout=DUMP_TIMEOUT).strip()
    (dump,) = json.loads(remote.ok("dump", "list", vm_name, "--json"))
    assert (dump["id"], dump["owner"]) == (dump_id, bob.uid)
    mine = alice.home / f"{vm_name}.vmcore"  # other tests' files are alice's too
    remote.ok("dump", "get", dump_id, "-o", str(mine), timeout=DUMP_TIMEOUT)
    info = mine.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (alice.uid, 0o600)
    assert info.st_size == dump["size"]
    roots = tmp_path / "vmcore"
    got = remote.lab.ctl("dump", "get", dump_id, "-o", str(roots))
    assert got.returncode == 0, got.stderr
    assert filecmp.cmp(mine, roots, shallow=False), "the dump's bytes differ"
    mine.unlink()

    remote.ok("dump", "delete", dump_id)
    remote.ok("delete", "--force", vm_name)
    gone = remote.ctl("show", vm_name)
    assert gone.returncode == NoSuchVM.exit_code, gone.stderr


def same_error(
    remote: Remote, code: int, *args: str
) -> subprocess.CompletedProcess[str]:
    """``ARGS`` exit *code* both through ``--host`` and run by bob on the host
    itself, with the host's message; the remote run."""
    here = remote.on_host(remote.bob, *args)
    there = remote.ctl(*args)
    assert here.returncode == code, (args, here.stderr)
    assert there.returncode == code, (args, there.stderr)
    message = here.stderr.strip()
    assert message, "the host says what went wrong"
    assert message in there.stderr, (here.stderr, there.stderr)
    return there


def test_errors_keep_their_exit_codes_across_hosts(
    remote: Remote, private_boot: tuple[Path, Path], vm_name: str
) -> None:
    """No such VM (4), a start of a started VM (3), and a VM of another user's
    (6: through ``--host lab`` alice is bob, even for her own VM on the host)."""
    kernel, initrd = private_boot
    same_error(remote, NoSuchVM.exit_code, "show", f"{vm_name}-none")

    remote.ok(
        "create", vm_name, "--kernel", str(kernel), "--initrd", str(initrd), *MEMORY
    )
    remote.ok("start", "--paused", vm_name)
    same_error(remote, InvalidState.exit_code, "start", vm_name)

    hers = f"{vm_name}-alice"
    created = remote.on_host(
        remote.alice, "create", hers, "--kernel", str(kernel), *MEMORY
    )
    try:
        assert created.returncode == 0, created.stderr
        same_error(remote, NotAuthorized.exit_code, "delete", hers)
        assert remote.on_host(remote.alice, "show", hers).returncode == 0
    finally:
        remote.lab.ctl("delete", "--force", hers)


def test_an_unreachable_host_is_exit_69_with_sshs_error(
    ssh_host: SshHost, logins: Logins
) -> None:
    """A port nothing listens on, named on the command line: ssh's own words."""
    spec = f"{logins.bob.name}@127.0.0.1:{ssh_host.unused_port}"
    refused = logins.kdlabctl(
        logins.alice, "unix:path=/nonexistent", "--host", spec, "list",
        within=ssh_host.within,
    )  # fmt: skip
    assert refused.returncode == EXIT_UNAVAILABLE, refused.stderr
    assert "Connection refused" in refused.stderr
    assert_no_traceback(refused.stderr)


def test_hosts_lists_reachability_version_and_vm_count(
    remote: Remote, ssh_host: SshHost, vm_name: str
) -> None:
    """``kdlabctl hosts``: lab reachable as bob, with kdlab's version and the
    VMs bob sees there; a host nothing answers on, with ssh's error (exit 69).
    ``list --all-hosts``: lab's VM in a row of host lab."""
    remote.ok("create", vm_name, "--kernel", str(remote.lab.kernel.vmlinuz), *MEMORY)
    seen = remote.on_host(remote.bob, "list", "--json")
    assert seen.returncode == 0, seen.stderr
    count = len(json.loads(seen.stdout))
    assert count >= 1

    (lab,) = json.loads(remote.ok("hosts", "--json", host=None))
    assert (lab["name"], lab["reachable"], lab["error"]) == (HOST, True, ""), lab
    assert (lab["version"], lab["vms"]) == (__version__, count)
    assert (lab["user"], lab["destination"]) == (
        remote.bob.name,
        remote.login.destination,
    )

    down = dataclasses.replace(remote.login, port=ssh_host.unused_port)
    ssh_host.name(remote.alice, "down", down, remote.lab.daemon.address)
    try:
        both = remote.ctl("hosts", "--json", host=None)
    finally:
        ssh_host.forget(remote.alice, "down")
    assert both.returncode == EXIT_UNAVAILABLE, both.stderr
    answered = {host["name"]: host for host in json.loads(both.stdout)}
    assert answered[HOST]["reachable"] is True
    assert answered["down"]["reachable"] is False
    assert "Connection refused" in answered["down"]["error"]

    header, *rows = remote.ok("list", "--all-hosts", host=None).splitlines()
    assert header.split()[0] == "HOST", header
    assert any(row.split()[0] == HOST and vm_name in row.split() for row in rows), rows


def test_up_builds_here_and_boots_on_the_host(
    lab: Lab, ssh_host: SshHost, minimal_build: Path, vm_name: str
) -> None:
    """``up TREE --host``: the tree, its vmlinux and gdb scripts are this
    side's; the VM is the host's. gdb (here) stops at start_kernel and the
    kernel's own lx-version runs (root to root, the tree being root's)."""
    ssh_host.name(None, "rootlab", ssh_host.login(None, None), lab.daemon.address)
    up = run_tool(
        [
            *ssh_host.within, *kdlabctl_argv(lab.daemon.address),
            "up", str(minimal_build), "--name", vm_name, "--host", "rootlab",
            "--batch", "-ex", "hbreak start_kernel", "-ex", "continue",
            "-ex", "lx-version",
        ],
        env=ssh_host.root_env(),
        timeout=CTL_TIMEOUT * 3,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    assert "start_kernel () at" in up.stdout
    assert "Linux version 6.1" in up.stdout, "lx-version ran: the gdb scripts loaded"
    shown = json.loads(lab.ctl("show", "--json", vm_name).stdout)
    assert shown["tree"] == str(minimal_build)


def list_owners(remote: Remote) -> dict[str, str]:
    """VM name to owner, as ``kdlabctl --host lab list`` names it for alice."""
    header, *rows = remote.ok("list").splitlines()
    assert header.split() == list(LIST_HEADERS), header
    return {row.split()[0]: row.split()[-1] for row in rows}


@pytest.fixture
def page_root() -> Iterator[Path]:
    """A directory every user may enter, for the page and the kdlabctl wrapper
    (tests/support/browser.py: PageServer); removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kdlab-cockpit-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_kdlabctl_web_host_serves_the_hosts_vms_to_a_browser(
    remote: Remote,
    ssh_host: SshHost,
    vm_name: str,
    page_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """alice runs ``kdlabctl web --host lab`` and her browser opens the URL it
    printed (both inside the namespace, where the host is reached: the
    browser's sockets are alice's, as kdlabctl web checks). Her own bus is
    nowhere (KDLAB_BUS names no socket): the page reaches the host's kdlabd
    over ssh, as bob. It lists bob's VM named as bob, and a VM of alice's on
    the host by its number, as ``kdlabctl --host lab list`` names them (this
    machine's passwd names no uid of the host's); its buttons act as bob
    (bob's VM starts paused and stops; alice's refuses, with the message
    the command line gets); its boot log view runs kdlabctl here, on the
    host's bus."""
    browser.require_browser()
    alice, bob = remote.alice, remote.bob
    boot = ("--kernel", str(remote.lab.kernel.vmlinuz),
            "--initrd", str(remote.lab.initramfs), *MEMORY)  # fmt: skip
    remote.ok("create", vm_name, *boot)
    hers = f"{vm_name}-alice"
    artifacts = browser.artifacts_dir(tmp_path_factory.getbasetemp())
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(remote.lab.ctl, "delete", "--force", hers)
        created = remote.on_host(alice, "create", hers, *boot)
        assert created.returncode == 0, created.stderr
        owners = list_owners(remote)
        assert (owners[vm_name], owners[hers]) == (bob.name, str(alice.uid))
        page = PageServer(
            alice, "unix:path=/nonexistent", page_root,
            artifacts / "kdlabctl-web-host.log", "--host", HOST,
            within=ssh_host.within,
        )  # fmt: skip
        cleanup.callback(page.stop)
        web = cleanup.enter_context(browser.browser(artifacts, alice, ssh_host.within))
        web.open(page.url)
        for name in (vm_name, hers):
            wait_state(web, name, "defined")
            web.wait_for_text(
                cell(name, "owner"), owners[name].__eq__,
                f"{name}'s owner is not named as kdlabctl --host names it",
            )  # fmt: skip
        web.screenshot("host-vms-listed")

        web.click(button(vm_name, "start-paused"))
        wait_state(web, vm_name, "paused")
        assert remote.show(vm_name)["state"] == "paused"
        web.click(button(vm_name, "force-stop"))
        wait_state(web, vm_name, "stopped")

        refused = remote.ctl("start", hers)
        assert refused.returncode == NotAuthorized.exit_code, refused.stderr
        web.click(button(hers, "start"))
        shown = web.wait_for_text("#error", bool, "no error shown")
        assert shown == as_page_shows(refused.stderr)
        web.click("#error-dismiss")

        web.click(button(vm_name, "start"))
        wait_state(web, vm_name, "running")
        web.click(button(vm_name, "logs"))
        web.wait_for_text(
            "#log", lambda text: "Linux version" in text,
            "the boot log view shows no boot", BOOT_SECONDS,
        )  # fmt: skip
        web.screenshot("host-vm-boot-log")
        web.click(button(vm_name, "force-stop"))
        wait_state(web, vm_name, "stopped")
        assert web.text("#error") == ""
