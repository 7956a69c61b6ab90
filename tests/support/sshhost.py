"""A second "host" on this machine: an sshd of the test's own in a network namespace.

Issue 19's remote hosts are reached over ssh. Here the other host is a network
namespace the test makes (``unshare --net``, only ``lo`` in it, brought up),
with an sshd of the test's own listening on 127.0.0.1 inside it: its own
config, its own host key made with ``ssh-keygen``, public keys only
(``UsePAM no``, no passwords), ``StrictModes yes``, a verbose log
(:meth:`SshHost.log`). The users on both sides are the real login users of
tests/support/logins.py: the local one (alice) gets a key pair made by the
test, authorized for the remote one (bob, a member of group kdlab), a
known_hosts file with the test sshd's host key and, through :meth:`SshHost.name`,
``~/.config/kdlab/hosts.toml`` naming the host. Root has the same
(:meth:`SshHost.login` and :meth:`SshHost.name` with ``None`` for a user): its
keys and hosts.toml live in the session's directory, found through
``XDG_CONFIG_HOME`` (:meth:`SshHost.root_env`), never in root's home.

A client reaches the sshd only from inside the namespace: run it through
:attr:`SshHost.within` (``nsenter --net=...``; :meth:`SshHost.run` for a login
user's shell command). Unix sockets (kdlabd's bus) are reached from any
namespace. Outside, the port is held bound (never listening) by the session,
so nothing else listens there and a connection to it is refused.

Use the session fixture ``ssh_host`` (tests/conftest.py)::

    def test_x(ssh_host: SshHost, logins: Logins) -> None:
        login = ssh_host.login(logins.alice, logins.bob)
        done = ssh_host.run(logins.alice, shlex.join(login.ssh_argv("id -un")))

Test sessions may run side by side: each names its directory after its own
process (``/run/kdlabt-ssh-PID-*``). The sshd dies with the process that
started it (``setpriv --pdeathsig KILL``), and the namespace with its last
process; directories of sessions whose process is gone are removed (their
sshd killed first, should it still run) before a new host is made.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import REPO
from tests.support.logins import CLONE, PYTHON, Logins, LoginUser, retry_locked
from tests.support.timeouts import STARTUP_TIMEOUT, STOP_SECONDS

PREFIX = "kdlabt-ssh-"
_DIRECTORY = re.compile(rf"{PREFIX}([0-9]+)-.*")
# sshd's StrictModes accept a root's authorized_keys outside its home only in
# directories nobody else may write: /run, not /tmp.
PARENT = Path("/run")
ADDRESS = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
# sshd's privilege separation directory (systemd's RuntimeDirectory makes it on
# a host that runs sshd).
PRIVSEP = Path("/run/sshd")
# How a login user runs kdlabctl on the host: from the copy of the checkout
# tests/support/logins.py gives each; root, from this checkout.
LOGIN_KDLABCTL = f"cd ~/{CLONE} && exec {PYTHON} -m kdlabctl"
ROOT_KDLABCTL = f"cd {shlex.quote(str(REPO))} && exec {sys.executable} -m kdlabctl"

SSHD_CONFIG = """\
# The tests' own sshd (tests/support/sshhost.py).
ListenAddress {address}:{port}
HostKey {directory}/host_key
PidFile {directory}/sshd.pid
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AuthorizedKeysFile .ssh/authorized_keys
StrictModes yes
LogLevel VERBOSE
X11Forwarding no
AllowAgentForwarding no
AllowTcpForwarding no
PermitTunnel no
PrintMotd no
PrintLastLog no
# Root's authorized keys stay out of root's home.
Match User root
    AuthorizedKeysFile {directory}/root/authorized_keys
"""


@dataclass(frozen=True)
class SshLogin:
    """What a local user holds to log in to the host as a remote user."""

    user: str  # the remote login name
    key: Path
    known_hosts: Path
    port: int

    @property
    def destination(self) -> str:
        """``USER@HOST:PORT``, as hosts.toml spells it."""
        return f"{self.user}@{ADDRESS}:{self.port}"

    @property
    def ssh_options(self) -> tuple[str, ...]:
        """The key and the known hosts (ssh's options, as hosts.toml lists them)."""
        return (
            "-i", str(self.key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "IdentitiesOnly=yes",
        )  # fmt: skip

    def ssh_argv(self, command: str) -> list[str]:
        """Plain ``ssh`` running the shell *command* on the host as the remote
        user (no ssh configuration files of the caller's, no questions)."""
        return [
            "ssh", "-F", "/dev/null", "-T", "-o", "BatchMode=yes",
            "-p", str(self.port), *self.ssh_options,
            f"{self.user}@{ADDRESS}", "--", command,
        ]  # fmt: skip

    def hosts_entry(
        self, name: str, bus: str, kdlabctl: str, more: tuple[str, ...] = ()
    ) -> str:
        """The ``[hosts.NAME]`` table of hosts.toml that reaches the host
        through this login, with ssh's options *more* (TOML's basic strings
        take JSON's escapes)."""
        given = (*self.ssh_options, *more)
        options = ", ".join(_toml_string(option) for option in given)
        return (
            f"[hosts.{name}]\n"
            f"destination = {_toml_string(self.destination)}\n"
            f"ssh_options = [{options}]\n"
            f"kdlabctl = {_toml_string(kdlabctl)}\n"
            f"bus = {_toml_string(bus)}\n"
        )


def _toml_string(text: str) -> str:
    """*text* as a TOML basic string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    assert escaped.isprintable(), f"no control characters in hosts.toml: {text!r}"
    return f'"{escaped}"'


def _own(path: Path, user: LoginUser | None, mode: int) -> None:
    """Give *path* to *user* (root when None) with *mode*."""
    uid, gid = (0, 0) if user is None else (user.uid, user.gid)
    os.chown(path, uid, gid)
    path.chmod(mode)


def _private_dir(path: Path, user: LoginUser | None) -> Path:
    """The directory *path* (and its missing parents under the user's home),
    the user's and no one else's."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _own(path, user, 0o700)
    return path


@dataclass
class SshHost:
    """The test's sshd in its network namespace, and the logins made for it."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    _logins: dict[tuple[str, str], SshLogin] = field(default_factory=dict)
    _hosts: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def within(self) -> list[str]:
        """The command line prefix that runs a program inside the namespace."""
        return ["nsenter", f"--net=/proc/{self.process.pid}/ns/net", "--"]

    @property
    def unused_port(self) -> int:
        """A port on the host's address where nothing listens."""
        return self.port + 1 if self.port < 65535 else self.port - 1

    def log(self) -> str:
        """sshd's log: every connection, key offered and refusal."""
        return (self.directory / "sshd.log").read_text(errors="replace")

    def run(
        self, user: LoginUser, command: str, *, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """The shell *command* in a login shell of *user*, inside the namespace."""
        return Logins.run(user, command, timeout=timeout, within=self.within)

    def login(self, local: LoginUser | None, remote: LoginUser | None) -> SshLogin:
        """A key pair of *local*'s (root when None) authorized for *remote*
        (root when None) on the host, and a known_hosts file with the host's
        key; made once per pair."""
        pair = (_name(local), _name(remote))
        if pair in self._logins:
            return self._logins[pair]
        if remote is not None:
            _unlock(remote)
        home = self.directory / "root" if local is None else local.home / ".ssh"
        keys = _private_dir(home, local)
        key = keys / f"id_kdlabt_{pair[1]}"
        _keygen(key, f"{pair[0]} to {pair[1]} (kdlab tests)")
        for path in (key, key.with_suffix(".pub")):
            _own(path, local, 0o600)
        known_hosts = keys / "kdlabt_known_hosts"
        host_key = (self.directory / "host_key.pub").read_text()
        known_hosts.write_text(f"[{ADDRESS}]:{self.port} {host_key}")
        _own(known_hosts, local, 0o600)
        self._authorize(remote, key.with_suffix(".pub").read_text())
        self._logins[pair] = SshLogin(pair[1], key, known_hosts, self.port)
        return self._logins[pair]

    def _authorize(self, remote: LoginUser | None, public_key: str) -> None:
        """Add *public_key* to *remote*'s authorized keys (root's: the
        session's, as the sshd's config says)."""
        if remote is None:
            ssh = _private_dir(self.directory / "root", None)
        else:
            ssh = _private_dir(remote.home / ".ssh", remote)
        authorized = ssh / "authorized_keys"
        with authorized.open("a") as keys:
            keys.write(public_key)
        _own(authorized, remote, 0o600)

    def name(
        self,
        local: LoginUser | None,
        name: str,
        login: SshLogin,
        bus: str,
        *,
        kdlabctl: str | None = None,
        ssh_options: tuple[str, ...] = (),
    ) -> Path:
        """Name the host *name* in *local*'s hosts.toml (root's, when None, in
        :meth:`root_env`'s config directory), reached through *login*, its
        kdlabd on *bus*, kdlabctl there run by the shell command *kdlabctl*
        (by default the remote user's own: :data:`LOGIN_KDLABCTL`, or root's,
        :data:`ROOT_KDLABCTL`), with ssh's options *ssh_options* added.
        Returns the file."""
        if kdlabctl is None:
            kdlabctl = ROOT_KDLABCTL if login.user == "root" else LOGIN_KDLABCTL
        hosts = self._hosts.setdefault(_name(local), {})
        hosts[name] = login.hosts_entry(name, bus, kdlabctl, ssh_options)
        return self._write_hosts(local)

    def forget(self, local: LoginUser | None, name: str) -> Path:
        """Take the host *name* out of *local*'s hosts.toml again."""
        del self._hosts[_name(local)][name]
        return self._write_hosts(local)

    def _write_hosts(self, local: LoginUser | None) -> Path:
        config = (
            self.directory / "root-config" if local is None else local.home / ".config"
        )
        path = _private_dir(config / "kdlab", local) / "hosts.toml"
        if local is not None:
            _own(config, local, 0o700)
        path.write_text("\n".join(self._hosts[_name(local)].values()))
        _own(path, local, 0o600)
        return path

    def root_env(self) -> dict[str, str]:
        """The environment that gives root's kdlabctl the hosts.toml of
        :meth:`name` ``(None, ...)``."""
        return {"XDG_CONFIG_HOME": str(self.directory / "root-config")}


def _name(user: LoginUser | None) -> str:
    return "root" if user is None else user.name


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _unlock(user: LoginUser) -> None:
    """Give *user* the password ``*`` (no password logs in) instead of
    useradd's ``!``: without PAM, sshd refuses a locked account even a key."""
    result = retry_locked(["usermod", "--password", "*", user.name])
    assert result.returncode == 0, f"usermod {user.name}: {result.stderr}"


def remove_orphans() -> None:
    """Remove the directories of sessions whose process is gone, killing their
    sshd first should it still run."""
    for entry in PARENT.glob(f"{PREFIX}*"):
        match = _DIRECTORY.fullmatch(entry.name)
        if match is None or Path(f"/proc/{match[1]}").exists():
            continue
        with contextlib.suppress(OSError, ValueError):
            pid = int((entry / "sshd.pid").read_text())
            if str(entry).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(entry, ignore_errors=True)


def missing() -> str:
    """What the host needs and this machine lacks ("" when nothing)."""
    for tool, package in (
        (SSHD, "openssh-server"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("setpriv", "util-linux"),
        ("ip", "iproute2"),
        ("usermod", "passwd"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} (apt-get install {package})"
    return ""


def _wait_listening(host: SshHost) -> None:
    """Until the sshd listens, or fail with its log."""
    listening = f"Server listening on {ADDRESS} port {host.port}."
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while listening not in host.log():
        if host.process.poll() is not None:
            raise RuntimeError(f"sshd exited {host.process.returncode}:\n{host.log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd does not listen:\n{host.log()}")
        time.sleep(0.05)  # sshd tells no one but its log


@contextlib.contextmanager
def ssh_host() -> Iterator[SshHost]:
    """The second host: sshd in a network namespace of its own, stopped and
    removed afterwards."""
    remove_orphans()
    PRIVSEP.mkdir(mode=0o755, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=PARENT))
    # Held bound outside the namespace for the session: nothing out there
    # listens on the port the host's sshd listens on inside it.
    outside = socket.socket()
    try:
        outside.bind((ADDRESS, 0))
        port = int(outside.getsockname()[1])
        _keygen(directory / "host_key", "kdlab tests' sshd")
        config = directory / "sshd_config"
        config.write_text(
            SSHD_CONFIG.format(address=ADDRESS, port=port, directory=directory)
        )
        log = directory / "sshd.log"
        with log.open("ab") as output:
            process = subprocess.Popen(
                ["unshare", "--net", "--", "setpriv", "--pdeathsig", "KILL", "--",
                 "sh", "-c", 'ip link set lo up && exec "$0" -D -f "$1" -E "$2"',
                 SSHD, str(config), str(log)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
            )  # fmt: skip
        host = SshHost(directory, port, process)
        try:
            _wait_listening(host)
            yield host
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        outside.close()
        shutil.rmtree(directory, ignore_errors=True)
