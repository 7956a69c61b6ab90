"""Remote hosts, kdlabctl's side: hosts.toml, ``--host``, the ssh command line,
the caller's identity on a host, ``kdlabctl hosts`` and ``list --all-hosts``.

The transport (kdlabctl.bridge: ssh, the relay) is not here: its
``open_session`` is replaced by :class:`Bridge`, which records the ssh
command line it was given and hands out sessions on a bus address of its
own. The real thing, through an sshd of the tests', is the bridge's tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kdlab.errors import EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from kdlab.states import VMState
from kdlabctl import bridge, caller, cli, hosts, output
from kdlabctl.bridge import RemoteInfo
from kdlabctl.hosts import Host, parse_destination, ssh_argv
from kdlabctl.records import VM
from tests.unit.test_notify import vm

ALICE = RemoteInfo(uid=4242, user="alice", version="0.1.0", hostname="lab2")


@dataclass
class Session:
    bus: str
    remote: RemoteInfo
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class Bridge:
    """kdlabctl.bridge.open_session's stand-in: a session per call, on
    ``unix:path=/bridge/HOSTNAME``; a destination in *down* is Unreachable."""

    down: set[str] = field(default_factory=set)
    argvs: list[list[str]] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)

    def open_session(self, argv: list[str], where: str, timeout: float) -> Session:
        assert timeout > 0
        assert where
        self.argvs.append(list(argv))
        login = argv[argv.index("--") - 1]
        if login in self.down:
            raise bridge.Unreachable(f"ssh: connect to host {login}: refused")
        session = Session(f"unix:path=/bridge/{login}", ALICE)
        self.sessions.append(session)
        return session


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """hosts.toml's path, in a $XDG_CONFIG_HOME of the test's; no $KDLAB_*."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for name in ("KDLAB_HOST", "KDLAB_BUS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "kdlab").mkdir()
    return tmp_path / "kdlab" / "hosts.toml"


@pytest.fixture
def ssh(monkeypatch: pytest.MonkeyPatch) -> Bridge:
    fake = Bridge()
    monkeypatch.setattr(bridge, "open_session", fake.open_session)
    return fake


LAB = """
[hosts.lab]
destination = "alice@lab2.example.org:2222"
ssh_options = ["-i", "~/.ssh/id_lab", "-o", "UserKnownHostsFile=~/.ssh/lab_known"]
kdlabctl = "/opt/kdlab/bin/kdlabctl"
bus = "unix:path=/run/kdlab bus"

[hosts.v6]
destination = "[fe80::1%eth0]:22"
"""


# --- destinations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("lab", ("", "lab", None)),
        ("alice@lab2.example.org", ("alice", "lab2.example.org", None)),
        ("alice@lab2.example.org:2222", ("alice", "lab2.example.org", 2222)),
        ("10.0.0.2:22", ("", "10.0.0.2", 22)),
        ("[::1]:2222", ("", "::1", 2222)),
        ("root@[fe80::1%eth0]", ("root", "fe80::1%eth0", None)),
        ("bob@::1", ("bob", "::1", None)),  # a bare IPv6 address has no port
        ("my_alias", ("", "my_alias", None)),  # a Host of ~/.ssh/config
    ],
)
def test_a_destination_is_user_host_and_port(
    text: str, parsed: tuple[str, str, int | None]
) -> None:
    assert parse_destination(text) == parsed


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "is empty"),
        ("-oProxyCommand=touch /tmp/x", "starts with '-'"),
        ("-p2222", "starts with '-'"),
        ("alice@-oProxyCommand=x", "host name with '-'"),
        ("@lab", "needs one user name"),
        ("a@b@lab", "needs one user name"),
        ("alice@", "has no host name"),
        (":22", "has no host name"),
        ("lab:0", "not a number from 1 to 65535"),
        ("lab:65536", "not a number from 1 to 65535"),
        ("lab:ssh", "not a number"),
        ("lab:", "not a number"),
        ("[::1", "[IPV6-ADDRESS]"),
        ("[::1]2222", "[IPV6-ADDRESS]"),
        ("[lab]:22", "not an IPv6 address"),
        ("fe80::1:2222x", "[ADDRESS]:PORT"),
        ("lab 2", "a space"),
        ("lab\n", "a space"),
        ("lab/x", "'/'"),
    ],
)
def test_a_bad_destination_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=r".") as raised:
        parse_destination(text)
    assert why in str(raised.value)


def test_a_destination_is_written_back_as_given() -> None:
    assert Host("x", "alice", "::1", 2222).destination == "alice@[::1]:2222"
    assert Host("x", "", "::1").destination == "::1"
    assert Host("x", "", "lab", 22).destination == "lab:22"


# --- the ssh command line ----------------------------------------------------------


def test_the_ssh_command_runs_the_bridge_of_the_hosts_kdlabctl(config: Path) -> None:
    config.write_text(LAB)
    lab = hosts.resolve("lab")
    shared = hosts._shared_connection()
    assert ssh_argv(lab, "system") == [
        "ssh",
        "-i", "~/.ssh/id_lab", "-o", "UserKnownHostsFile=~/.ssh/lab_known",
        *hosts.SSH_OPTIONS,
        *shared,
        "-p", "2222",
        "alice@lab2.example.org",
        "--", "/opt/kdlab/bin/kdlabctl --bus system __bridge",
    ]  # fmt: skip
    # The bus is one word of the remote shell's, whatever it holds.
    assert ssh_argv(lab, "unix:path=/run/kdlab bus")[-1] == (
        "/opt/kdlab/bin/kdlabctl --bus 'unix:path=/run/kdlab bus' __bridge"
    )
    # ssh takes an IPv6 address bare, with the port apart.
    v6 = ssh_argv(hosts.resolve("v6"), "system")
    assert v6[v6.index("--") - 1] == "fe80::1%eth0"
    assert v6[v6.index("-p") + 1] == "22"


def test_a_destination_not_in_hosts_toml_gets_the_defaults(config: Path) -> None:
    config.write_text(LAB)
    assert ssh_argv(hosts.resolve("bob@box"), "system") == [
        "ssh", *hosts.SSH_OPTIONS,
        *hosts._shared_connection(),
        "bob@box", "--", "kdlabctl --bus system __bridge",
    ]  # fmt: skip


def test_one_ssh_connection_per_host_is_shared_from_a_private_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A short directory, as XDG_RUNTIME_DIR is (pytest's tmp_path is too long).
    tmp_path = Path(tempfile.mkdtemp(prefix="kdlab-t-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert hosts._shared_connection() == [
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={tmp_path}/kdlab-ssh/%C",
        "-o", "ControlPersist=60",
    ]  # fmt: skip
    assert stat.S_IMODE((tmp_path / "kdlab-ssh").stat().st_mode) == 0o700
    # A directory others may enter is not used: they could take the socket.
    (tmp_path / "kdlab-ssh").chmod(0o755)
    assert hosts._shared_connection() == []
    # Nor one whose socket paths would be longer than a socket's path may be.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / ("x" * 80)))
    (tmp_path / ("x" * 80)).mkdir()
    assert hosts._shared_connection() == []
    # Nor a symbolic link to a directory of the right owner and mode.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "link"))
    (tmp_path / "link").mkdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "link" / "kdlab-ssh").symlink_to(tmp_path / "elsewhere")
    assert hosts._shared_connection() == []
    shutil.rmtree(tmp_path)


def test_a_name_of_hosts_toml_comes_before_a_destination(config: Path) -> None:
    config.write_text('[hosts.box]\ndestination = "carol@box.example.org"\n')
    assert hosts.resolve("box").login == "carol@box.example.org"
    assert hosts.resolve("box2").login == "box2"  # not a name: a destination


def test_without_hosts_toml_there_are_only_destinations(config: Path) -> None:
    assert not config.exists()
    assert hosts.load() == {}
    assert hosts.resolve("lab").login == "lab"


def test_hosts_toml_is_in_xdg_config_home_or_in_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert hosts.config_path() == tmp_path / "kdlab" / "hosts.toml"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for relative_or_unset in ("relative/dir", ""):
        monkeypatch.setenv("XDG_CONFIG_HOME", relative_or_unset)
        assert hosts.config_path() == tmp_path / "home/.config/kdlab/hosts.toml"


# --- hosts.toml's errors: exit 2, the file and the key named ----------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[hosts.lab\n", "is not valid TOML: Expected ']'"),
        ("hosts = 1\n", "hosts must be [hosts.NAME] tables"),
        ('[host.lab]\ndestination = "x"\n', "unknown key 'host'"),
        ("[hosts]\nlab = 1\n", "hosts.lab must be a table"),
        ("[hosts.lab]\n", "hosts.lab.destination is missing"),
        ("[hosts.lab]\ndestination = 2\n", "hosts.lab.destination must be a string"),
        ('[hosts.lab]\ndestination = "-oProxyCommand=x"\n', "hosts.lab.destination"),
        (
            '[hosts.lab]\ndestination = "x"\nport = 22\n',
            "hosts.lab: unknown key 'port'",
        ),
        (
            '[hosts.lab]\ndestination = "x"\nssh_options = "-v"\n',
            "hosts.lab.ssh_options must be a list of strings",
        ),
        (
            '[hosts.lab]\ndestination = "x"\nssh_options = [1]\n',
            "hosts.lab.ssh_options must be a list of strings",
        ),
        ('[hosts.lab]\ndestination = "x"\nkdlabctl = ""\n', "hosts.lab.kdlabctl"),
        ('[hosts.lab]\ndestination = "x"\nbus = []\n', "hosts.lab.bus"),
        ('[hosts."-lab"]\ndestination = "x"\n', "hosts.-lab: a host's name is"),
        ('[hosts.local]\ndestination = "x"\n', "'local' is this machine"),
    ],
)
def test_a_bad_hosts_toml_is_a_usage_error_naming_file_and_key(
    config: Path,
    ssh: Bridge,
    capsys: pytest.CaptureFixture[str],
    text: str,
    said: str,
) -> None:
    config.write_text(text)
    assert cli.main(["--host", "lab", "list"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"kdlabctl: {config}"), err
    assert said in err
    assert "Traceback" not in err
    assert ssh.argvs == []


def test_an_unreadable_hosts_toml_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.mkdir()  # a directory: open() fails as a permission would
    assert cli.main(["hosts"]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith(f"kdlabctl: cannot read {config}: ")


def test_a_bad_host_spec_is_a_usage_error_before_ssh(
    config: Path, ssh: Bridge, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--host=-oProxyCommand=touch /tmp/x", "list"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "starts with '-' (ssh would read it as an option)" in err
    assert f"give a host of {config} or [USER@]HOST[:PORT]" in err
    assert ssh.argvs == []


# --- --host on the command line ----------------------------------------------------


@dataclass
class Ran:
    """What a command saw when it ran (cli._run_here replaced)."""

    command: str
    bus: str
    remote: RemoteInfo | None


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[Ran]:
    seen: list[Ran] = []

    def run_here(args: argparse.Namespace) -> int:
        seen.append(Ran(args.command, args.bus, caller.remote()))
        return EXIT_OK

    monkeypatch.setattr(cli, "_run_here", run_here)
    return seen


@pytest.mark.parametrize(
    "argv",
    [
        ["--host", "lab", "up", "tree"],
        ["up", "tree", "--host", "lab"],
        ["up", "--host=lab", "tree"],
        ["image", "list", "--host", "lab"],
        ["image", "--host", "lab", "list"],
        ["--host", "elsewhere", "gdb", "vm", "--host", "lab", "--batch"],  # last wins
        ["attach", "vm", "--host", "lab", "--", "-ex", "bt"],
        ["web", "--host", "lab"],  # no call of its own, but its page's
    ],
)
def test_host_goes_before_or_after_the_command(
    config: Path, ssh: Bridge, ran: list[Ran], argv: list[str]
) -> None:
    config.write_text(LAB)
    assert cli.main(argv) == EXIT_OK
    assert ssh.argvs[0][ssh.argvs[0].index("--") - 1] == "alice@lab2.example.org"
    # The command runs here, on the host's bus through the session; the
    # caller is the ssh user there; the session is closed after it.
    assert [(r.bus, r.remote) for r in ran] == [
        ("unix:path=/bridge/alice@lab2.example.org", ALICE)
    ]
    assert [s.closed for s in ssh.sessions] == [True]
    assert caller.remote() is None


def test_kdlab_host_is_the_default_and_an_empty_host_is_this_machine(
    config: Path, ssh: Bridge, ran: list[Ran], monkeypatch: pytest.MonkeyPatch
) -> None:
    config.write_text(LAB)
    monkeypatch.setenv("KDLAB_HOST", "lab")
    monkeypatch.setenv("KDLAB_BUS", "unix:path=/here")
    assert cli.main(["list"]) == EXIT_OK
    # $KDLAB_BUS is this machine's: the host's bus is hosts.toml's.
    assert "--bus 'unix:path=/run/kdlab bus' __bridge" in ssh.argvs[-1][-1]
    assert cli.main(["--bus", "session", "list"]) == EXIT_OK
    assert ssh.argvs[-1][-1].endswith("--bus session __bridge")
    assert cli.main(["--host", "", "list"]) == EXIT_OK
    assert cli.main(["list", "--host="]) == EXIT_OK
    assert len(ssh.argvs) == 2
    assert ran[-2:] == [Ran("list", "unix:path=/here", None)] * 2
    monkeypatch.setenv("KDLAB_HOST", "")
    monkeypatch.delenv("KDLAB_BUS")
    assert cli.main(["list"]) == EXIT_OK
    assert ran[-1] == Ran("list", "system", None)


@pytest.mark.usefixtures("config")
def test_an_unreachable_host_is_exit_69_with_sshs_error(
    ssh: Bridge, ran: list[Ran], capsys: pytest.CaptureFixture[str]
) -> None:
    ssh.down.add("nowhere")
    assert cli.main(["--host", "nowhere", "list"]) == EXIT_UNAVAILABLE
    assert capsys.readouterr().err == (
        "kdlabctl: ssh: connect to host nowhere: refused\n"
    )
    assert ran == []


@pytest.mark.usefixtures("config")
def test_the_session_is_closed_when_the_command_fails(
    ssh: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run_here(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_here", run_here)
    assert cli.main(["--host", "lab", "list"]) == 130
    assert [s.closed for s in ssh.sessions] == [True]
    assert caller.remote() is None


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--host", "lab", "kernel", "check", "."], "kdlabctl kernel: it runs on"),
        (["kernel", "check", ".", "--host", "lab"], "kdlabctl kernel: it runs on"),
        (["completion", "bash", "--host", "lab"], "kdlabctl completion: it runs"),
        (["--host", "lab", "hosts"], "kdlabctl hosts: it asks every host"),
        (["list", "--all-hosts", "--host", "lab"], "--all-hosts and --host exclude"),
    ],
)
@pytest.mark.usefixtures("config")
def test_host_on_a_command_that_runs_here_is_a_usage_error(
    ssh: Bridge,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    said: str,
) -> None:
    assert cli.main(argv) == EXIT_USAGE
    assert said in capsys.readouterr().err
    assert ssh.argvs == []


@pytest.mark.usefixtures("config")
def test_kdlab_host_does_not_apply_to_commands_that_run_here(
    ssh: Bridge,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KDLAB_HOST", "lab")
    assert cli.main(["completion", "bash"]) == EXIT_OK
    assert "complete -F _kdlabctl kdlabctl" in capsys.readouterr().out
    assert ssh.argvs == []


def test_shares_do_not_cross_hosts(
    config: Path, ssh: Bridge, ran: list[Ran], capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text(LAB)
    for argv in (
        ["--host", "lab", "create", "vm", "--kernel", "k", "--share", "/srv"],
        ["up", "tree", "--share", "/srv", "--host", "lab"],
    ):
        assert cli.main(argv) == EXIT_USAGE
        assert capsys.readouterr().err == (
            "kdlabctl: --share: shares cannot be served across hosts (virtiofsd "
            "takes descriptors over its socket, which do not cross ssh): run "
            "kdlabctl on lab2.example.org itself\n"
        )
    assert ssh.argvs == []
    assert ran == []


class Client:
    """The calls of kdlabctl.client.Client that start_vm and warm_index make."""

    def __init__(self, found: VM) -> None:
        self.found = found
        self.started = False

    async def vm(self, _name: str) -> VM:
        return self.found

    async def start(self, _name: str, **_options: Any) -> None:
        self.started = True


def test_starting_a_vm_with_shares_on_a_host_is_refused() -> None:
    client = Client(vm(state=VMState.STOPPED, shares=(("src", "/srv"),)))
    with caller.on_host(ALICE), pytest.raises(cli.UsageError) as refused:
        asyncio.run(cli.start_vm(client, "linux", paused=False))  # type: ignore[arg-type]
    assert str(refused.value) == (
        "VM linux has shares: shares cannot be served across hosts (virtiofsd "
        "takes descriptors over its socket, which do not cross ssh): run kdlabctl "
        "on lab2 itself"
    )
    assert not client.started


# --- the caller on a host ------------------------------------------------------------


def test_owners_on_a_host_are_named_by_the_host() -> None:
    local = pwd.getpwuid(os.getuid()).pw_name
    assert output.user_name(os.getuid()) == local
    with caller.on_host(ALICE):
        assert caller.uid() == 4242
        assert output.user_name(4242) == "alice"
        # Another uid there: this machine's passwd would name someone else.
        assert output.user_name(os.getuid()) == str(os.getuid())
        assert output.user_name(0) == "0"
    assert caller.uid() == os.getuid()
    assert output.user_name(0) == pwd.getpwuid(0).pw_name


def test_the_vms_recorded_vmlinux_is_its_owners_on_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """warm_index (create's) reads the paths recorded with a VM only for its
    owner: on a host, the ssh user's uid there is the one compared."""
    from kdlabctl import gdbcache

    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF")
    warmed: list[Path] = []
    monkeypatch.setattr(gdbcache, "warm", warmed.append)
    theirs = Client(vm(owner=4242, vmlinux=str(vmlinux), kernel_release="0-none"))
    asyncio.run(cli.warm_index(theirs, "linux"))  # type: ignore[arg-type]
    assert warmed == []  # here, uid 4242 is someone else
    with caller.on_host(ALICE):
        asyncio.run(cli.warm_index(theirs, "linux"))  # type: ignore[arg-type]
    assert warmed == [vmlinux]


# --- kdlabctl hosts, list --all-hosts ----------------------------------------------


def canned(answers: dict[str, Any]) -> Callable[[str, Any], Any]:
    """hosts._call's stand-in: what kdlabd on each bus answers (an exception
    is raised)."""

    def call(bus: str, _work: Any) -> Any:
        answer = answers[bus]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return call


def cells(table: str) -> list[list[str]]:
    """A table's rows as cells (columns are two spaces apart at least)."""
    return [re.split(r" {2,}", line) for line in table.splitlines()]


@pytest.fixture
def three(config: Path, ssh: Bridge) -> Bridge:
    """Hosts lab, v6 (unreachable) and box."""
    config.write_text(LAB + '\n[hosts.box]\ndestination = "box"\n')
    ssh.down.add("fe80::1%eth0")
    return ssh


def test_hosts_lists_every_host_and_exits_69_when_one_is_down(
    three: Bridge,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kdlabctl.client import RemoteError

    monkeypatch.setattr(
        hosts,
        "_call",
        canned(
            {
                "unix:path=/bridge/alice@lab2.example.org": ("0.1.0", 3),
                "unix:path=/bridge/box": RemoteError(
                    "org.freedesktop.DBus.Error.ServiceUnknown",
                    "The name org.kdlab.Kdlab1 was not provided\nby any .service files",
                ),
            }
        ),
    )
    assert cli.main(["hosts"]) == EXIT_UNAVAILABLE
    assert cells(capsys.readouterr().out) == [
        ["NAME", "DESTINATION", "STATE", "VERSION", "VMS"],
        ["lab", "alice@lab2.example.org:2222", "reachable", "0.1.0", "3"],
        ["v6", "[fe80::1%eth0]:22", "ssh: connect to host fe80::1%eth0: refused",
         "-", "-"],
        ["box", "box", "The name org.kdlab.Kdlab1 was not provided by any .service "
         "files", "-", "-"],
    ]  # fmt: skip
    assert all(session.closed for session in three.sessions)
    assert cli.main(["hosts", "--json"]) == EXIT_UNAVAILABLE

    first, second, _ = json.loads(capsys.readouterr().out)
    assert first == {
        "name": "lab",
        "destination": "alice@lab2.example.org:2222",
        "reachable": True,
        "error": "",
        "version": "0.1.0",
        "vms": 3,
        "user": "alice",
    }
    assert second["reachable"] is False
    assert second["vms"] is None
    three.down.clear()
    monkeypatch.setattr(hosts, "_call", canned({}.fromkeys(
        ["unix:path=/bridge/alice@lab2.example.org", "unix:path=/bridge/fe80::1%eth0",
         "unix:path=/bridge/box"], ("0.1.0", 0))))  # fmt: skip
    assert cli.main(["hosts"]) == EXIT_OK


def test_hosts_without_hosts_toml_says_so(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["hosts"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert out == "NAME  DESTINATION  STATE  VERSION  VMS\n"
    assert err == f"kdlabctl: no hosts in {config}\n"


@pytest.mark.usefixtures("three")
def test_list_all_hosts_has_a_host_column_and_warns_of_the_missing(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KDLAB_HOST", "lab")  # --all-hosts: every host anyway
    here = os.getuid()
    monkeypatch.setattr(
        hosts,
        "_call",
        canned(
            {
                "unix:path=/local": [vm(name="mine", owner=here)],
                "unix:path=/bridge/alice@lab2.example.org": [
                    vm(name="a", owner=4242),
                    vm(name="b", owner=here, memory_mib=1024),
                ],
                "unix:path=/bridge/box": [],
            }
        ),
    )
    assert cli.main(["--bus", "unix:path=/local", "list", "--all-hosts"]) == 69
    out, err = capsys.readouterr()
    me = pwd.getpwuid(here).pw_name
    assert out.splitlines() == [
        "HOST   NAME  STATE    MEMORY  CPUS  ACCEL  GDB   OWNER",
        f"local  mine  running  256M    1     tcg    unix  {me}",
        "lab    a     running  256M    1     tcg    unix  alice",
        f"lab    b     running  1024M   1     tcg    unix  {here}",
    ]
    assert err == "kdlabctl: v6: ssh: connect to host fe80::1%eth0: refused\n"
    assert cli.main(["--bus", "unix:path=/local", "list", "--all-hosts", "--json"])

    listed = json.loads(capsys.readouterr().out)
    assert [(vm["host"], vm["name"]) for vm in listed] == [
        ("local", "mine"), ("lab", "a"), ("lab", "b")
    ]  # fmt: skip
    assert listed[1]["owner"] == 4242


# --- the bridge's end ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "bus"),
    [
        (["--bus", "system", "__bridge"], "system"),
        (["--bus=unix:path=/x", "__bridge"], "unix:path=/x"),
        (["__bridge"], "system"),
        (["list", "__bridge"], None),
        (["--bus", "system", "list"], None),
    ],
)
def test_the_hidden_bridge_command(argv: list[str], bus: str | None) -> None:
    assert cli.bridge_bus(argv) == bus


def test_the_hidden_bridge_command_serves_the_bus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: list[str] = []
    monkeypatch.setattr(bridge, "serve", lambda bus: served.append(bus) or 7)
    monkeypatch.setenv("KDLAB_HOST", "lab")  # the host's own: never applies here
    assert cli.main(["--bus", "system", "__bridge"]) == 7
    assert served == ["system"]


@pytest.fixture(autouse=True)
def _no_remote_left() -> Iterator[None]:
    yield
    assert caller.remote() is None
