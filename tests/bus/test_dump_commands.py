"""``kdlabctl dump ...``, ``drgn`` and ``crash`` against kdlabd on the test
driver, whose dumps pool holds testdriver.DUMPS (the test driver cannot dump
a domain): listings, ``dump get`` as the caller, who may get or delete whose
dump, the vmlinux check, exit codes. Real dumps of real kernels are the vm
tier's (tests/vm/test_dumps.py).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.errors import InvalidArgument, InvalidState, NoSuchDump, NotAuthorized
from tests.bus.conftest import Ctl
from tests.support.clients import Identity
from tests.support.testdriver import DUMPS, VMS

# Every test runs against kdlabd serving testdriver.FLEET and its DUMPS.
pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]

HEADERS = ["ID", "VM", "REASON", "RELEASE", "CREATED", "SIZE", "FORMAT", "VMCOREINFO"]
ROOTS, OTHERS = DUMPS  # a dump of root's VM linux-6.9-rc1, one of uid 1000's


def member() -> Identity:
    """A member of group kdlab who owns none of the dumps (user daemon)."""
    daemon = pwd.getpwnam("daemon")
    return Identity(daemon.pw_uid, daemon.pw_gid, (grp.getgrnam("kdlab").gr_gid,))


@pytest.fixture
def target() -> Iterator[Path]:
    """A file name in /tmp (where any user may write) that nothing uses yet."""
    path = Path("/tmp") / f"kdlab-dump-test-{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


def test_list_shows_every_dump_and_json_its_properties(ctl: Ctl) -> None:
    listed = ctl("dump", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == HEADERS
    rows = [line.split() for line in lines[1:]]
    # Oldest first; these were made at the same time: by id.
    ordered = sorted(DUMPS, key=lambda dump: dump.id)
    assert [row[:4] for row in rows] == [
        [dump.id, dump.vm.name, "panic", dump.vm.release or "-"] for dump in ordered
    ]
    assert [row[-2:] for row in rows] == [["elf", "yes"]] * len(DUMPS)
    shown = {
        entry["id"]: entry for entry in json.loads(ctl("dump", "list", "--json").stdout)
    }
    assert list(shown) == [dump.id for dump in ordered]
    assert shown[ROOTS.id]["build_id"] == "00c0ffee"
    assert shown[ROOTS.id]["vmuuid"] == ROOTS.vm.uuid
    assert shown[ROOTS.id]["size"] == len(ROOTS.content)
    only = json.loads(ctl("dump", "list", OTHERS.vm.name, "--json").stdout)
    assert [entry["id"] for entry in only] == [OTHERS.id]
    assert json.loads(ctl("dump", "list", "idle", "--json").stdout) == []


def test_get_writes_the_dump_as_the_caller_0600_and_never_overwrites(
    ctl: Ctl, target: Path
) -> None:
    got = ctl("dump", "get", ROOTS.id, "-o", str(target))
    assert got.returncode == 0, got.stderr
    assert target.read_bytes() == ROOTS.content
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.write_bytes(b"mine")
    again = ctl("dump", "get", ROOTS.id, "-o", str(target))
    assert again.returncode == InvalidArgument.exit_code
    assert "--force" in again.stderr
    assert target.read_bytes() == b"mine"
    forced = ctl("dump", "get", ROOTS.id, "-o", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    assert target.read_bytes() == ROOTS.content


def test_another_member_can_neither_get_nor_delete_a_dump(
    ctl: Ctl, target: Path
) -> None:
    other = member()
    refused = ctl("dump", "get", ROOTS.id, "-o", str(target), user=other)
    assert refused.returncode == NotAuthorized.exit_code, refused.stderr
    assert not target.exists(), "no file for a refused get"
    deleted = ctl("dump", "delete", ROOTS.id, user=other)
    assert deleted.returncode == NotAuthorized.exit_code, deleted.stderr
    drgn = ctl("drgn", ROOTS.id, "--vmlinux", "/dev/null", user=other)
    assert drgn.returncode != 0
    listed = json.loads(ctl("dump", "list", "--json", user=other).stdout)
    assert ROOTS.id in [entry["id"] for entry in listed], "anyone may list"


def test_the_owner_deletes_a_dump(ctl: Ctl) -> None:
    assert ctl("dump", "delete", ROOTS.id).returncode == 0
    listed = json.loads(ctl("dump", "list", "--json").stdout)
    assert [entry["id"] for entry in listed] == [OTHERS.id]
    gone = ctl("dump", "delete", ROOTS.id)
    assert gone.returncode == NoSuchDump.exit_code, gone.stderr


def test_get_of_no_dump_makes_no_file(ctl: Ctl, target: Path) -> None:
    got = ctl("dump", "get", "nope-20260101-000000", "-o", str(target))
    assert got.returncode == NoSuchDump.exit_code, got.stderr
    assert not target.exists()


@pytest.mark.parametrize("tool", ["drgn", "crash"])
def test_a_vmlinux_of_another_build_is_refused_naming_it(
    ctl: Ctl, tool: str, tmp_path: Path
) -> None:
    # (tests/unit/test_dump_commands.py checks one with another build ID.)
    wrong = tmp_path / "vmlinux"
    wrong.write_bytes(b"not an ELF file: no build ID")
    refused = ctl(tool, ROOTS.vm.name, "--vmlinux", str(wrong))
    assert refused.returncode == InvalidArgument.exit_code, refused.stderr
    assert "the dump's build ID 00c0ffee" in refused.stderr
    assert f"{wrong} (build ID none)" in refused.stderr


@pytest.mark.parametrize("tool", ["drgn", "crash"])
def test_without_a_vmlinux_it_says_where_it_looked(ctl: Ctl, tool: str) -> None:
    # The VM recorded /home/dev/linux/vmlinux, which this machine lacks.
    refused = ctl(tool, ROOTS.vm.name)
    assert refused.returncode == InvalidArgument.exit_code, refused.stderr
    assert f"looked at {VMS['linux-6.9-rc1'].vmlinux}" in refused.stderr
    assert "--vmlinux" in refused.stderr


@pytest.mark.parametrize("tool", ["drgn", "crash"])
def test_a_vm_without_a_dump_says_how_to_take_one(ctl: Ctl, tool: str) -> None:
    refused = ctl(tool, "idle")
    assert refused.returncode == NoSuchDump.exit_code, refused.stderr
    assert "kdlabctl dump take idle" in refused.stderr


@pytest.mark.parametrize("tool", ["drgn", "crash"])
def test_neither_dump_nor_vm(ctl: Ctl, tool: str) -> None:
    refused = ctl(tool, "nothing-by-this-name")
    assert refused.returncode == NoSuchDump.exit_code, refused.stderr
    assert "no dump or VM is named nothing-by-this-name" in refused.stderr


def test_take_of_a_vm_that_is_off_is_refused(ctl: Ctl) -> None:
    before = json.loads(ctl("dump", "list", "--json").stdout)
    taken = ctl("dump", "take", "idle")
    assert taken.returncode == InvalidState.exit_code, taken.stderr
    assert json.loads(ctl("dump", "list", "--json").stdout) == before


def test_get_runs_as_the_caller_not_kdlabd(ctl: Ctl, target: Path) -> None:
    """The file belongs to whoever ran kdlabctl (here root: the test's uid)."""
    assert ctl("dump", "get", ROOTS.id, "-o", str(target)).returncode == 0
    assert target.stat().st_uid == os.getuid()
