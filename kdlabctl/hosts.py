"""Remote hosts: ``hosts.toml``, ``--host``, the ssh command line, and the
commands that ask every host (``kdlabctl hosts``, ``list --all-hosts``).

``kdlabctl --host HOST COMMAND`` runs COMMAND here (files are read here, gdb
and the terminal are here); only its D-Bus connection reaches HOST, through
ssh and a ``kdlabctl __bridge`` there (:mod:`kdlabctl.bridge`). HOST is a
name of ``$XDG_CONFIG_HOME/kdlab/hosts.toml``::

    [hosts.lab]
    destination = "alice@lab2.example.org:2222"  # [USER@]HOST[:PORT], [v6]:PORT
    ssh_options = ["-i", "~/.ssh/id_lab"]         # more of ssh's options
    kdlabctl = "kdlabctl"                         # how to run it there
    bus = "system"                                # kdlabd's bus there

or else an ssh destination itself, ``[USER@]HOST[:PORT]``. A bad file or
destination is :class:`kdlab.errors.InvalidArgument` (exit 2) naming the
file and the key.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from kdlab.errors import InvalidArgument
from kdlabctl.names import BRIDGE

if TYPE_CHECKING:
    from kdlabctl.bridge import RemoteInfo, Session
    from kdlabctl.client import Client

T = TypeVar("T")

CONFIG = "hosts.toml"
DEFAULT_KDLABCTL = "kdlabctl"
DEFAULT_BUS = "system"
# The name of this machine's kdlabd in ``list --all-hosts`` (no host may take it).
LOCAL = "local"
# How long reaching a host may take: ssh's ConnectTimeout, then kdlabctl's
# start on the host and its hello.
SESSION_SECONDS = 30.0
# No terminal, no X11 or agent forwarding; never a password prompt (a question
# on the terminal would hang a command that waits for the bridge's hello).
# A host that goes away without a word is noticed within 45 s (ServerAlive).
SSH_OPTIONS = (
    "-T", "-x", "-a", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
    "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3",
)  # fmt: skip
# One ssh connection per host is shared by the commands of the next minute
# (ssh's ControlMaster): a new one costs a key exchange and a login, several
# times a command's own time. A host's ssh_options come first and win (ssh
# keeps an option's first value): "-o", "ControlMaster=no" turns it off.
CONTROL_PERSIST_SECONDS = 60
_SOCKET_PATH_MAX = 107  # sun_path, less its NUL
_KEYS = {
    "destination": "[USER@]HOST[:PORT]",
    "ssh_options": "a list of ssh's options",
    "kdlabctl": "the shell command that runs kdlabctl on the host",
    "bus": "kdlabd's bus on the host",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PORT = re.compile(r"[0-9]{1,5}")


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/kdlab/hosts.toml`` (``~/.config`` when it is unset or
    not absolute, as the XDG specification says)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".config")
    return Path(base, "kdlab", CONFIG)


@dataclass(frozen=True)
class Host:
    """A host kdlabctl reaches over ssh: a name of hosts.toml, or a destination
    given to ``--host`` as it is (its name is then that text)."""

    name: str
    user: str  # "": ssh's (its configuration's, else ours)
    hostname: str  # an IPv6 address without brackets
    port: int | None = None
    ssh_options: tuple[str, ...] = ()
    kdlabctl: str = DEFAULT_KDLABCTL
    bus: str = DEFAULT_BUS

    @property
    def login(self) -> str:
        """ssh's destination argument (ssh takes an IPv6 address bare)."""
        return f"{self.user}@{self.hostname}" if self.user else self.hostname

    @property
    def destination(self) -> str:
        """``[USER@]HOST[:PORT]`` as a person writes it."""
        if self.port is None:
            return self.login
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{self.user}@{host}:{self.port}" if self.user else f"{host}:{self.port}"


def parse_destination(text: str) -> tuple[str, str, int | None]:
    """``[USER@]HOST[:PORT]`` (``[ADDR]:PORT`` for IPv6) as (user, host, port);
    ValueError says what is wrong. Nothing ssh would read as an option (a
    leading ``-``) passes."""
    if not text:
        raise ValueError("is empty")
    if text.startswith("-"):
        raise ValueError("starts with '-' (ssh would read it as an option)")
    if any(char.isspace() or not char.isprintable() or char == "/" for char in text):
        raise ValueError("has a space, a control character or '/'")
    user, at, rest = text.rpartition("@")
    if at and (not user or "@" in user):
        raise ValueError("needs one user name before '@'")
    host, port = _host_and_port(rest)
    if not host or host.startswith("-"):
        raise ValueError("has no host name" if not host else "has a host name with '-'")
    return user, host, port


def _host_and_port(text: str) -> tuple[str, int | None]:
    import ipaddress

    if text.startswith("["):
        address, closed, after = text[1:].partition("]")
        if not closed or (after and not after.startswith(":")):
            raise ValueError("needs [IPV6-ADDRESS] or [IPV6-ADDRESS]:PORT")
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"has {address!r}, not an IPv6 address") from None
        return address, _port(after[1:]) if after else None
    if text.count(":") > 1:
        try:
            return str(ipaddress.IPv6Address(text)), None
        except ValueError:
            raise ValueError(
                "has several ':' (an IPv6 address with a port is [ADDRESS]:PORT)"
            ) from None
    host, colon, port = text.partition(":")
    return host, _port(port) if colon else None


def _port(text: str) -> int:
    if not _PORT.fullmatch(text) or not 0 < int(text) < 1 << 16:
        raise ValueError(f"has port {text!r}, not a number from 1 to 65535")
    return int(text)


def load(path: Path | None = None) -> dict[str, Host]:
    """The hosts of *path* (default :func:`config_path`), in the file's order;
    none when there is no file."""
    import tomllib

    path = path or config_path()
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise InvalidArgument(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:  # TOMLDecodeError, or bytes that are not UTF-8
        raise InvalidArgument(f"{path} is not valid TOML: {err}") from None
    for key in data:
        if key != "hosts":
            raise InvalidArgument(
                f"{path}: unknown key {key!r}: hosts are [hosts.NAME] tables"
            )
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict):
        raise InvalidArgument(f"{path}: hosts must be [hosts.NAME] tables")
    return {name: _host(path, name, table) for name, table in hosts.items()}


def _host(path: Path, name: str, table: Any) -> Host:
    """[hosts.NAME] of *path*, checked key by key."""
    where = f"{path}: hosts.{name}"
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{where}: a host's name is letters, digits, '.', '_' and '-', "
            "starting with a letter or a digit"
        )
    if name == LOCAL:
        raise InvalidArgument(
            f"{where}: {LOCAL!r} is this machine (kdlabctl list --all-hosts): "
            "choose another name"
        )
    if not isinstance(table, dict):
        raise InvalidArgument(f"{where} must be a table ([hosts.{name}])")
    for key in table:
        if key not in _KEYS:
            raise InvalidArgument(
                f"{where}: unknown key {key!r} (known: {', '.join(_KEYS)})"
            )
    if "destination" not in table:
        raise InvalidArgument(f"{where}.destination is missing: {_KEYS['destination']}")
    destination = _string(where, table, "destination")
    try:
        user, hostname, port = parse_destination(destination)
    except ValueError as err:
        raise InvalidArgument(f"{where}.destination {destination!r} {err}") from None
    options = table.get("ssh_options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise InvalidArgument(f"{where}.ssh_options must be a list of strings")
    return Host(
        name=name,
        user=user,
        hostname=hostname,
        port=port,
        ssh_options=tuple(options),
        kdlabctl=_string(where, table, "kdlabctl", DEFAULT_KDLABCTL),
        bus=_string(where, table, "bus", DEFAULT_BUS),
    )


def _string(where: str, table: dict[str, Any], key: str, default: str = "") -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{where}.{key} must be a string: {_KEYS[key]}")
    return value


def names() -> list[str]:
    """The hosts of hosts.toml, for the shell's completion (none when the file
    is missing or wrong: a Tab explains nothing)."""
    try:
        return list(load())
    except InvalidArgument:
        return []


def resolve(spec: str) -> Host:
    """``--host SPEC``: a host of hosts.toml by name, else a destination."""
    configured = load()
    if spec in configured:
        return configured[spec]
    try:
        user, hostname, port = parse_destination(spec)
    except ValueError as err:
        raise InvalidArgument(
            f"--host {spec!r} {err}: give a host of {config_path()} or "
            "[USER@]HOST[:PORT]"
        ) from None
    return Host(name=spec, user=user, hostname=hostname, port=port)


def ssh_argv(host: Host, bus: str) -> list[str]:
    """The ssh command line that runs ``kdlabctl --bus BUS __bridge`` on *host*."""
    port = ["-p", str(host.port)] if host.port is not None else []
    command = f"{host.kdlabctl} --bus {shlex.quote(bus)} {BRIDGE}"
    options = [*host.ssh_options, *SSH_OPTIONS, *_shared_connection()]
    return ["ssh", *options, *port, host.login, "--", command]


def _shared_connection() -> list[str]:
    """ssh's options that share one connection per host (none when there is no
    private directory for its socket)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isdir(runtime):
        directory = Path(runtime) / "kdlab-ssh"
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        directory = Path(cache) / "kdlab" / "ssh"
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.lstat()  # a symbolic link may lead anywhere: not used
    except OSError:
        return []
    private = (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & 0o077
    )
    # %C: a hash (40 hex digits) of the local host, user, host and port.
    if not private or len(str(directory)) + 41 > _SOCKET_PATH_MAX:
        return []
    return [
        "-o", "ControlMaster=auto",
        "-o", f"ControlPath={directory}/%C",
        "-o", f"ControlPersist={CONTROL_PERSIST_SECONDS}",
    ]  # fmt: skip


@contextmanager
def connected(host: Host, bus: str | None, timeout: float) -> Iterator[Session]:
    """A bridge to kdlabd's bus *bus* on *host* (default: the host's), open
    within: :class:`kdlabctl.bridge.Unreachable` when it cannot be."""
    from kdlabctl import bridge

    session = bridge.open_session(ssh_argv(host, bus or host.bus), host.name, timeout)
    try:
        yield session
    finally:
        session.close()


# --- asking every host ----------------------------------------------------------


@dataclass(frozen=True)
class Answer(Generic[T]):
    """What one kdlabd answered, or why it did not."""

    host: str  # its name in hosts.toml, or LOCAL
    destination: str  # "" for this machine
    remote: RemoteInfo | None = None  # who the caller was there; None: here
    value: T | None = None
    error: str = ""  # one line; "" when it answered


def ask_all(
    hosts: Sequence[Host | None],
    work: Callable[[Client], Coroutine[Any, Any, T]],
    local_bus: str,
) -> list[Answer[T]]:
    """*work* (calls only: a plain client) on each of *hosts* (None: this
    machine's kdlabd on *local_bus*), all at once, each through its own
    session; the answers in the order of *hosts*."""
    with ThreadPoolExecutor(max_workers=max(1, len(hosts))) as pool:
        return list(pool.map(lambda host: _ask(host, work, local_bus), hosts))


def _ask(
    host: Host | None, work: Callable[[Client], Coroutine[Any, Any, T]], local_bus: str
) -> Answer[T]:
    from kdlabctl import bridge
    from kdlabctl.client import RemoteError

    name, destination = (LOCAL, "") if host is None else (host.name, host.destination)
    try:
        if host is None:
            return Answer(name, destination, None, _call(local_bus, work))
        with connected(host, None, SESSION_SECONDS) as session:
            value = _call(session.bus, work)
            return Answer(name, destination, session.remote, value)
    except (bridge.Unreachable, RemoteError) as err:
        error = " ".join(str(err).split()) or type(err).__name__
        return Answer(name, destination, error=error)


def _call(bus: str, work: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
    from kdlabctl.client import Client, settle

    client = Client.plain(bus)
    try:
        return settle(work(client))
    finally:
        client.disconnect()


async def _probe(client: Client) -> tuple[str, int]:
    """``kdlabctl hosts``' question: kdlabd's version and how many VMs the
    caller sees (as ``kdlabctl list`` lists them)."""
    return await client.version(), len(await client.list_vms())


def cmd_hosts(json_output: bool) -> int:
    """``kdlabctl hosts``: every host of hosts.toml, reached in parallel; exit
    69 when any did not answer (every row is printed still)."""
    import sys

    from kdlab.errors import EXIT_OK, EXIT_UNAVAILABLE
    from kdlabctl import output
    from kdlabctl.cli import local_bus

    configured = load()
    if not configured:
        print(f"kdlabctl: no hosts in {config_path()}", file=sys.stderr)
    answers = ask_all(list(configured.values()), _probe, local_bus())
    if json_output:
        output.print_json([_host_json(answer) for answer in answers])
    else:
        rows = [
            [
                answer.host,
                answer.destination,
                answer.error or "reachable",
                answer.value[0] if answer.value else "-",
                str(answer.value[1]) if answer.value else "-",
            ]
            for answer in answers
        ]
        headers = ["NAME", "DESTINATION", "STATE", "VERSION", "VMS"]
        print(output.table(headers, rows))
    return EXIT_UNAVAILABLE if any(answer.error for answer in answers) else EXIT_OK


def _host_json(answer: Answer[tuple[str, int]]) -> dict[str, Any]:
    version, vms = answer.value or ("", None)
    return {
        "name": answer.host,
        "destination": answer.destination,
        "reachable": not answer.error,
        "error": answer.error,
        "version": version,
        "vms": vms,
        "user": answer.remote.user if answer.remote else "",
    }
