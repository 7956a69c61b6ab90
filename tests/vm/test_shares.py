"""A member's directory shared into their VM, with their rights (real QEMU).

A real login user of group kdlab (tests/support/logins.py) creates a VM of
Debian's cloud kernel with ``--share`` of a directory in their 0700 home and
starts it with kdlabctl, which serves it with a virtiofsd of theirs. kdlab's
userspace initramfs mounts it at /mnt/TAG by itself; through ``kdlabctl
exec`` the guest reads the member's file, cannot read root's 0600 file
beside it, and writes a file that is the member's on the host. When the VM
stops, the member's virtiofsd ends. One boot for all of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.errors import EXIT_USAGE, NoAgent
from kdlab.kernel.initramfs import READY
from tests.support.logins import Logins, LoginUser
from tests.vm.conftest import Lab
from tests.vm.test_lifecycle import wait_for_console

pytestmark = pytest.mark.vm


def virtiofsds(user: LoginUser) -> list[str]:
    """The virtiofsd processes of *user*."""
    found = subprocess.run(
        ["pgrep", "-u", str(user.uid), "-a", "virtiofsd"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.splitlines()


@pytest.fixture
def shared(logins: Logins) -> Iterator[Path]:
    """The member's directory to share: their file, and root's 0600 one."""
    member = logins.alice
    directory = member.home / "shared"
    shutil.rmtree(directory, ignore_errors=True)  # a killed run's
    directory.mkdir()
    (directory / "mine.txt").write_text("alice's words\n")
    os.chmod(directory / "mine.txt", 0o600)
    for path in (directory, directory / "mine.txt"):
        os.chown(path, member.uid, member.gid)
    (directory / "secret.txt").write_text("root's secret\n")
    os.chmod(directory / "secret.txt", 0o600)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_a_members_share_is_theirs_in_the_guest(
    lab: Lab, logins: Logins, vm_name: str, shared: Path
) -> None:
    member = logins.alice

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return logins.kdlabctl(member, lab.daemon.address, *args, timeout=120)

    created = ctl(
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz), "--memory", "256",
        "--share", f"{shared}:data",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    shown = json.loads(ctl("show", vm_name, "--json").stdout)
    assert shown["shares"] == {"data": str(shared)}
    assert "kdlab.shares=data" in shown["cmdline"].split()

    started = ctl("start", vm_name)
    assert started.returncode == 0, started.stderr
    assert virtiofsds(member), "the member's virtiofsd serves the share"
    wait_for_console(lab, vm_name, READY.text(), timeout=120)

    def guest(*argv: str) -> subprocess.CompletedProcess[str]:
        deadline = time.monotonic() + 30
        while (done := ctl("exec", vm_name, "--", *argv)).returncode == (
            NoAgent.exit_code
        ) and time.monotonic() < deadline:
            time.sleep(0.5)  # the agent is starting
        return done

    mine = guest("cat", "/mnt/data/mine.txt")
    assert (mine.returncode, mine.stdout) == (0, "alice's words\n"), mine.stderr
    secret = guest("cat", "/mnt/data/secret.txt")
    assert secret.returncode == 1
    assert "Permission denied" in secret.stderr
    assert "root's secret" not in secret.stdout
    wrote = guest("sh", "-c", "echo from the guest > /mnt/data/from-guest.txt")
    assert wrote.returncode == 0, wrote.stderr
    written = shared / "from-guest.txt"
    assert written.read_text() == "from the guest\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (member.uid, member.gid)

    # QEMU hangs up when the VM stops, and the member's virtiofsd ends.
    stopped = ctl("stop", vm_name)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 30
    while virtiofsds(member):
        assert time.monotonic() < deadline, virtiofsds(member)
        time.sleep(0.3)


def test_a_member_cannot_share_root(lab: Lab, logins: Logins, vm_name: str) -> None:
    refused = logins.kdlabctl(
        logins.alice, lab.daemon.address,
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz), "--share", "/root",
    )  # fmt: skip
    assert refused.returncode == EXIT_USAGE, refused.stderr
    assert "cannot share /root: you" in refused.stderr
    assert vm_name not in lab.ctl("list").stdout
