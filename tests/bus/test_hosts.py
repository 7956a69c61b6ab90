"""kdlabctl's side of ``--host``, ``hosts`` and ``list --all-hosts`` against a
real kdlabd (the standard fleet on the private bus).

The transport is not under test here: kdlabctl runs with its bridge's
``open_session`` replaced by one whose session is the private bus itself, as
a host's bridge would hand it over, with the remote identity the test gives
(``ssh`` never runs). What is real is everything kdlabctl does with a
session: the calls (Version, the VMs), the tables, the owners named as the
host names them, the exit codes. The ssh transport end to end is the
bridge's tests (an sshd of the tests' own).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from kdlab.errors import EXIT_OK, EXIT_UNAVAILABLE
from kdlabd import __version__ as version
from tests.bus.test_kdlabctl import user_name
from tests.support import REPO
from tests.support.bus import PrivateBus
from tests.support.clients import assert_no_traceback, run_tool
from tests.support.testdriver import FLEET

pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]

# kdlabctl with a bridge whose session is $FAKE_BRIDGE_BUS for a destination
# other than "down" (which is unreachable, as ssh would say); the caller there
# is $FAKE_BRIDGE_UID, named $FAKE_BRIDGE_USER.
FAKE_BRIDGE = """
import os, sys
from kdlabctl import bridge, cli

class Session:
    bus = os.environ["FAKE_BRIDGE_BUS"]
    remote = bridge.RemoteInfo(
        int(os.environ["FAKE_BRIDGE_UID"]), os.environ["FAKE_BRIDGE_USER"], "", "lab2"
    )
    def close(self): pass

def open_session(argv, where, timeout):
    login = argv[argv.index("--") - 1]
    if login == "down":
        raise bridge.Unreachable("ssh: connect to host down port 22: No route to host")
    return Session()

bridge.open_session = open_session
sys.exit(cli.main(sys.argv[1:]))
"""

HOSTS = """
[hosts.lab]
destination = "alice@lab2"

[hosts.gone]
destination = "down"
"""


def ctl(
    bus: PrivateBus, config: Path, *args: str, uid: int = 4242, user: str = "alice"
) -> CompletedProcess[str]:
    config.mkdir(exist_ok=True)
    (config / "kdlab").mkdir(exist_ok=True)
    (config / "kdlab" / "hosts.toml").write_text(HOSTS)
    result = run_tool(
        [sys.executable, "-c", FAKE_BRIDGE, *args],
        cwd=REPO,
        env={
            "KDLAB_BUS": bus.address,
            "XDG_CONFIG_HOME": str(config),
            "FAKE_BRIDGE_BUS": bus.address,
            "FAKE_BRIDGE_UID": str(uid),
            "FAKE_BRIDGE_USER": user,
        },
    )
    assert_no_traceback(result.stdout + result.stderr)
    return result


def cells(table: str) -> list[list[str]]:
    return [re.split(r" {2,}", line) for line in table.splitlines()]


def test_hosts_asks_each_host_for_its_version_and_vms(
    bus: PrivateBus, tmp_path: Path
) -> None:
    result = ctl(bus, tmp_path, "hosts")
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert cells(result.stdout) == [
        ["NAME", "DESTINATION", "STATE", "VERSION", "VMS"],
        ["lab", "alice@lab2", "reachable", version, str(len(FLEET))],
        ["gone", "down", "ssh: connect to host down port 22: No route to host", "-",
         "-"],
    ]  # fmt: skip
    listed = json.loads(ctl(bus, tmp_path, "hosts", "--json").stdout)
    assert [(h["name"], h["reachable"], h["vms"]) for h in listed] == [
        ("lab", True, len(FLEET)),
        ("gone", False, None),
    ]


def test_list_all_hosts_lists_here_and_there(bus: PrivateBus, tmp_path: Path) -> None:
    """This machine's kdlabd and lab's are the same one here: its VMs come
    twice, lab's with owners as lab names them (alice is uid 1000 there)."""
    result = ctl(bus, tmp_path, "list", "--all-hosts", uid=1000)
    assert result.returncode == EXIT_UNAVAILABLE
    assert result.stderr == (
        "kdlabctl: gone: ssh: connect to host down port 22: No route to host\n"
    )
    rows = cells(result.stdout)
    assert rows[0] == ["HOST", "NAME", "STATE", "MEMORY", "CPUS", "ACCEL", "GDB",
                       "OWNER"]  # fmt: skip
    owners = {vm.name: vm.owner for vm in FLEET}
    names = sorted(owners)
    assert [(row[0], row[1], row[-1]) for row in rows[1:]] == [
        *(("local", name, user_name(owners[name])) for name in names),
        *(("lab", name, "alice" if owners[name] == 1000 else str(owners[name]))
          for name in names),
    ]  # fmt: skip
    listed = json.loads(ctl(bus, tmp_path, "list", "--all-hosts", "--json").stdout)
    assert [(vm["host"], vm["name"]) for vm in listed] == [
        *(("local", name) for name in names),
        *(("lab", name) for name in names),
    ]


def test_a_command_on_a_host_is_the_ssh_users(bus: PrivateBus, tmp_path: Path) -> None:
    """show's owner (uid 0) is root here; on lab, where the caller is alice
    (4242), uid 0 is only a number."""
    here = ctl(bus, tmp_path, "--host", "", "show", "linux-6.9-rc1")
    there = ctl(bus, tmp_path, "show", "linux-6.9-rc1", "--host", "lab")
    assert here.returncode == there.returncode == EXIT_OK, there.stderr
    assert owner_field(here.stdout) == "root (0)"
    assert owner_field(there.stdout) == "0 (0)"
    gone = ctl(bus, tmp_path, "--host", "gone", "list")
    assert gone.returncode == EXIT_UNAVAILABLE
    assert gone.stderr == (
        "kdlabctl: ssh: connect to host down port 22: No route to host\n"
    )


def owner_field(shown: str) -> str:
    (line,) = [line for line in shown.splitlines() if line.startswith("Owner:")]
    return line.removeprefix("Owner:").strip()
