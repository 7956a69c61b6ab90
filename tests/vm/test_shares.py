"""A member's directory shared into their VM, with their rights (real QEMU).

A real login user of group kdlab (tests/support/logins.py) creates a VM with
``--share`` of a directory in their 0700 home and starts it with kdlabctl,
which serves it with a virtiofsd of theirs; the guest (Debian's cloud
kernel, a busybox initramfs that mounts each tag of ``kdlab.shares=`` at
/mnt/TAG, as kdlab's own does) reads the member's file, cannot read root's
0600 file beside it, and writes a file that is the member's on the host.
When the guest powers off, the member's virtiofsd ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kdlab.errors import EXIT_USAGE
from tests.support import debian
from tests.support.logins import Logins, LoginUser
from tests.vm.conftest import MARKER, Lab

pytestmark = pytest.mark.vm

SAID = "kdlab-share-test:"
# Mounts every tag of kdlab.shares= at /mnt/TAG, then reads what the test
# left in the share's directory, writes into it and powers off.
PROBE = f"""\
for tag in $(sed -n 's/.*kdlab.shares=\\([^ ]*\\).*/\\1/p' /proc/cmdline | tr , ' '); do
    mkdir -p /mnt/$tag && mount -t virtiofs $tag /mnt/$tag && echo {SAID} mounted $tag
done
echo {SAID} mine="$(cat /mnt/data/mine.txt)"
cat /mnt/data/secret.txt && echo {SAID} secret read || echo {SAID} secret refused
echo from the guest > /mnt/data/from-guest.txt && echo {SAID} wrote
echo {SAID} done
poweroff -f
"""


def console(lab: Lab, name: str, text: str, timeout: float = 150) -> str:
    """The VM's console log once it holds *text*."""
    deadline = time.monotonic() + timeout
    while text not in (log := lab.ctl("logs", name).stdout):
        assert time.monotonic() < deadline, f"{text!r} not in {log[-3000:]!r}"
        time.sleep(0.5)
    return log


def virtiofsds(user: LoginUser) -> list[str]:
    found = subprocess.run(
        ["pgrep", "-u", str(user.uid), "-a", "virtiofsd"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.splitlines()


def test_a_members_share_is_theirs_in_the_guest(
    lab: Lab, logins: Logins, vm_name: str
) -> None:
    member = logins.alice
    shared = member.home / "shared"
    shared.mkdir()
    (shared / "mine.txt").write_text("alice's words\n")
    os.chmod(shared / "mine.txt", 0o600)
    for path in (shared, shared / "mine.txt"):
        os.chown(path, member.uid, member.gid)
    # Root's, beside the member's file: the member cannot read it.
    (shared / "secret.txt").write_text("root's secret\n")
    os.chmod(shared / "secret.txt", 0o600)
    initramfs = debian.busybox_initramfs(
        MARKER, lab.kernel, ["virtio_pci", "virtiofs"], PROBE
    )

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return logins.kdlabctl(member, lab.daemon.address, *args, timeout=120)

    created = ctl(
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz),
        "--initrd", str(initramfs), "--memory", "256", "--share", f"{shared}:data",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    shown = json.loads(ctl("show", vm_name, "--json").stdout)
    assert shown["shares"] == {"data": str(shared)}
    assert "kdlab.shares=data" in shown["cmdline"].split()

    started = ctl("start", vm_name)
    assert started.returncode == 0, started.stderr
    assert virtiofsds(member), "the member's virtiofsd serves the share"
    log = console(lab, vm_name, f"{SAID} done")
    said = [line.split(SAID, 1)[1].strip() for line in log.splitlines() if SAID in line]
    assert said == [
        "mounted data",
        "mine=alice's words",
        "secret refused",
        "wrote",
        "done",
    ]
    assert "root's secret" not in log
    written = shared / "from-guest.txt"
    assert written.read_text() == "from the guest\n"
    assert (written.stat().st_uid, written.stat().st_gid) == (member.uid, member.gid)

    # The guest powered off: QEMU hung up, and the member's virtiofsd ended.
    deadline = time.monotonic() + 60
    while virtiofsds(member) or json.loads(ctl("show", vm_name, "--json").stdout)[
        "state"
    ] not in ("stopped", "crashed"):
        assert time.monotonic() < deadline, (virtiofsds(member), ctl("show", vm_name))
        time.sleep(0.5)


def test_a_member_cannot_share_root(lab: Lab, logins: Logins, vm_name: str) -> None:
    refused = logins.kdlabctl(
        logins.alice, lab.daemon.address,
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz), "--share", "/root",
    )  # fmt: skip
    assert refused.returncode == EXIT_USAGE, refused.stderr
    assert "cannot share /root: you" in refused.stderr
    assert vm_name not in lab.ctl("list").stdout


@pytest.fixture(autouse=True)
def _clean_share(logins: Logins) -> None:
    """The share's directory is the test's: none is left from a killed run."""
    shutil.rmtree(Path(logins.alice.home, "shared"), ignore_errors=True)
