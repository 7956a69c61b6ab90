"""The Diagnosis anyone may read quotes nothing of a guest's console (issue 10.7).

A guest's console is its owner's: only those who may read the log (debug-vms on
the VM) get the cause in the console's words, through ``VM.GetDiagnosis``. The
``Diagnosis`` property, readable by anyone, keeps the code, the severity, a
cause without the guest's words, and the fix.
"""

from __future__ import annotations

import grp
import json
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlabd.errors import NotAuthorized
from tests.bus.harness import NOBODY, FakeVM, Identity, Lab, PrivateBus, kdlabctl

pytestmark = pytest.mark.bus

SECRET = "guest-secret-7f3a"
PANIC_LOG = (
    "[    0.000000] Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists)\n"
    "[    0.000000] Command line: console=ttyS0 nokaslr\n"
    f"[    1.234567] {SECRET}: the last words of a driver\n"
    f"[    1.234568] Kernel panic - not syncing: {SECRET} in the panic message\n"
    f"[    1.234569] CPU: 0 PID: 1 Comm: {SECRET} Not tainted 6.1.0 #1\n"
    "[    1.234570] ---[ end Kernel panic - not syncing ]---\n"
)
CRASHED = FakeVM("crashed", "running", NOBODY.uid, "", "console=ttyS0 nokaslr")


def kdlab_gid() -> int:
    return grp.getgrnam("kdlab").gr_gid


@pytest.fixture
def lab(bus: PrivateBus, workdir: Path) -> Iterator[Lab]:
    """kdlabd with one running VM of nobody's whose console shows a panic."""
    lab = Lab(bus, workdir, [CRASHED])
    lab.populate()
    lab.layout.console_log(CRASHED.name).write_text(PANIC_LOG)
    lab.start()
    yield lab
    lab.stop_cleanly()


def show(lab: Lab, user: Identity | None) -> dict[str, object]:
    result = kdlabctl(lab.daemon.address, "show", "--json", CRASHED.name, user=user)
    assert result.returncode == 0, result.stderr
    shown: dict[str, object] = json.loads(result.stdout)
    return shown


def test_others_see_the_code_and_fix_but_not_the_consoles_words(lab: Lab) -> None:
    owner = Identity(NOBODY.uid, NOBODY.gid, (kdlab_gid(),))
    daemon, bin_ = pwd.getpwnam("daemon"), pwd.getpwnam("bin")
    other_member = Identity(daemon.pw_uid, daemon.pw_gid, (kdlab_gid(),))
    outsider = Identity(bin_.pw_uid, bin_.pw_gid)

    for user in (other_member, outsider):
        found = show(lab, user)["diagnosis"]
        assert isinstance(found, dict)
        assert found["code"] == "kernel-panic"
        assert (
            found["fix"] == f"its owner reads the report: kdlabctl logs {CRASHED.name}"
        )
        assert SECRET not in json.dumps(show(lab, user)), "the console's words leak"
        refused = kdlabctl(lab.daemon.address, "logs", CRASHED.name, user=user)
        assert refused.returncode == NotAuthorized.exit_code

    for user in (owner, None):  # the owner, and root
        found = show(lab, user)["diagnosis"]
        assert isinstance(found, dict)
        assert found["code"] == "kernel-panic"
        assert SECRET in str(found["cause"]), found
