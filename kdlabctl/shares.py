"""A directory of the user's, shared into their VM, served as the user.

``create --share DIR[:TAG]`` records the directory with the VM (kdlabd never
opens it). Before each start of a VM with shares, kdlabctl (run by the VM's
owner) asks kdlabd for a listening socket per share (``ServeShares``: bound
where only QEMU can connect) and starts a virtiofsd **as the user** on each,
in a user namespace of its own (``unshare --map-root-user``) with its
sandbox pivoted into the directory: the guest reads and writes exactly what
the user may, never more (a file the user cannot read is unreadable in the
guest; a symbolic link cannot lead out of the directory). Each virtiofsd is
detached from kdlabctl (a session of its own, its output in a log of the
user's) and ends when QEMU hangs up, when the VM stops. See
:mod:`kdlabctl.virtiofs_exec` for why it runs under a seccomp filter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdlab.errors import NotAuthorized
from kdlab.wire import SHARE_TAG
from kdlabctl import caller

if TYPE_CHECKING:
    from kdlabctl.client import Client
    from kdlabctl.records import VM

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
"""QEMU's C virtiofsd (Debian 12: qemu-system-common)."""
UNSHARE = "unshare"
LAUNCHER = Path(__file__).with_name("virtiofs_exec.py")
READY = b"Waiting for vhost-user socket connection"
"""What virtiofsd logs once it listens (and its arguments and the directory
passed its checks)."""
READY_SECONDS = 10.0
_NOT_IN_TAG = re.compile(r"[^A-Za-z0-9_.-]+")


class ShareError(Exception):
    """A share cannot be made or served; the message says what to do."""


class Unavailable(ShareError):
    """virtiofsd is not installed."""


@dataclass(frozen=True)
class ShareSpec:
    """One ``--share``: the guest's tag and the user's directory (real path)."""

    tag: str
    directory: str


def default_tag(directory: str) -> str:
    """The directory's name as a tag: other characters become '-', at most 36."""
    tag = _NOT_IN_TAG.sub("-", os.path.basename(directory.rstrip("/")))
    tag = tag.strip("-")[:36]
    return tag if SHARE_TAG.fullmatch(tag) and tag not in (".", "..") else "share"


def parse(text: str) -> ShareSpec:
    """``DIR[:TAG]``, checked as the user: DIR must be a directory the user
    may read and enter (kdlabd never looks at it: the user serves it)."""
    directory, colon, tag = text.rpartition(":")
    if not colon or not directory or not SHARE_TAG.fullmatch(tag):
        directory, tag = text, ""
    real = os.path.realpath(directory)
    if not os.path.isdir(real):
        raise ShareError(f"cannot share {directory}: not a directory")
    check_readable(real)
    return ShareSpec(tag or default_tag(real), real)


def check_readable(directory: str) -> None:
    """Refuse a directory the user cannot read and enter: the guest would see
    it with the user's rights, so kdlabctl says so now."""
    if not os.access(directory, os.R_OK | os.X_OK):
        raise ShareError(
            f"cannot share {directory}: you (uid {os.getuid()}) may not read and "
            "enter it, and the guest sees it with your rights"
        )


def shares_option(specs: list[ShareSpec]) -> dict[str, str] | None:
    """CreateVM's ``shares``: tag -> directory; None without shares."""
    found: dict[str, str] = {}
    for spec in specs:
        if spec.tag in found:
            raise ShareError(
                f"two shares have the tag {spec.tag!r} ({found[spec.tag]} and "
                f"{spec.directory}): give one its own, --share DIR:TAG"
            )
        found[spec.tag] = spec.directory
    return found or None


def virtiofsd_argv(fd: int, directory: str) -> list[str]:
    """virtiofsd on the listening socket *fd*, serving *directory*, as the user.

    ``unshare --map-root-user``: root of a user namespace of its own, which
    owns only the user's uid (files of anyone else's stay theirs);
    ``sandbox=namespace``: it pivots into *directory*, so nothing outside it
    can be reached; no xattrs; its open-file limit as the user's.
    """
    return [
        sys.executable, "-I", "-S", str(LAUNCHER),
        UNSHARE, "--user", "--map-root-user", "--",
        str(VIRTIOFSD), f"--fd={fd}", "-o", f"source={directory}",
        "-o", "sandbox=namespace", "-o", "cache=auto", "-o", "no_xattr",
        "--rlimit-nofile=0",
    ]  # fmt: skip


def log_dir(vm: str, env: dict[str, str] | None = None) -> Path:
    """Where the user's virtiofsd logs of VM *vm* go: under $XDG_CACHE_HOME
    (else ~/.cache), ``kdlab/virtiofsd/VM/TAG.log``."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return Path(base, "kdlab", "virtiofsd", vm)


@dataclass
class Server:
    """A virtiofsd kdlabctl started for one share."""

    tag: str
    directory: str
    process: subprocess.Popen[bytes]
    log: Path


def start_server(vm: str, tag: str, directory: str, fd: int) -> Server:
    """Start virtiofsd on *fd* for share *tag*, detached: a session of its
    own, no terminal, its output in its log (a new one each start)."""
    logs = log_dir(vm)
    try:
        logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        log = logs / f"{tag}.log"
        output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as err:
        raise ShareError(
            f"cannot write virtiofsd's log in {logs}: {err.strerror}"
        ) from None
    try:
        process = subprocess.Popen(
            virtiofsd_argv(fd, directory),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            pass_fds=(fd,),
            start_new_session=True,
            cwd="/",
        )
    finally:
        os.close(output)
    return Server(tag, directory, process, log)


def wait_until_ready(servers: list[Server], seconds: float = READY_SECONDS) -> None:
    """Return once every server listens; ShareError (with its log) for one
    that exited or did not get there within *seconds* (which is then killed)."""
    deadline = time.monotonic() + seconds
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            status = server.process.poll()
            if READY in _read(server.log):
                waiting.remove(server)
            elif status is not None:
                raise ShareError(
                    f"virtiofsd for share {server.tag} ({server.directory}) exited "
                    f"with status {status}: {_tail(server.log)} (log: {server.log})"
                )
        if waiting and time.monotonic() > deadline:
            for server in waiting:
                server.process.kill()
            raise ShareError(
                f"virtiofsd for share {waiting[0].tag} did not start within "
                f"{seconds:g} s (log: {waiting[0].log})"
            )
        if waiting:
            time.sleep(0.02)


def _read(log: Path) -> bytes:
    try:
        return log.read_bytes()
    except OSError:
        return b""


def _tail(log: Path) -> str:
    lines = _read(log).decode(errors="replace").strip().splitlines()
    return " / ".join(lines[-3:]) or "it said nothing"


def stop(servers: list[Server]) -> None:
    """End *servers* (the VM they were for did not start)."""
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


async def serve(client: Client, vm: VM) -> list[Server]:
    """Serve *vm*'s shares as the user, who must be its owner, before a start:
    a virtiofsd of the user's on each socket kdlabd hands over, listening."""
    if caller.uid() != vm.owner:
        raise NotAuthorized(
            f"share {vm.shares[0][0]} of VM {vm.name} is uid {vm.owner}'s: only they "
            "can serve it (the guest sees the directory with the rights of who "
            "serves it)"
        )
    if not os.access(VIRTIOFSD, os.X_OK):
        raise Unavailable(
            f"virtiofsd is not installed ({VIRTIOFSD} is missing): apt-get install "
            "qemu-system-common"
        )
    directories = dict(vm.shares)
    for directory in directories.values():
        check_readable(directory)
    sockets = await client.serve_shares(vm.name)
    servers: list[Server] = []
    try:
        for tag, fd in sorted(sockets.items()):
            servers.append(start_server(vm.name, tag, directories[tag], fd))
        wait_until_ready(servers)
    except BaseException:
        stop(servers)
        raise
    finally:
        for fd in sockets.values():
            os.close(fd)
    return servers
