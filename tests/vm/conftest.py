"""The vm tier: real libvirtd (qemu:///system), QEMU under TCG, Debian's kernels.

kdlabd runs on a private bus with its own state directory and boot pool, so
the tier never touches a kdlabd the developer may be running; its VMs still
are real domains in the system libvirtd, named ``kdlab-vmt-*``, and every test
removes what it made.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require, require_root, require_tool
from tests.fixtures import debian
from tests.harness import Kdlabd, PrivateBus, kdlabctl

LIBVIRT_URI = "qemu:///system"
TEST_POOL = "kdlab-vmtest-boot"
MARKER = debian.DEFAULT_MARKER

pytestmark = pytest.mark.vm


@dataclass(frozen=True)
class Lab:
    """A kdlabd on real libvirt, and the Debian kernel + initramfs to boot."""

    address: str
    daemon: Kdlabd
    kernel: debian.CloudKernel
    initramfs: Path

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return kdlabctl(self.address, *args, timeout=timeout)


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", LIBVIRT_URI, *args], capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    require_root()
    require_tool("qemu-system-x86_64", "qemu-system-x86")
    require_tool("virsh", "libvirt-clients")
    require_tool("dbus-daemon", "dbus-daemon")
    require(Path("/run/libvirt/libvirt-sock").exists(), "a running libvirtd (libvirtd -d)")
    require(virsh("version").returncode == 0, f"libvirtd answering on {LIBVIRT_URI}")
    try:
        kernel = debian.cloud_kernel()
        initramfs = debian.busybox_initramfs(MARKER)
    except debian.FixtureError as err:
        require(False, f"Debian kernel fixtures: {err}")
        raise
    # QEMU (the libvirt-qemu user) must traverse to the boot volumes and the
    # gdb socket: pytest's temporary directories are 0700, /var/tmp is not.
    root = Path(tempfile.mkdtemp(prefix="kdlab-vmtest-", dir="/var/tmp"))
    root.chmod(0o711)
    runtime_dir = root / "run"
    bus = PrivateBus(root / "bus")
    daemon = Kdlabd(
        address=bus.address,
        libvirt_uri=LIBVIRT_URI,
        state_dir=root / "state",
        runtime_dir=runtime_dir,
        extra_args=("--accel", "tcg"),
        config_text=f'boot_pool = "{TEST_POOL}"\n',
    )
    daemon.start()
    try:
        yield Lab(bus.address, daemon, kernel, initramfs)
    finally:
        code = daemon.stop()
        log = daemon.log()
        bus.stop()
        virsh("pool-destroy", TEST_POOL)
        virsh("pool-undefine", TEST_POOL)
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0, log
    assert "Traceback" not in log, log


@pytest.fixture
def vm_name(lab: Lab) -> Iterator[str]:
    """A fresh VM name; whatever the test leaves of it is removed afterwards."""
    name = f"vmt-{uuid.uuid4().hex[:8]}"
    yield name
    lab.ctl("delete", "--force", name)
    virsh("destroy", f"kdlab-{name}")
    virsh("undefine", f"kdlab-{name}")
