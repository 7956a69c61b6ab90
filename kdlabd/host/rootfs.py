"""Debian root file systems for kdlab's disk images, built without mounting anything.

:func:`build_rootfs` makes a raw ext4 image whose whole disk is the root file
system (``root=/dev/vda``, no partition table), in four steps:

1. ``debootstrap --variant=minbase`` with systemd and udev (and openssh-server
   when a key is given), or the same tree unpacked from the cache;
2. the pristine tree stored in the cache, one tar per (suite, packages, mirror),
   so the next build of that base skips debootstrap (about 40 s here);
3. the tree configured for a debug VM: hostname, fstab, an empty root password,
   autologin on ``ttyS0``, units masked that stall or fail without network,
   kdlab's exec agent (``kdlabctl exec``) started at boot;
4. ``mke2fs -d`` turns the tree into the image: no loop device, no mount.

This is what syzkaller's ``tools/create-image.sh`` does, minus what hurts kdlab's
users: its fstab mounts configfs, securityfs and debugfs, which stalls kernels
built without them, and it needs loop mounts.

Every tool runs confined (:mod:`kdlabd.host.sandbox`): new PID, IPC, UTS and
mount namespaces, a reduced capability bounding set, the host read-only but
for what the step writes, and only debootstrap on the network, which checks
every signature against Debian's keyring (``--force-check-gpg``). Cancelling
the build (or any failure) kills every process of it and removes everything
the build made: the tree, the partial image, a partial cache entry. What is
built is a :class:`~kdlabd.core.rootfs.RootfsSpec`, validated in core; this
is the host's side of the :class:`~kdlabd.core.builder.Builder` port
(:mod:`kdlabd.host.builder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import structlog

from kdlab import agent
from kdlab.errors import BuildFailed, InvalidArgument
from kdlab.kernel.guest import ROOT_DEVICE, SERIAL_CONSOLE
from kdlabd.core.builder import Progress
from kdlabd.core.jobs import finish_on_cancel
from kdlabd.core.journal import crash_point
from kdlabd.core.rootfs import RootfsSpec
from kdlabd.core.validate import MIB
from kdlabd.host.sandbox import NOT_FOUND, BuildSandbox

log = structlog.get_logger(__name__)

T = TypeVar("T")

# systemd as init, and udev: without udev no device unit becomes active and
# serial-getty@ttyS0 waits 90 s for dev-ttyS0.device. No network stack at all:
# guests get no network, and ifupdown or networkd would only wait for one.
# dbus: without it systemd-logind does not run, nothing acts on the ACPI power
# button, and a graceful "kdlabctl stop" always times out and pulls the plug.
BASE_PACKAGES = ("dbus", "systemd-sysv", "udev")
SSH_PACKAGES = ("openssh-server",)

FS_LABEL = "kdlab-root"
DEBOOTSTRAP_SCRIPTS = Path("/usr/share/debootstrap/scripts")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
"""The only keys a mirror's Release file may be signed with (any mirror)."""

CACHE_MAX_AGE = 7 * 24 * 3600.0
"""A cached base older than this is bootstrapped again: suites get updates."""
CACHE_FORMAT = 2
"""Part of the cache key: bump it when the cached tree's content changes meaning."""

TAIL_LINES = 20

# Pinned ext4 features (those of Debian 12's mke2fs.conf), whatever the host's
# e2fsprogs defaults: upstream 1.47 adds orphan_file, and kernels before 5.15
# then refuse the root file system ("VFS: Unable to mount root fs"), which is
# exactly the kind of old kernel people bisect in kdlab.
EXT4_FEATURES = (
    "none,has_journal,ext_attr,resize_inode,dir_index,filetype,extent,64bit,"
    "flex_bg,sparse_super,large_file,huge_file,dir_nlink,extra_isize,metadata_csum"
)

MASKED_UNITS = (
    # Wait for a network that kdlab guests never get: up to 2 min each.
    "systemd-networkd-wait-online.service",
    "NetworkManager-wait-online.service",
    "ifupdown-wait-online.service",
    # Reach for the network, and as persistent timers they also fire on the
    # first boot of every VM, adding work to an already slow TCG boot.
    "apt-daily.timer",
    "apt-daily.service",
    "apt-daily-upgrade.timer",
    "apt-daily-upgrade.service",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    # e2scrub needs LVM snapshots: it can only fail here.
    "e2scrub_all.timer",
    "e2scrub_all.service",
    "e2scrub_reap.service",
    # Prompts on the console and waits (for locale, root password) if
    # /etc/machine-id is ever missing: a boot that hangs without a word.
    "systemd-firstboot.service",
)

AUTOLOGIN_DROP_IN = (
    f"etc/systemd/system/serial-getty@{SERIAL_CONSOLE}.service.d/autologin.conf"
)
AUTOLOGIN_CONF = (
    "# kdlab: a debug VM's serial console logs root in without a password.\n"
    "[Service]\n"
    "ExecStart=\n"
    "ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 "
    "%I $TERM\n"
)
SSH_HOST_KEYS_DROP_IN = "etc/systemd/system/ssh.service.d/kdlab-host-keys.conf"
SSH_HOST_KEYS_CONF = (
    "# kdlab: host keys are made on each VM's first boot, not shared by every\n"
    "# image built from one cached base. sshd -t fails without them, so the\n"
    "# keys come first.\n"
    "[Service]\n"
    "ExecStartPre=\n"
    "ExecStartPre=/usr/bin/ssh-keygen -A\n"
    "ExecStartPre=/usr/sbin/sshd -t\n"
)
# kdlab's exec agent: kdlabd's own build of it, run at boot by its unit. The
# unit is enabled as `systemctl enable` would; udev makes the agent's port from
# virtio_console, which kdlab's initramfs loads (the image has no modules).
AGENT_BINARY = agent.GUEST_BINARY.lstrip("/")
AGENT_UNIT = f"etc/systemd/system/{agent.UNIT.name}"
AGENT_WANTS = f"etc/systemd/system/multi-user.target.wants/{agent.UNIT.name}"

FSTAB = (
    "# kdlab: the whole virtio disk is the root file system (no partition table).\n"
    "# Nothing else: a configfs, securityfs or debugfs line stalls kernels\n"
    "# built without them.\n"
    f"{ROOT_DEVICE} / ext4 errors=remount-ro 0 1\n"
)

_CHECKPOINT_RECORDS = 1000  # tar reports every 1000 records of 10 KiB: 10 MB
_CHECKPOINT = re.compile(r"kdlab-checkpoint (\d+)$")
_TOOL_PACKAGES = {
    "debootstrap": "debootstrap",
    "mke2fs": "e2fsprogs",
    "tar": "tar",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "systemd-run": "systemd",
    "rm": "coreutils",
}


class RootfsBuildError(BuildFailed):
    """A tool of the root file system build failed.

    The message names the tool, says what to check and ends with the tool's
    last lines of output.
    """


def include_packages(spec: RootfsSpec) -> tuple[str, ...]:
    """Everything given to debootstrap's ``--include``, sorted."""
    extra = SSH_PACKAGES if spec.ssh_key else ()
    return tuple(sorted({*BASE_PACKAGES, *extra, *spec.packages}))


def cache_key(spec: RootfsSpec) -> str:
    """Names the pristine debootstrap tree of *spec*: what debootstrap was told.

    The hostname, key and size are applied after the cache, so they are not
    part of it; whether a key is given is, through openssh-server.
    """
    identity = {
        "format": CACHE_FORMAT,
        "suite": spec.suite,
        "mirror": spec.mirror,
        "variant": "minbase",
        "include": list(include_packages(spec)),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{spec.suite}-{digest[:24]}"


def debootstrap_argv(spec: RootfsSpec, target: Path) -> list[str]:
    """The debootstrap command line that bootstraps *spec* into *target*."""
    return [
        "debootstrap",
        # Signatures checked, or the build fails: never a silent unchecked
        # download (a member may name any mirror).
        "--force-check-gpg",
        f"--keyring={DEBIAN_KEYRING}",
        "--variant=minbase",
        f"--include={','.join(include_packages(spec))}",
        spec.suite,
        str(target),
        spec.mirror,
    ]


def mke2fs_argv(tree: Path, image: Path, size_bytes: int) -> list[str]:
    """The mke2fs command line that makes *image* from the directory *tree*."""
    return [
        "mke2fs",
        "-q",
        "-t",
        "ext4",
        "-F",
        "-b",
        "4096",
        "-I",
        "256",
        "-O",
        EXT4_FEATURES,
        "-L",
        FS_LABEL,
        "-d",
        str(tree),
        str(image),
        f"{size_bytes // 1024}k",
    ]


# Progress of debootstrap.


class _Phase(NamedTuple):
    name: str
    start: float
    end: float
    marker: str  # the line that starts it ("" if an item line does)
    item: re.Pattern[str] | None  # a line per package, its name in group 1
    verb: str


_UNPACKING = re.compile(r"I: Unpacking (\S+)\.\.\.$")
_CONFIGURING = re.compile(r"I: Configuring (\S+)\.\.\.$")

# debootstrap downloads every package, extracts the required ones, unpacks
# and configures those, then unpacks and configures the rest ("the base
# system"). Shares measured with bookworm minbase plus systemd-sysv, udev and
# openssh-server (42 s here).
_DEBOOTSTRAP_PHASES = (
    _Phase("setup", 0.00, 0.15, "", None, ""),
    _Phase(
        "download",
        0.15,
        0.48,
        "",
        re.compile(r"I: Retrieving (\S+) \S+$"),
        "downloading",
    ),
    _Phase(
        "extract",
        0.48,
        0.55,
        "I: Chosen extractor for .deb packages:",
        re.compile(r"I: Extracting (\S+)\.\.\.$"),
        "extracting",
    ),
    _Phase("install", 0.55, 0.59, "I: Installing core packages...", None, ""),
    _Phase(
        "unpack-required",
        0.59,
        0.74,
        "I: Unpacking required packages...",
        _UNPACKING,
        "unpacking",
    ),
    _Phase(
        "configure-required",
        0.74,
        0.79,
        "I: Configuring required packages...",
        _CONFIGURING,
        "configuring",
    ),
    _Phase(
        "unpack-base",
        0.79,
        0.97,
        "I: Unpacking the base system...",
        _UNPACKING,
        "unpacking",
    ),
    _Phase(
        "configure-base",
        0.97,
        1.00,
        "I: Configuring the base system...",
        _CONFIGURING,
        "configuring",
    ),
)
_DEBOOTSTRAP_DONE = "I: Base system installed successfully."
# Before the first download: where each step starts, as a share of the setup.
_SETUP_STEPS = {
    "I: Retrieving Packages": 0.05,
    "I: Resolving dependencies of required packages": 0.2,
    "I: Resolving dependencies of base packages": 0.55,
    "I: Checking component": 0.95,
}


class DebootstrapProgress:
    """Reads debootstrap's ``I:`` lines as a fraction of its whole run.

    Within a phase each package line advances it. How many packages will be
    downloaded is never printed, so that phase counts against an estimate;
    later phases count against what was downloaded and extracted.
    """

    def __init__(self, expected_packages: int) -> None:
        self._expected = max(1, expected_packages)
        self._phase = _DEBOOTSTRAP_PHASES[0]
        self._count = 0
        self._seen: dict[str, int] = {}
        self.fraction = 0.0

    def feed(self, line: str) -> tuple[float, str] | None:
        """The new fraction and status after *line*, or None if it tells nothing."""
        line = line.strip()
        if not line.startswith("I: ") or line.startswith("I: Validating "):
            return None
        if line == _DEBOOTSTRAP_DONE:
            return self._advance(1.0, "base system installed")
        phase = self._phase_started_by(line)
        if phase is not None:
            self._enter(phase)
            if phase.marker:
                return self._advance(self._at(0.0), line[3:].rstrip(". :"))
        match = self._phase.item.match(line) if self._phase.item else None
        if match is None:
            return self._advance(self._setup_step(line), line[3:].rstrip(". "))
        self._count += 1
        total = self._total()
        status = f"{self._phase.verb} {match[1]} ({self._count}/{total})"
        return self._advance(self._at(self._count / total), status)

    def _phase_started_by(self, line: str) -> _Phase | None:
        download = _DEBOOTSTRAP_PHASES[1]
        if self._phase.name == "setup" and download.item and download.item.match(line):
            return download
        for phase in _DEBOOTSTRAP_PHASES:
            if phase.marker and line.startswith(phase.marker):
                return phase
        return None

    def _setup_step(self, line: str) -> float:
        if self._phase.name == "setup":
            for start, within in _SETUP_STEPS.items():
                if line.startswith(start):
                    return self._at(within)
        return self.fraction

    def _enter(self, phase: _Phase) -> None:
        self._seen[self._phase.name] = self._count
        self._phase = phase
        self._count = 0

    def _total(self) -> int:
        """What the current phase counts up to (at least what it has seen)."""
        downloaded = self._seen.get("download", 0)
        extracted = self._seen.get("extract", 0)
        totals = {
            "download": self._expected,
            "extract": downloaded,
            "unpack-required": extracted,
            "configure-required": self._seen.get("unpack-required", extracted),
            "unpack-base": downloaded - extracted,
            "configure-base": self._seen.get("unpack-base", 0),
        }
        return max(totals[self._phase.name], self._count, 1)

    def _at(self, within: float) -> float:
        return self._phase.start + (self._phase.end - self._phase.start) * min(
            within, 1.0
        )

    def _advance(self, fraction: float, status: str) -> tuple[float, str]:
        self.fraction = max(self.fraction, fraction)
        return self.fraction, status


def expected_packages(spec: RootfsSpec) -> int:
    """A guess of how many packages debootstrap downloads, for its progress.

    bookworm minbase with systemd and udev is 102; openssh-server brings 23.
    """
    guess = 102 + (23 if spec.ssh_key else 0)
    return guess + 5 * len(spec.packages)


class _Stages:
    """Maps each step's own 0..1 onto its share of the build; never goes back."""

    def __init__(self, progress: Progress, weights: Sequence[tuple[str, float]]):
        self._progress = progress
        self._spans = self._spans_of(weights)
        self._last = 0.0

    @staticmethod
    def _spans_of(
        weights: Sequence[tuple[str, float]],
    ) -> dict[str, tuple[float, float]]:
        total = sum(weight for _, weight in weights)
        spans: dict[str, tuple[float, float]] = {}
        start = 0.0
        for name, weight in weights:
            spans[name] = (start, start + weight / total)
            start += weight / total
        return spans

    def replan(self, weights: Sequence[tuple[str, float]]) -> None:
        """New shares, once it is known whether the cache serves the base."""
        self._spans = self._spans_of(weights)

    def report(self, stage: str, within: float, status: str) -> None:
        start, end = self._spans[stage]
        fraction = start + (end - start) * max(0.0, min(within, 1.0))
        self._last = max(self._last, min(fraction, 1.0))
        self._progress(self._last, status)


# Measured here with openssh-server: debootstrap 40-58 s, storing the tar
# 0.8 s, mke2fs 1.2-1.8 s, removing the tree 0.2-3 s; from the cache,
# unpacking the tar takes 0.6-4.6 s.
_UNCACHED = (
    ("base", 92.0),
    ("store", 2.0),
    ("configure", 0.5),
    ("image", 3.5),
    ("cleanup", 2.0),
)
_CACHED = (("base", 70.0), ("configure", 2.0), ("image", 22.0), ("cleanup", 6.0))


# Configuring the tree.


class _Tree:
    """Changes files inside a root tree, never following a symlink out of it.

    The tree is Debian's, yet a package's symlink (``/etc/resolv.conf`` often
    is one) must not make root write through to the host's own /etc. So every
    directory on the way must be a real directory, and files are replaced by
    rename, which replaces a symlink rather than following it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, rel: str) -> Path:
        current = self.root
        for part in Path(rel).parent.parts:
            current = current / part
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                raise RootfsBuildError(
                    f"the bootstrapped tree's /{rel} lies under "
                    f"/{current.relative_to(self.root)}, which is not a directory"
                )
        return self.root / rel

    def read(self, rel: str) -> str:
        fd = os.open(self._path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, encoding="utf-8") as file:
            return file.read()

    def write(self, rel: str, data: str | bytes, mode: int = 0o644) -> None:
        """Replace *rel* with *data*, keeping an existing file's mode and owner."""
        path = self._path(rel)
        uid, gid = os.geteuid(), os.getegid()
        with contextlib.suppress(FileNotFoundError):
            old = os.lstat(path)
            if stat.S_ISREG(old.st_mode):
                mode, uid, gid = stat.S_IMODE(old.st_mode), old.st_uid, old.st_gid
        tmp = path.with_name(f".{path.name}.kdlab-{secrets.token_hex(4)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data.encode() if isinstance(data, str) else data)
                os.fchown(file.fileno(), uid, gid)
                os.fchmod(file.fileno(), mode)  # after chown, which clears setgid
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def makedirs(self, rel: str, mode: int = 0o755) -> None:
        current = ""
        for part in Path(rel).parts:
            current = f"{current}/{part}" if current else part
            path = self._path(current)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, mode)
                os.chmod(path, mode)  # not narrowed by the daemon's umask
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise RootfsBuildError(
                    f"the bootstrapped tree's /{current} is not a directory"
                )

    def symlink(self, rel: str, target: str) -> None:
        path = self._path(rel)
        tmp = path.with_name(f".{path.name}.kdlab-{secrets.token_hex(4)}")
        os.symlink(target, tmp)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(rel))

    def names(self, rel: str) -> list[str]:
        """The names in directory *rel* (none if it is missing)."""
        path = self._path(rel)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise RootfsBuildError(
                    f"the bootstrapped tree's /{rel} is not a directory"
                )
        except FileNotFoundError:
            return []
        return sorted(os.listdir(path))


def configure_tree(root: Path, spec: RootfsSpec, agent_binary: Path) -> None:
    """Turn a pristine debootstrap tree into a kdlab debug VM's root file system,
    which runs *agent_binary* (kdlab's exec agent, :func:`build_agent`) at boot.

    Files are edited directly, nothing runs in a chroot: no maintainer script
    or host binary can act on the host, and this works on any tree.
    """
    tree = _Tree(root)
    _configure_identity(tree, spec.hostname)
    tree.write("etc/fstab", FSTAB)
    _empty_root_password(tree)
    tree.makedirs(str(Path(AUTOLOGIN_DROP_IN).parent))
    tree.write(AUTOLOGIN_DROP_IN, AUTOLOGIN_CONF)
    tree.makedirs("etc/systemd/system")
    for unit in MASKED_UNITS:
        tree.symlink(f"etc/systemd/system/{unit}", "/dev/null")
    _per_vm_ssh_host_keys(tree)
    _exec_agent(tree, agent_binary)
    if spec.ssh_key:
        tree.makedirs("root/.ssh", 0o700)
        tree.write("root/.ssh/authorized_keys", f"{spec.ssh_key}\n", 0o600)


def _configure_identity(tree: _Tree, hostname: str) -> None:
    """Hostname, hosts, machine ID, resolver: nothing of the host's, none shared."""
    tree.write("etc/hostname", f"{hostname}\n")
    tree.write(
        "etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
    )
    # Empty: each VM gets its own ID at boot (machine-id(5), "not a first boot",
    # so no first-boot units run); debootstrap made one ID for every image.
    tree.write("etc/machine-id", "", 0o444)
    tree.remove("var/lib/dbus/machine-id")
    # debootstrap copied the host's resolver; guests have no network to use it.
    tree.remove("etc/resolv.conf")


def _empty_root_password(tree: _Tree) -> None:
    """root logs in without a password (Debian's pam_unix has ``nullok``)."""
    lines = tree.read("etc/shadow").splitlines(keepends=True)
    for index, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) >= 2:
            fields[1] = ""
            lines[index] = ":".join(fields)
            tree.write("etc/shadow", "".join(lines))
            return
    raise RootfsBuildError("the bootstrapped tree's /etc/shadow has no root entry")


def _per_vm_ssh_host_keys(tree: _Tree) -> None:
    """Each VM makes its own SSH host keys on its first boot.

    openssh-server's postinst made keys in the cached base, which every image
    built from it would share (whether openssh-server came for a key or as a
    package): they are dropped, and ssh.service makes new ones before sshd -t.
    """
    keys = [name for name in tree.names("etc/ssh") if name.startswith("ssh_host_")]
    if not keys:
        return
    for name in keys:
        tree.remove(f"etc/ssh/{name}")
    tree.makedirs(str(Path(SSH_HOST_KEYS_DROP_IN).parent))
    tree.write(SSH_HOST_KEYS_DROP_IN, SSH_HOST_KEYS_CONF)


def _exec_agent(tree: _Tree, binary: Path) -> None:
    """kdlab's agent and its unit, enabled: ``kdlabctl exec`` works once it boots."""
    tree.makedirs(str(Path(AGENT_BINARY).parent))
    tree.write(AGENT_BINARY, binary.read_bytes(), 0o755)
    tree.write(AGENT_UNIT, agent.UNIT.read_text())
    tree.makedirs(str(Path(AGENT_WANTS).parent))
    tree.symlink(AGENT_WANTS, f"/{AGENT_UNIT}")


async def build_agent(cache_dir: Path) -> Path:
    """kdlab's exec agent for the images, compiled from kdlab's own source into
    ``cache_dir/agent`` (once per source and compiler, :func:`kdlab.agent.build`).
    """
    try:
        return await _in_thread(agent.build, cache_dir / "agent")
    except agent.AgentBuildError as err:
        raise RootfsBuildError(
            f"kdlabd's host cannot build the exec agent its images run: {err}"
        ) from None


# Running tools.


def _tool_env() -> dict[str, str]:
    """A plain environment: English messages to parse, the host's proxy if any."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    for name in ("http_proxy", "https_proxy", "no_proxy"):
        for spelling in (name, name.upper()):
            if spelling in os.environ:
                env[spelling] = os.environ[spelling]
    return env


def _printable(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    return "".join(char if char.isprintable() else "?" for char in text)


def _tool_failed(
    what: str, status: int, tail: Sequence[str], hint: str
) -> RootfsBuildError:
    lines = "\n".join(f"  {line}" for line in tail) or "  (no output)"
    return RootfsBuildError(
        f"{what} failed (exit status {status}): {hint}. Its last output:\n{lines}"
    )


def _not_installed(program: str) -> RootfsBuildError:
    package = _TOOL_PACKAGES.get(program, program)
    return RootfsBuildError(
        f"{program} is not installed on kdlabd's host (apt-get install {package})"
    )


async def _run(
    argv: Sequence[str],
    what: str,
    hint: str,
    on_line: Callable[[str], None] | None = None,
    *,
    sandbox: BuildSandbox,
    writable: Sequence[Path],
    network: bool = False,
    chroot_shim: Path | None = None,
    on_spawn: Callable[[], None] | None = None,
) -> None:
    """Run *argv* confined by *sandbox*; every process of it is killed on error
    or cancel. Only *writable* may be written, only with *network* is there one.
    """
    env = _tool_env()
    command = sandbox.command(
        argv, env, writable=writable, network=network, chroot_shim=chroot_shim
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env=sandbox.env(env),
            limit=1024 * 1024,
        )
    except FileNotFoundError:
        raise _not_installed(command[0]) from None
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    try:
        if on_spawn is not None:
            on_spawn()
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = _printable(raw)
            tail.append(line)
            if on_line is not None:
                on_line(line)
        status = await proc.wait()
    except BaseException:
        await _kill(proc, sandbox)
        raise
    if status == 127 and tail and tail[-1] == f"{NOT_FOUND}{argv[0]}":
        raise _not_installed(argv[0])
    if status != 0:
        raise _tool_failed(what, status, tail, hint)


async def _kill(proc: asyncio.subprocess.Process, sandbox: BuildSandbox) -> None:
    """Kill every process of the build (debootstrap runs dpkg, scripts...)."""
    await _in_thread(sandbox.kill)
    if proc.returncode is None:  # systemd-run, once its unit is stopped
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(asyncio.CancelledError):
        await proc.wait()


async def _in_thread(fn: Callable[..., T], *args: object) -> T:
    """Run blocking file work off the loop; if cancelled, let it finish first."""
    return await finish_on_cancel(asyncio.to_thread(fn, *args))


@contextlib.asynccontextmanager
async def _file_lock(path: Path, on_wait: Callable[[], None]) -> AsyncIterator[None]:
    """Hold an exclusive flock on *path*, polled so the loop never blocks on it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    on_wait()
                    waiting = True
                await asyncio.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The build.


def _check_host(spec: RootfsSpec, output: Path) -> None:
    """What can be refused before anything runs."""
    # Without debootstrap installed, running it reports that instead.
    if DEBOOTSTRAP_SCRIPTS.is_dir() and not (DEBOOTSTRAP_SCRIPTS / spec.suite).exists():
        raise InvalidArgument(
            f"debootstrap on kdlabd's host knows no suite {spec.suite!r} "
            f"(see {DEBOOTSTRAP_SCRIPTS}; a newer debootstrap may know it)"
        )
    if not output.parent.is_dir():
        raise InvalidArgument(f"the image's directory {output.parent} does not exist")
    if output.is_dir():
        raise InvalidArgument(f"the image's path {output} is a directory")


class _Build:
    """One run of :func:`build_rootfs`: its paths, its progress, what to remove."""

    def __init__(
        self,
        spec: RootfsSpec,
        scratch_dir: Path,
        cache_dir: Path,
        output: Path,
        progress: Progress,
        *,
        agent_binary: Path,
        sandbox: BuildSandbox,
    ) -> None:
        self.spec = spec
        self.agent_binary = agent_binary
        self.sandbox = sandbox
        self.scratch_dir = scratch_dir
        self.shim = scratch_dir / "chroot"
        self.root = scratch_dir / "root"
        self.cache_dir = cache_dir
        self.key = cache_key(spec)
        self.entry = cache_dir / f"{self.key}.tar"
        self.output = output
        self.partial = output.with_name(
            f".{output.name}.{secrets.token_hex(4)}.partial"
        )
        self.progress = progress
        self.stages = _Stages(progress, _CACHED if self._cache_fresh() else _UNCACHED)
        self.made_scratch = False
        self.leftovers: list[Path] = []
        self.log = log.bind(suite=spec.suite, cache_key=self.key, output=str(output))

    def _cache_fresh(self) -> bool:
        try:
            age = time.time() - self.entry.stat().st_mtime
        except FileNotFoundError:
            return False
        return age < CACHE_MAX_AGE

    async def run(self) -> None:
        started = time.monotonic()
        self._make_root()
        try:
            await self._base()
            crash_point("build.configuring")
            self.stages.report("configure", 0.0, "configuring the root file system")
            await _in_thread(self._configure)
            await self._image()
            self.stages.report("cleanup", 0.0, "removing the build tree")
        finally:
            await finish_on_cancel(self._remove_leftovers())
        self.progress(1.0, f"built {self.output.name}")
        self.log.info("rootfs.built", seconds=round(time.monotonic() - started, 1))

    def _make_root(self) -> None:
        if not self.scratch_dir.exists():
            self.scratch_dir.mkdir(mode=0o700, parents=True)
            self.made_scratch = True
        try:
            self.root.mkdir(mode=0o755)
        except FileExistsError:
            raise RootfsBuildError(
                f"{self.root} exists: another build uses {self.scratch_dir}, or a "
                "crashed one left it (remove it)"
            ) from None
        self.leftovers.append(self.root)

    async def _base(self) -> None:
        """Fill the tree: from the cache when it has a fresh base, else bootstrap."""
        if self._cache_fresh() and await self._unpack_cached():
            return
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = self.cache_dir / f"{self.key}.lock"

        def waiting() -> None:
            self.stages.report("base", 0.0, "waiting for another build of this base")

        async with _file_lock(lock, waiting):
            if self._cache_fresh() and await self._unpack_cached():
                return
            self._remove_stale_temporaries()
            await self._debootstrap()
            await self._store()

    async def _unpack_cached(self) -> bool:
        """Unpack the cached base; False (and the entry dropped) if it is unreadable."""
        self.stages.replan(_CACHED)
        self.stages.report("base", 0.0, f"unpacking the cached {self.spec.suite} base")
        try:
            size = max(self.entry.stat().st_size, 1)
        except FileNotFoundError:  # dropped as unreadable by another build
            return False

        def on_line(line: str) -> None:
            match = _CHECKPOINT.search(line)
            if match:
                done = int(match[1]) * 10240  # %u counts tar's 10 KiB records
                self.stages.report(
                    "base", done / size, f"unpacking the cached base: {done >> 20} MiB"
                )

        argv = [
            "tar",
            "--extract",
            f"--file={self.entry}",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            f"--checkpoint={_CHECKPOINT_RECORDS}",
            "--checkpoint-action=echo=kdlab-checkpoint %u",
            f"--directory={self.root}",
        ]
        try:
            await self._tool(argv, "unpacking the cached base", "unreadable", on_line)
        except RootfsBuildError as err:
            self.log.warning("rootfs.cache_unreadable", error=str(err))
            with contextlib.suppress(FileNotFoundError):
                self.entry.unlink()
            await self._empty_root()
            return False
        self.log.info("rootfs.cache_hit")
        return True

    async def _tool(
        self,
        argv: Sequence[str],
        what: str,
        hint: str,
        on_line: Callable[[str], None] | None = None,
        *,
        writes: Path | None = None,
        network: bool = False,
        chroot_shim: Path | None = None,
        on_spawn: Callable[[], None] | None = None,
    ) -> None:
        """Run one tool of the build, writing only *writes* (default: the tree)."""
        await _run(
            argv,
            what,
            hint,
            on_line,
            sandbox=self.sandbox,
            writable=(writes or self.root,),
            network=network,
            chroot_shim=chroot_shim,
            on_spawn=on_spawn,
        )

    async def _empty_root(self) -> None:
        await self._remove_tree(self.root)
        self.root.mkdir(mode=0o755)

    def _remove_stale_temporaries(self) -> None:
        """Partial cache files of crashed builds (under the lock: none is live)."""
        for path in self.cache_dir.glob(f".{self.key}.*.tmp"):
            path.unlink(missing_ok=True)

    async def _debootstrap(self) -> None:
        self.log.info("rootfs.debootstrap", packages=include_packages(self.spec))
        self.stages.replan(_UNCACHED)
        self.stages.report("base", 0.0, f"debootstrap {self.spec.suite}")
        parser = DebootstrapProgress(expected_packages(self.spec))

        def on_line(line: str) -> None:
            crash_point("build.debootstrap-running")
            seen = parser.feed(line)
            if seen is not None:
                self.stages.report("base", *seen)

        if not DEBIAN_KEYRING.is_file():
            raise RootfsBuildError(
                f"{DEBIAN_KEYRING} is missing on kdlabd's host, so the mirror's "
                "signatures cannot be checked (apt-get install debian-archive-keyring)"
            )
        hint = (
            f"check the suite and packages, and that kdlabd's host reaches "
            f"{self.spec.mirror} (a mirror of Debian, signed by Debian's keys)"
        )
        argv = debootstrap_argv(self.spec, self.root)
        self.leftovers.append(self.shim)
        await _in_thread(self._write_shim)
        try:
            await self._tool(
                argv, "debootstrap", hint, on_line, network=True, chroot_shim=self.shim
            )
        except RootfsBuildError as err:
            raise self._with_debootstrap_log(err) from None

    def _write_shim(self) -> None:
        """The chroot that debootstrap's commands in the tree go through."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(self.shim, flags, 0o700), "w") as file:
            file.write(self.sandbox.chroot_shim())

    def _with_debootstrap_log(self, err: RootfsBuildError) -> RootfsBuildError:
        """debootstrap's output ends with "see debootstrap.log": add its tail."""
        path = self.root / "debootstrap" / "debootstrap.log"
        try:
            with path.open(errors="replace") as file:
                tail = deque(file, maxlen=TAIL_LINES)
        except OSError:
            return err
        lines = "\n".join(f"  {line.rstrip()}" for line in tail)
        return RootfsBuildError(f"{err}\nThe end of debootstrap.log:\n{lines}")

    async def _store(self) -> None:
        """Keep the pristine tree: written aside, synced, then renamed into place."""
        self.stages.report("store", 0.0, "storing the base in the cache")
        tmp = self.cache_dir / f".{self.key}.{secrets.token_hex(4)}.tmp"
        self.leftovers.append(tmp)
        argv = [
            "tar",
            "--create",
            f"--file={tmp}",
            "--one-file-system",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            f"--directory={self.root}",
            ".",
        ]
        await self._tool(
            argv,
            "storing the base in the cache",
            "check the cache's disk",
            writes=self.cache_dir,
        )
        await _in_thread(_fsync, tmp)
        os.replace(tmp, self.entry)
        await _in_thread(_fsync, self.cache_dir)
        self.log.info("rootfs.cached", entry=str(self.entry))

    def _configure(self) -> None:
        try:
            configure_tree(self.root, self.spec, self.agent_binary)
        except OSError as err:
            raise RootfsBuildError(
                f"configuring the root file system failed: {err}"
            ) from err

    async def _image(self) -> None:
        size = self.spec.size_bytes
        self.stages.report("image", 0.0, f"making the ext4 image ({size // MIB} MiB)")
        self.leftovers.append(self.partial)
        # Made here so the image is root's alone from the start (0600).
        os.close(os.open(self.partial, os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        argv = mke2fs_argv(self.root, self.partial, size)
        hint = f"if it ran out of space, build with a size above {size // MIB} MiB"
        await self._tool(
            argv,
            "mke2fs",
            hint,
            writes=self.partial,
            on_spawn=lambda: crash_point("build.mke2fs-running"),
        )
        os.replace(self.partial, self.output)

    async def _remove_leftovers(self) -> None:
        for path in reversed(self.leftovers):
            if path == self.root:
                await self._remove_tree(path)
            else:
                path.unlink(missing_ok=True)
        if self.made_scratch:
            with contextlib.suppress(OSError):
                self.scratch_dir.rmdir()

    async def _remove_tree(self, path: Path) -> None:
        """Remove a build tree; ``--one-file-system`` never descends into a mount."""
        if not path.exists():
            return
        try:
            argv = ["rm", "-rf", "--one-file-system", "--", str(path)]
            hint = "is something mounted there?"
            await self._tool(argv, f"removing {path}", hint, writes=path.parent)
        except RootfsBuildError as err:
            log.error("rootfs.cleanup_failed", path=str(path), error=str(err))


async def build_rootfs(
    spec: RootfsSpec,
    scratch_dir: Path,
    cache_dir: Path,
    output: Path,
    progress: Progress,
    *,
    agent_binary: Path,
    sandbox: BuildSandbox | None = None,
) -> None:
    """Build *spec* as a raw ext4 image at *output* (replaced only on success),
    with *agent_binary* as its exec agent (:func:`build_agent`).

    *scratch_dir* is this build's own (created if missing): the tree is made in
    ``scratch_dir/root`` and removed, as are scratch_dir if it was created here,
    the partial image and any partial cache entry, whether the build succeeds,
    fails (:class:`RootfsBuildError`, :class:`InvalidArgument`) or is cancelled.
    Bases are cached in *cache_dir*; concurrent builds of one base wait for the
    first. *progress* is called on the loop and may raise to stop the build.
    Every tool runs confined by *sandbox* (a new one if not given), whose token
    the caller may have journalled to kill what a crash leaves running.
    """
    _check_host(spec, output)
    sandbox = sandbox or BuildSandbox()
    build = _Build(
        spec,
        scratch_dir,
        cache_dir,
        output,
        progress,
        agent_binary=agent_binary,
        sandbox=sandbox,
    )
    await build.run()
