"""The login users of tests/support/logins.py are what the tests that use them assume.

Each runs in a login of its own (not root's environment, directory or
Python), from its own copy of the checkout, and kdlabd sees its groups.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from kdlab.errors import NotAuthorized, exit_code_for
from tests.support import logins as accounts
from tests.support.bus import PrivateBus
from tests.support.logins import GROUP, PYTHON, Logins, LoginUser
from tests.support.testdriver import Lab

pytestmark = pytest.mark.bus

PROBE = (
    'printf "%s\\n" "$(id -u)" "$(id -Gn)" "$HOME" "$PWD" "$(command -v python3)"; '
    f"cd ~/kdlab && {PYTHON} -c 'import kdlabctl, sys; "
    "print(kdlabctl.__file__); print(sys.executable)'"
)


@pytest.mark.parametrize("role", ["alice", "bob", "eve"])
def test_a_login_is_the_users_own(logins: Logins, role: str) -> None:
    user: LoginUser = logins.users[role]
    result = logins.run(user, PROBE)
    assert result.returncode == 0, result.stderr
    uid, groups, home, cwd, _python3, package, python = result.stdout.splitlines()
    assert int(uid) == user.uid != 0
    assert (GROUP in groups.split()) is user.member
    assert home == cwd == str(user.home), "a login shell starts at home"
    assert package == str(user.clone / "kdlabctl" / "__init__.py")
    assert python == PYTHON
    info = os.stat(user.home)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (user.uid, 0o700)
    assert os.stat(user.clone / "kdlabctl" / "cli.py").st_uid == user.uid


def test_the_users_are_distinct_and_not_fleet_owners(logins: Logins) -> None:
    uids = {user.uid for user in logins.users.values()}
    assert len(uids) == 3
    assert not uids & {0, 1000, 65534}, "testdriver.FLEET's owners stay strangers"


def test_kdlabd_sees_who_is_in_group_kdlab(
    logins: Logins, bus: PrivateBus, kdlabd: Lab
) -> None:
    """Through the bus: anyone may list; kdlabd knows who is a member."""
    del kdlabd  # it must run
    for user in logins.users.values():
        listed = logins.kdlabctl(user, bus.address, "list")
        assert listed.returncode == 0, listed.stderr
        assert "busy" in listed.stdout
        # "busy" is uid 1000's: a member is refused as not its owner, the
        # others as not in group kdlab.
        proxy = logins.kdlabctl(user, bus.address, "gdb-proxy", "busy")
        assert proxy.returncode == exit_code_for(NotAuthorized.dbus_name())
        why = "belongs to uid 1000" if user.member else f"group {GROUP!r}"
        assert why in proxy.stderr, (user.name, proxy.stderr)


def test_accounts_of_a_killed_session_are_removed(logins: Logins) -> None:
    """What a killed run left goes; the accounts of live sessions stay."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = f"{accounts.PREFIX}orphan-{gone.pid}"
    made = subprocess.run(
        ["useradd", "--create-home", *accounts.KEYS, orphan],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    try:
        accounts.remove_orphans()
        assert orphan not in {entry.pw_name for entry in pwd.getpwall()}
        assert not Path("/home", orphan).exists()
        for user in logins.users.values():
            assert pwd.getpwnam(user.name).pw_uid == user.uid
    finally:
        accounts.remove_user(orphan)
