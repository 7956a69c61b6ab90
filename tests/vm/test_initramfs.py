"""kdlabctl's initramfs boots Debian's cloud kernel on a virtio disk, under bare QEMU.

The kernel has virtio_blk and virtio_pci as modules, so the marker that the disk's
/sbin/init prints proves that the modules loaded in order, the root was found and
mounted, and switch_root handed over. No libvirt or kdlabd here: only the initramfs.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

from kdlabctl import initramfs
from tests.support import debian
from tests.support.prereq import require, require_tool
from tests.support.system import BareGuest as Guest

pytestmark = pytest.mark.vm

MARKER = "KDLAB-ROOT-MOUNTED"
GAVE_UP = b"kdlab-initramfs: emergency shell"
CMDLINE = "console=ttyS0 root=/dev/vda rw panic=-1"
GUEST_INIT = f"""\
#!/bin/busybox sh
/bin/busybox echo "{MARKER} $(/bin/busybox cat /proc/cmdline)"
/bin/busybox poweroff -f
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    qemu = require_tool("qemu-system-x86_64", "qemu-system-x86")
    mke2fs = require_tool("mke2fs", "e2fsprogs")
    try:
        kernel = debian.cloud_kernel()
        busybox = initramfs.static_busybox()
    except (debian.FixtureError, initramfs.InitramfsError) as err:
        require(False, f"Debian's cloud kernel and busybox-static ({err})")
        raise
    work = tmp_path_factory.mktemp("initramfs")
    initrd = work / "initrd.cpio.gz"
    initrd.write_bytes(initramfs.build(kernel.modules_dir))
    tree = work / "root"
    for directory in ("bin", "sbin", "dev", "proc", "sys"):
        (tree / directory).mkdir(parents=True)
    (tree / "bin/busybox").write_bytes(busybox)
    (tree / "bin/busybox").chmod(0o755)
    (tree / "sbin/init").write_text(GUEST_INIT)
    (tree / "sbin/init").chmod(0o755)
    disk = work / "root.img"
    subprocess.run(
        [mke2fs, "-q", "-F", "-t", "ext4", "-d", str(tree), str(disk), "64M"],
        check=True,
        capture_output=True,
    )
    return Guest(qemu, kernel.vmlinuz, initrd, disk)


def boot(guest: Guest, cmdline: str, timeout: float = 120) -> str:
    """Boot *cmdline*; return the console when QEMU exits or the initramfs gives up."""
    with subprocess.Popen(
        guest.command(cmdline),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as qemu:
        assert qemu.stdout is not None
        try:
            return read_console(qemu.stdout.fileno(), timeout)
        finally:
            qemu.kill()


def read_console(fd: int, timeout: float) -> str:
    output = b""
    deadline = time.monotonic() + timeout
    while GAVE_UP not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tail = output.decode(errors="replace")[-3000:]
            raise AssertionError(f"QEMU still runs after {timeout} s:\n{tail}")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            output += chunk
    return output.decode(errors="replace")


def test_modules_loaded_root_mounted_and_switched_to(guest: Guest) -> None:
    console = boot(guest, CMDLINE)
    assert f"{MARKER} {CMDLINE}" in console, console[-3000:]
    assert "kdlab-initramfs: mounted /dev/vda with rw, starting /sbin/init" in console
    assert "cannot load module" not in console


def test_wrong_root_device_named_with_the_disks_there(guest: Guest) -> None:
    cmdline = CMDLINE.replace("root=/dev/vda", "root=/dev/sda")
    console = boot(guest, cmdline)
    (message,) = [line for line in console.splitlines() if "did not appear" in line]
    assert "kdlab-initramfs: root device /dev/sda" in message
    assert message.rstrip().endswith("block devices: vda")
    assert MARKER not in console
