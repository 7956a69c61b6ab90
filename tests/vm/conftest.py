"""The vm tier: real libvirtd (qemu:///system), QEMU under TCG, Debian's kernels.

kdlabd runs on a private bus with its own state directory and boot pool (see
:func:`tests.support.system.system_kdlabd`); its VMs are real domains in the system
libvirtd, named ``kdlab-vmt-*``, and every test removes what it made.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import debian, kernel_tree
from tests.support.bus import BusClient
from tests.support.clients import Identity, kdlabctl
from tests.support.daemon import Kdlabd
from tests.support.prereq import require, require_root, require_tool
from tests.support.system import remove_vm, system_kdlabd, virsh
from tests.support.timeouts import CTL_TIMEOUT

# Per test session: two sessions on one libvirtd must not share (or delete)
# each other's pools.
POOL_PREFIX = f"kdlab-vmtest{os.getpid()}"
TEST_POOL = f"{POOL_PREFIX}-boot"
MARKER = debian.DEFAULT_MARKER
TEST_USER = "kdlabtest"

__all__ = ["MARKER", "TEST_POOL", "Lab", "virsh"]


@dataclass(frozen=True)
class Lab:
    """A kdlabd on real libvirt, and the Debian kernel + initramfs to boot."""

    daemon: Kdlabd
    kernel: debian.CloudKernel
    initramfs: Path

    def ctl(
        self, *args: str, timeout: float = CTL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return kdlabctl(self.daemon.address, *args, timeout=timeout)


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    require_root()
    require_tool("qemu-system-x86_64", "qemu-system-x86")
    require_tool("virsh", "libvirt-clients")
    require_tool("dbus-daemon", "dbus-daemon")
    require(
        Path("/run/libvirt/libvirt-sock").exists(), "a running libvirtd (libvirtd -d)"
    )
    require(virsh("version").returncode == 0, "libvirtd answering on qemu:///system")
    try:
        kernel = debian.cloud_kernel()
        initramfs = debian.busybox_initramfs(MARKER)
    except debian.FixtureError as err:
        require(False, f"Debian kernel fixtures: {err}")
        raise
    with system_kdlabd(POOL_PREFIX) as daemon:
        yield Lab(daemon, kernel, initramfs)


@pytest.fixture
def client(lab: Lab) -> Iterator[BusClient]:
    """A root dbus-next connection to the lab's kdlabd."""
    connection = BusClient(lab.daemon.address)
    yield connection
    connection.close()


@pytest.fixture
def vm_name(lab: Lab) -> Iterator[str]:
    """A fresh VM name; whatever the test leaves of it is removed afterwards."""
    name = f"vmt-{uuid.uuid4().hex[:8]}"
    yield name
    remove_vm(lab.daemon, name)


@pytest.fixture(scope="session")
def kdlab_user() -> Identity:
    """A system user in group kdlab (made here when missing: CI machines are
    throwaway). No polkit on the private bus: the group rule applies."""
    require_tool("useradd", "passwd")
    try:
        kdlab = grp.getgrnam("kdlab")
    except KeyError:
        require(False, "group kdlab (.ci/setup creates it with systemd-sysusers)")
        raise
    try:
        user = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell",
             "/usr/sbin/nologin", "--groups", "kdlab", TEST_USER],
            check=False,  # another session may have made it meanwhile
        )  # fmt: skip
        user = pwd.getpwnam(TEST_USER)
    groups = os.getgrouplist(TEST_USER, user.pw_gid)
    if kdlab.gr_gid not in groups:
        subprocess.run(["usermod", "-aG", "kdlab", TEST_USER], check=True)
        groups.append(kdlab.gr_gid)
    return Identity(user.pw_uid, user.pw_gid, tuple(groups))


@pytest.fixture(scope="session")
def vmlinux(lab: Lab) -> Path:
    """Debian's debug vmlinux of the cloud kernel the lab boots."""
    require_tool("gdb", "gdb")
    try:
        return debian.cloud_kernel_vmlinux(lab.kernel)
    except debian.FixtureError as err:
        require(False, f"Debian's debug vmlinux: {err}")
        raise


@pytest.fixture(scope="session")
def minimal_build() -> Path:
    """kdlab's minimal kernel, configured and built once (cached between runs)."""
    require_tool("gdb", "gdb")
    require_tool("make", "make")
    try:
        return kernel_tree.built_minimal_kernel()
    except debian.FixtureError as err:
        require(False, f"the minimal kernel build: {err}")
        raise
