"""A real Debian root file system: debootstrap from Debian's mirror, then booted.

:func:`kdlabd.host.rootfs.build_rootfs` builds bookworm twice, with a cache of
this run's own: the first build always runs debootstrap from Debian's mirror
(about 40 s here; a cache kept across runs would hide a broken bootstrap),
the second must come from the cache the first filled. Both run kdlab's exec
agent, compiled as kdlabd compiles it. The image is read with debugfs, never
mounted. Last, Debian's cloud kernel boots it under bare QEMU (TCG) with
kdlabctl's initramfs, to systemd's autologin shell on ttyS0 (``kdlabctl exec``
on a built image is in ``tests/vm/test_images.py``).

Timings are printed (``pytest -s``), not asserted: speed belongs in bench/.

The confinement of a build is probed by another real, never cached debootstrap
(its debootstrap step only, not a whole build): the tree is seeded with a dpkg
hook (``post-invoke``), which dpkg runs in the chroot the way it runs
maintainer scripts, after each of debootstrap's dpkg calls. The hook writes
what it sees: processes, capabilities, namespaces, network.
"""

from __future__ import annotations

import asyncio
import base64
import os
import select
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdlab import agent
from kdlabctl import initramfs
from kdlabd.core.rootfs import RootfsSpec
from kdlabd.host import rootfs
from kdlabd.host.rootfs import (
    AGENT_BINARY,
    AGENT_UNIT,
    AGENT_WANTS,
    AUTOLOGIN_CONF,
    AUTOLOGIN_DROP_IN,
    FSTAB,
    MASKED_UNITS,
    SSH_HOST_KEYS_DROP_IN,
    build_agent,
    build_rootfs,
)
from kdlabd.host.sandbox import BuildSandbox, in_target_capabilities
from tests.support import debian, figures
from tests.support.prereq import require, require_root, require_tool
from tests.support.system import BareGuest as Guest

pytestmark = pytest.mark.vm

HOSTNAME = "kdlab-vmt"
# A public key is just bytes of the right shape: no ssh-keygen needed.
_BLOB = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(32)
SSH_KEY = f"ssh-ed25519 {base64.b64encode(_BLOB).decode()} kdlab-vm-test"
SPEC = RootfsSpec("bookworm", ssh_key=SSH_KEY, hostname=HOSTNAME)
PROMPT = f"root@{HOSTNAME}:~#".encode()


@dataclass(frozen=True)
class Built:
    """The second (cached) build's image and what both builds reported."""

    image: Path
    agent: Path
    seconds: tuple[float, float]
    statuses: tuple[list[str], list[str]]


def build(
    scratch: Path, cache: Path, output: Path, agent: Path
) -> tuple[float, list[str]]:
    statuses: list[str] = []
    started = time.monotonic()
    asyncio.run(
        build_rootfs(
            SPEC,
            scratch,
            cache,
            output,
            lambda _f, s: statuses.append(s),
            agent_binary=agent,
        )
    )
    return time.monotonic() - started, statuses


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_root()
    for tool, package in [
        ("debootstrap", "debootstrap"),
        ("mke2fs", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("unshare", "util-linux"),
    ]:
        require_tool(tool, package)
    work = tmp_path_factory.mktemp("rootfs")
    cache = work / "cache"
    agent = asyncio.run(build_agent(cache))
    first = build(work / "scratch1", cache, work / "first.raw", agent)
    second = build(work / "scratch2", cache, work / "second.raw", agent)
    (work / "first.raw").unlink()
    seconds, statuses = (first[0], second[0]), (first[1], second[1])
    return Built(work / "second.raw", agent, seconds, statuses)


# --- what a package's script sees during a real debootstrap ----------------------

PROBE_HOOK = "etc/dpkg/dpkg.cfg.d/kdlab-probe"
PROBE_SCRIPT = "kdlab-probe.sh"
PROBE_OUT = "kdlab-probe.out"
PROBE = r"""{
echo probe
for p in /proc/[0-9]*; do
    echo "process ${p#/proc/} $(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)"
done
grep -E '^(CapBnd|CapEff|NoNewPrivs):' /proc/self/status
echo "ns-net $(readlink /proc/self/ns/net)"
echo "ns-pid $(readlink /proc/self/ns/pid)"
echo "net-devices $(grep -c : /proc/self/net/dev)"
echo "hostname $(uname -n)"
echo "sys $(ls -A /sys 2>/dev/null | wc -l)"
echo "proc-sys $(ls -A /proc/sys 2>/dev/null | wc -l)"
} >> /kdlab-probe.out 2>&1
exit 0
"""


@dataclass(frozen=True)
class Probed:
    """What the dpkg hook wrote on each run, and debootstrap's statuses."""

    runs: list[list[str]]
    statuses: list[str]
    host_marker: str


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Probed:
    require_root()
    require_tool("debootstrap", "debootstrap")
    work = tmp_path_factory.mktemp("probe")
    # A host process with a command line of its own: the build must not see it.
    host_marker = f"600.{os.getpid()}"
    statuses: list[str] = []
    build = rootfs._Build(
        RootfsSpec("bookworm"),
        work / "scratch",
        work / "cache",
        work / "unused.raw",
        lambda _f, status: statuses.append(status),
        agent_binary=work / "unused-agent",
        sandbox=BuildSandbox(),
    )
    build._make_root()  # the very steps of a build, on a seeded tree
    (build.root / PROBE_HOOK).parent.mkdir(parents=True)
    (build.root / PROBE_HOOK).write_text(f"post-invoke=/bin/sh /{PROBE_SCRIPT}\n")
    (build.root / PROBE_SCRIPT).write_text(PROBE)
    started = time.monotonic()
    with subprocess.Popen(["sleep", host_marker]) as marker:
        try:
            asyncio.run(build._debootstrap())
            text = (build.root / PROBE_OUT).read_text(errors="replace")
        finally:
            marker.kill()
            asyncio.run(build._remove_leftovers())
    print(f"\nuncached debootstrap: {time.monotonic() - started:.1f} s")
    assert not (work / "scratch").exists()
    runs = [run.splitlines() for run in text.split("probe\n")[1:]]
    return Probed(runs, statuses, host_marker)


def test_debootstrap_checked_the_mirrors_signature(probed: Probed) -> None:
    assert "Checking Release signature" in probed.statuses
    assert any(s.startswith("Valid Release signature") for s in probed.statuses)


def test_package_scripts_see_only_the_builds_processes(probed: Probed) -> None:
    assert len(probed.runs) >= 3, "dpkg ran the hook on each of debootstrap's calls"
    host = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    assert len(host) > 50, "the host runs far more (libvirtd, dbus-daemon, ...)"
    for run in probed.runs:
        processes = [line.split()[1:] for line in run if line.startswith("process ")]
        assert processes, run
        assert len(processes) < 30, processes
        programs = {Path(words[1]).name for words in processes if len(words) > 1}
        assert not programs & {"libvirtd", "dbus-daemon", "virtlogd"}, programs
        assert probed.host_marker not in str(processes)
        assert "dpkg" in programs, "its own parent is there"


def fields(run: list[str]) -> dict[str, str]:
    found = {}
    for line in run:
        key, sep, value = line.partition(":\t" if ":\t" in line else " ")
        if sep and key != "process":
            found[key] = value
    return found


def test_package_scripts_run_without_network_or_dangerous_capabilities(
    probed: Probed,
) -> None:
    host_net = os.readlink("/proc/self/ns/net")
    host_pid = os.readlink("/proc/self/ns/pid")
    allowed = sum(1 << cap for cap in in_target_capabilities())
    for run in probed.runs:
        found = fields(run)
        assert int(found["CapBnd"], 16) == allowed, run
        assert int(found["CapEff"], 16) == allowed
        assert found["NoNewPrivs"] == "1"
        assert found["ns-net"] != host_net
        assert found["net-devices"] == "1", "lo only"
        assert found["ns-pid"] != host_pid
        assert found["hostname"] == "kdlab-build"
        assert found["sys"] == "0", "no /sys"
        assert found["proc-sys"] == "0", "no /proc/sys"


def bootstrapped(statuses: list[str]) -> bool:
    return any(status.startswith("debootstrap ") for status in statuses)


def debugfs(image: Path, request: str) -> str:
    done = subprocess.run(
        ["debugfs", "-R", request, str(image)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_first_build_bootstraps_and_the_second_comes_from_the_cache(
    built: Built,
) -> None:
    first, second = built.statuses
    uncached = figures.record(
        "rootfs builds that ran debootstrap uncached in this run",
        int(bootstrapped(first)),
        ">= 1",
        detail=f"debootstrap build {built.seconds[0]:.0f} s, "
        f"then from its cache {built.seconds[1]:.0f} s",
    )
    assert uncached.met, first[:5]
    assert any(s.startswith("downloading systemd ") for s in first)
    assert "storing the base in the cache" in first
    assert not bootstrapped(second), second[:5]
    assert second[0] == "unpacking the cached bookworm base"
    assert second[-1] == "built second.raw"


def test_image_is_a_clean_labelled_ext4(built: Built) -> None:
    assert built.image.stat().st_size == SPEC.size_bytes
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(built.image)], capture_output=True, text=True, check=False
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    header = subprocess.run(
        ["dumpe2fs", "-h", str(built.image)], capture_output=True, text=True, check=True
    ).stdout
    assert "Filesystem volume name:   kdlab-root" in header
    features = next(line for line in header.splitlines() if "features:" in line)
    assert "orphan_file" not in features, "kernels before 5.15 could not mount it"


def test_configured_files_in_the_image(built: Built) -> None:
    image = built.image
    assert debugfs(image, "cat /etc/fstab") == FSTAB
    assert debugfs(image, "cat /etc/hostname") == f"{HOSTNAME}\n"
    assert f"127.0.1.1\t{HOSTNAME}" in debugfs(image, "cat /etc/hosts")
    assert debugfs(image, f"cat /{AUTOLOGIN_DROP_IN}") == AUTOLOGIN_CONF
    shadow = debugfs(image, "cat /etc/shadow").splitlines()
    assert shadow[0].startswith("root::"), "empty root password"
    assert debugfs(image, "cat /etc/machine-id") == ""
    assert debugfs(image, "cat /root/.ssh/authorized_keys") == SSH_KEY + "\n"
    assert "Mode:  0600" in debugfs(image, "stat /root/.ssh/authorized_keys")
    assert "ExecStartPre=/usr/bin/ssh-keygen -A" in debugfs(
        image, f"cat /{SSH_HOST_KEYS_DROP_IN}"
    )
    assert "ssh_host_" not in debugfs(image, "ls /etc/ssh"), "no shared host keys"
    units = debugfs(image, "ls -l /etc/systemd/system")
    for unit in MASKED_UNITS:
        assert unit in units
    masked = debugfs(image, "stat /etc/systemd/system/apt-daily.timer")
    assert "Type: symlink" in masked
    assert 'Fast link dest: "/dev/null"' in masked
    assert "agetty" in debugfs(image, "ls /usr/sbin"), "the drop-in's program"


def test_the_image_runs_kdlabs_agent_at_boot(built: Built, tmp_path: Path) -> None:
    """The agent kdlabd built, root's and executable, its unit enabled."""
    image = built.image
    copy = tmp_path / "kdlab-agent"
    debugfs(image, f"dump /{AGENT_BINARY} {copy}")
    assert copy.read_bytes() == built.agent.read_bytes()
    binary = debugfs(image, f"stat /{AGENT_BINARY}")
    assert "Mode:  0755" in binary
    assert "User:     0   Group:     0" in binary
    assert debugfs(image, f"cat /{AGENT_UNIT}") == agent.UNIT.read_text()
    wants = debugfs(image, f"stat /{AGENT_WANTS}")
    assert "Type: symlink" in wants
    assert f'Fast link dest: "/{AGENT_UNIT}"' in wants


# Bonus: it boots.


@pytest.fixture(scope="module")
def guest(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    qemu = require_tool("qemu-system-x86_64", "qemu-system-x86")
    try:
        kernel = debian.cloud_kernel()
        initrd_bytes = initramfs.build(kernel.modules_dir)
    except (debian.FixtureError, initramfs.InitramfsError) as err:
        require(False, f"Debian's cloud kernel and busybox-static ({err})")
        raise
    initrd = tmp_path_factory.mktemp("rootfs-boot") / "initrd.cpio.gz"
    initrd.write_bytes(initrd_bytes)
    return Guest(
        qemu, kernel.vmlinuz, initrd, built.image, memory_mib=1024, snapshot=True
    )


class Console:
    """The serial console of a QEMU on stdio."""

    def __init__(self, qemu: subprocess.Popen[bytes]) -> None:
        assert qemu.stdin is not None
        assert qemu.stdout is not None
        self._qemu = qemu
        self._in = qemu.stdin
        self._fd = qemu.stdout.fileno()
        self.output = b""

    def expect(self, wanted: bytes, timeout: float, start: int = 0) -> int:
        """Wait for *wanted* after offset *start*; the offset just past it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(wanted, start)) < 0:
            remaining = deadline - time.monotonic()
            tail = self.output.decode(errors="replace")[-3000:]
            assert remaining > 0, f"no {wanted!r} after {timeout} s:\n{tail}"
            if select.select([self._fd], [], [], remaining)[0]:
                chunk = os.read(self._fd, 65536)
                assert chunk, f"QEMU exited:\n{tail}"
                self.output += chunk
        return found + len(wanted)

    def run(self, command: str, timeout: float = 60) -> str:
        """Type *command* at the shell; its output (up to the next prompt)."""
        start = len(self.output)
        self._in.write(command.encode() + b"\n")
        self._in.flush()
        end = self.expect(PROMPT, timeout, start)
        return self.output[start:end].decode(errors="replace")


def test_boots_to_the_autologin_shell(guest: Guest) -> None:
    cmdline = "console=ttyS0 root=/dev/vda rw panic=-1"
    started = time.monotonic()
    with subprocess.Popen(
        guest.command(cmdline),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as qemu:
        try:
            console = Console(qemu)
            console.expect(f"{HOSTNAME} login: root (automatic login)".encode(), 180)
            console.expect(PROMPT, 60)
            seconds = time.monotonic() - started
            print(f"\nboot to the autologin shell: {seconds:.1f} s (TCG)")
            # Markers built by the shell, so the echoed command never matches.
            assert "READY-42" in console.run("echo READY-$((6 * 7))")
            state = console.run(
                'echo "STATE=$(systemctl is-system-running --wait)"', timeout=120
            )
            failed = console.run("systemctl --failed --no-legend --plain")
            print(f"system state: {state!r}; failed units: {failed!r}")
            assert "STATE=running" in state, failed
            assert "SSH=active" in console.run('echo "SSH=$(systemctl is-active ssh)"')
            # Without a virtio-serial port (bare QEMU) it waits for one, quietly.
            waiting = console.run('echo "AGENT=$(systemctl is-active kdlab-agent)"')
            assert "AGENT=active" in waiting
            root = console.run('echo "ROOT=$(findmnt -n -o SOURCE,FSTYPE /)"')
            assert "ROOT=/dev/vda ext4" in root
        finally:
            qemu.kill()
