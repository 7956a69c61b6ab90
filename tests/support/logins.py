"""Real login users, for tests where permissions matter.

A client that runs with ``setpriv`` keeps root's environment, root's current
directory and root's Python; a person does not. Here each user is a real
account made with ``useradd``: a 0700 home holding a copy of this checkout
(``~/kdlab``, every file ``git ls-files`` lists, uncommitted changes
included, owned by the user), and commands run through a login shell
(``runuser -l``) with Debian's ``/usr/bin/python3`` (which needs
``python3-dbus-next``; root's first ``python3`` may be a build other users
cannot run).

The users, by role:

- ``alice`` and ``bob``: members of group ``kdlab`` (may manage and debug
  their own VMs);
- ``eve``: not a member (may only look).

Use the session fixture ``logins`` (tests/conftest.py)::

    def test_x(logins: Logins, bus: PrivateBus) -> None:
        result = logins.kdlabctl(logins.eve, bus.address, "list")
        assert result.returncode == 0, result.stderr

Test sessions may run side by side on one machine: each names its accounts
after its own process (``kdlabt-alice-PID``). Accounts of a session whose
process is gone (a killed run) are removed before new ones are made; the
fixture removes its own at the end of the session.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO

PREFIX = "kdlabt-"
_NAME = re.compile(rf"{PREFIX}([a-z]+)-([0-9]+)")
GROUP = "kdlab"
PYTHON = "/usr/bin/python3"
CLONE = "kdlab"
# Short name -> member of group kdlab.
ROLES = {"alice": True, "bob": True, "eve": False}
# Ids of their own: not 1000 (tests.support.testdriver.FLEET's "somebody else"),
# nor those of the host's people.
KEYS = ("--key", "UID_MIN=20000", "--key", "GID_MIN=20000")
_LOCK_RETRIES = 50  # useradd and userdel fail while another one holds /etc/passwd


@dataclass(frozen=True)
class LoginUser:
    """A real account: its login name, ids and home."""

    name: str
    uid: int
    gid: int
    home: Path
    member: bool

    @property
    def clone(self) -> Path:
        """The user's own copy of the checkout."""
        return self.home / CLONE


class Logins:
    """The accounts of :data:`ROLES`, and a way to run commands as each."""

    def __init__(self, users: dict[str, LoginUser]) -> None:
        self.users = users

    @property
    def alice(self) -> LoginUser:
        return self.users["alice"]

    @property
    def bob(self) -> LoginUser:
        return self.users["bob"]

    @property
    def eve(self) -> LoginUser:
        return self.users["eve"]

    @staticmethod
    def run(
        user: LoginUser,
        command: str,
        *,
        timeout: float = 60.0,
        input_text: str | None = None,
        within: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run the shell *command* in a login shell of *user*; never raises.
        *within* runs it through a command line of its own (``nsenter ...``)."""
        return subprocess.run(
            login_argv(user, command, within),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            env=LOGIN_ENV,
            cwd="/",
            check=False,
        )

    def kdlabctl(
        self,
        user: LoginUser,
        bus: str,
        *args: str,
        timeout: float = 60.0,
        input_text: str | None = None,
        within: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """``kdlabctl ARGS`` on the bus *bus*, run by *user* from ``~/kdlab``
        (through *within*, as :meth:`run`)."""
        command = kdlabctl_command(bus, *args)
        return self.run(
            user, command, timeout=timeout, input_text=input_text, within=within
        )


LOGIN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def login_argv(user: LoginUser, command: str, within: Sequence[str] = ()) -> list[str]:
    """The command line that runs the shell *command* in a login shell of *user*
    (for a process the test keeps running: start it with env=LOGIN_ENV), through
    the command line *within* when given (``nsenter --net=...``)."""
    return [*within, "runuser", "--login", user.name, "--command", command]


def kill(process: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    """Kill a process started with :func:`login_argv` and everything it started.

    runuser runs the command in a session of its own, out of reach of the
    caller's ``killpg``; killing runuser alone leaves the command running.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [process.pid], [process.pid]
    while todo:
        found = children.get(todo.pop(), [])
        tree += found
        todo += found
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)


def kdlabctl_command(bus: str, *args: str, source: str = "") -> str:
    """The shell command of ``kdlabctl ARGS`` on *bus*, run from ``~/kdlab``;
    *source*, a shell command, feeds its input (``cat /dev/zero``)."""
    run = f"{source} | " if source else "exec "
    return (
        f"cd ~/{CLONE} && export KDLAB_BUS={shlex.quote(bus)} && "
        f"{run}{PYTHON} -m kdlabctl {shlex.join(args)}"
    )


def retry_locked(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a shadow-utils command, again while another one holds the lock."""
    for _ in range(_LOCK_RETRIES):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if "lock" not in result.stderr:
            return result
        time.sleep(0.1)
    return result


def remove_user(name: str) -> None:
    """Delete the account *name* and its home, if it exists."""
    with contextlib.suppress(KeyError):
        home = pwd.getpwnam(name).pw_dir
        result = retry_locked(["userdel", "--remove", "--force", name])
        # userdel exits 12 when only the (absent) mail spool could not go.
        assert result.returncode in (0, 12), result.stderr
        shutil.rmtree(home, ignore_errors=True)


def remove_orphans() -> None:
    """Remove the accounts of sessions whose process is gone (killed runs)."""
    for entry in pwd.getpwall():
        match = _NAME.fullmatch(entry.pw_name)
        if match is not None and not Path(f"/proc/{match[2]}").exists():
            remove_user(entry.pw_name)


def checkout_files() -> list[str]:
    """The files of this checkout, as ``git ls-files`` lists them (not ignored)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
         "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    return sorted({name for name in listed.decode().split("\0") if name})


def copy_checkout_to(clone: Path) -> None:
    """Copy this checkout into the directory *clone* (made if missing)."""
    for name in checkout_files():
        source = REPO / name
        if not source.is_file():
            continue  # deleted but not yet committed
        target = clone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def copy_checkout(user: LoginUser) -> None:
    """Copy this checkout into the user's home, owned by the user."""
    copy_checkout_to(user.clone)
    for top, dirs, files in os.walk(user.clone):
        for entry in (top, *(os.path.join(top, name) for name in dirs + files)):
            os.lchown(entry, user.uid, user.gid)


def create_user(role: str, member: bool) -> LoginUser:
    name = f"{PREFIX}{role}-{os.getpid()}"
    groups = ["--groups", GROUP] if member else []
    result = retry_locked(
        ["useradd", "--create-home", "--user-group", "--shell", "/bin/bash",
         "--comment", "kdlab test user", *KEYS, *groups, name]
    )  # fmt: skip
    assert result.returncode == 0, f"useradd {name}: {result.stderr}"
    entry = pwd.getpwnam(name)
    user = LoginUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), member)
    user.home.chmod(0o700)
    copy_checkout(user)
    return user


def missing() -> str:
    """What the accounts need and this host lacks ("" when nothing)."""
    for tool, package in (
        ("useradd", "passwd"),
        ("userdel", "passwd"),
        ("runuser", "util-linux"),
        ("git", "git"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} (apt-get install {package})"
    probe = subprocess.run(
        [PYTHON, "-c", "import dbus_next"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"dbus-next for {PYTHON} (apt-get install python3-dbus-next)"
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        return f"group {GROUP} (.ci/setup installs it)"
    return ""


@contextlib.contextmanager
def accounts() -> Iterator[Logins]:
    """The accounts of :data:`ROLES`, removed afterwards."""
    remove_orphans()
    users: dict[str, LoginUser] = {}
    try:
        for role, member in ROLES.items():
            users[role] = create_user(role, member)
        yield Logins(users)
    finally:
        for user in users.values():
            remove_user(user.name)
