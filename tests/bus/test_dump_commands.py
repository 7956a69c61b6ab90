"""``kdlabctl dump ...``, ``drgn`` and ``crash`` against kdlabd on the test
driver: listings, exit codes, and a file ``dump get`` never makes when kdlabd
refuses. Real dumps of real kernels are the vm tier's (tests/vm/test_dumps.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.errors import InvalidState, NoSuchDump
from tests.bus.conftest import Ctl

# Every test runs against kdlabd serving testdriver.FLEET.
pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]

HEADERS = ["ID", "VM", "REASON", "RELEASE", "CREATED", "SIZE", "FORMAT", "VMCOREINFO"]


def test_no_dumps_list_as_a_header_and_an_empty_json_list(ctl: Ctl) -> None:
    listed = ctl("dump", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == HEADERS
    assert json.loads(ctl("dump", "list", "--json").stdout) == []
    assert json.loads(ctl("dump", "list", "idle", "--json").stdout) == []


def test_get_of_no_dump_makes_no_file(ctl: Ctl, tmp_path: Path) -> None:
    got = ctl("dump", "get", "nope-20260101-000000", "-o", str(tmp_path / "f"))
    assert got.returncode == NoSuchDump.exit_code, got.stderr
    assert not (tmp_path / "f").exists()
    deleted = ctl("dump", "delete", "nope-20260101-000000")
    assert deleted.returncode == NoSuchDump.exit_code, deleted.stderr


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
    taken = ctl("dump", "take", "idle")
    assert taken.returncode == InvalidState.exit_code, taken.stderr
    assert json.loads(ctl("dump", "list", "--json").stdout) == []
