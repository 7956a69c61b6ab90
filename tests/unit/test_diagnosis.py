"""Boot diagnosis on console logs of real boots.

The logs in ``tests/golden/consoles`` are serial console output of Debian's
``linux-image-6.1.0-56-cloud-amd64`` (6.1.192-2; virtio_blk and virtio_pci are
modules there, NVMe, ext4 and the 8250 console built in), recorded byte for byte
with QEMU 7.2 (TCG, ``-M pc``, 512 MiB, ``-serial`` to a log file) unless the
list says otherwise:

- ``boot-shell-kdlabd.log``: recorded by kdlabd itself (libvirt, the busybox
  initramfs of ``tests/support/debian.py``), a shell with commands typed into it.
- ``boot-login.log``: kdlab's initramfs (``kdlab/kernel/initramfs.py``) mounts an
  ext4 virtio disk holding busybox init and getty: a login prompt.
- ``root-*``: no initrd. ``no-disk``: no disk; ``virtio-no-driver``: a virtio
  disk the kernel has no driver for; ``nvme-*``: an NVMe disk (its driver is
  built in) with ``root=/dev/sda``, with a partitioned image, and with
  ``rootfstype=xfs``.
- ``root-virtio-*-edited.log``: not recorded as such. They are what the same
  kernel prints with virtio_blk built in, made from ``root-virtio-no-driver``
  and ``root-nvme-partitioned``: the virtio_blk lines copied from
  ``initramfs-*`` recordings, the partition rows in printk_all_partitions()'s
  format (``%s %10llu %pg``, major 254 = ``fe00``), the command line renamed.
- ``rootwait-virtio-no-driver.log``: ``rootwait``, a virtio disk, no initrd.
- ``initramfs-*``: kdlab's initramfs with ``root=/dev/sda``, without a disk,
  with a partitioned image, with an empty ext4 image, with ``rootfstype=xfs``.
- ``init-*``: an empty ext4 root (``init-none-found``), ``init=/bin/sh`` on it,
  an initramfs whose /init exits 1, and that with ``panic=1``: two boots.
- ``panic-sysrq.log``: ``echo c > /proc/sysrq-trigger``.
- ``oops-*``, ``bug-on.log``, ``warn-on.log``: real reports of this kernel,
  provoked through QEMU's gdbstub while ``sync`` ran: RIP moved to a load
  through RAX=0 (NULL) or RAX=0xdead000000000000 (non-canonical), to the
  ``ud2`` of free_buffer_head()'s BUG_ON, and to __brelse()'s WARN.
- ``no-output.log``: empty, as the log stays without ``console=ttyS0``.
- ``userspace-*``: kdlab's userspace initramfs of ``linux-image-6.1.0-57-cloud-amd64``
  (6.1.192-3) under bare QEMU with a virtio-serial port ``org.kdlab.agent.0``, as
  kdlabctl builds it for a VM without an image, a command typed into its shell
  (``ready``); without the port, ``exit`` typed (``no-port``); with
  ``kdlab.shares=work,missing`` and only ``work`` served by virtiofsd
  (``share-missing``).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdlab.kernel import kconfig
from kdlab.kernel.diagnosis import (
    HEAD_SIZE,
    MAX_EVIDENCE,
    TAIL_SIZE,
    BootFacts,
    Code,
    Diagnosis,
    diagnose,
    public_fix,
)
from kdlab.kernel.findings import Severity
from kdlab.kernel.initramfs import (
    ANY_FSTYPE,
    CANNOT_MOUNT,
    CATALOGUE,
    DEVTMPFS_MISSING,
    EMERGENCY_SHELL,
    MODULE_FAILED,
    MOUNTED,
    NO_BLOCK_DEVICES,
    NO_INIT,
    READY,
    ROOT_MISSING,
    ROOT_UNSUPPORTED,
    Message,
    init_script,
    recognize,
    userspace_script,
)
from kdlabd.host.local import LocalHost
from tests.support import REPO
from tests.support.prereq import require

CONSOLES = REPO / "tests" / "golden" / "consoles"
KDLAB_CMDLINE = "root=/dev/vda rw console=ttyS0 nokaslr"
_STAMP = re.compile(r"\[\s*\d+\.\d{6}\] ?")


def facts(
    cmdline: str = KDLAB_CMDLINE,
    *,
    disks: tuple[str, ...] = ("vda",),
    has_initrd: bool = False,
    gdbstub: bool = True,
    seconds: float = 30.0,
    running: bool = True,
    paused: bool = False,
) -> BootFacts:
    return BootFacts(
        cmdline=cmdline,
        disks=disks,
        has_initrd=has_initrd,
        gdbstub=gdbstub,
        seconds_since_start=seconds,
        running=running,
        name="linux-6.1",
        paused=paused,
    )


def read_console_log(path: Path) -> str:
    """The log at *path* as kdlabd reads a VM's console log for diagnose."""
    return LocalHost().read_excerpt(path, HEAD_SIZE, TAIL_SIZE)


def console(name: str) -> str:
    return read_console_log(CONSOLES / f"{name}.log")


def diagnosed(name: str, boot: BootFacts) -> Diagnosis:
    found = diagnose(console(name), boot)
    assert found is not None, f"{name}: nothing found"
    return found


def diagnosed_text(log: str, boot: BootFacts) -> Diagnosis:
    found = diagnose(log, boot)
    assert found is not None
    return found


@dataclasses.dataclass(frozen=True)
class Case:
    log: str
    facts: BootFacts
    code: Code
    cause: tuple[str, ...] = ()
    fix: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    severity: Severity = Severity.ERROR


NVME = ("nvme0n1",)
NO_ROOT = "console=ttyS0 nokaslr"

CASES = {
    "userspace without the agent's port": Case(
        "userspace-no-port",
        facts(NO_ROOT, disks=(), has_initrd=True),
        Code.AGENT_UNREACHABLE,
        cause=("org.kdlab.agent.0", "kdlabctl exec"),
        fix=("CONFIG_VIRTIO_CONSOLE=y", "create it again"),
        evidence=("no virtio-serial port org.kdlab.agent.0",),
        severity=Severity.WARNING,
    ),
    "userspace with a share not served": Case(
        "userspace-share-missing",
        facts(f"{NO_ROOT} kdlab.shares=work,missing", disks=(), has_initrd=True),
        Code.SHARE_NOT_MOUNTED,
        cause=("missing", "Invalid argument"),
        fix=("CONFIG_VIRTIO_FS=y", "mount -t virtiofs"),
        evidence=("cannot mount share missing on /mnt/missing",),
        severity=Severity.WARNING,
    ),
    "no disk": Case(
        "root-no-disk",
        facts(disks=()),
        Code.ROOT_NO_DISK,
        cause=("no disk",),
        fix=("--image",),
        evidence=("Unable to mount root fs",),
    ),
    "virtio disk, no driver": Case(
        "root-virtio-no-driver",
        facts(),
        Code.ROOT_DRIVER_MISSING,
        cause=("/dev/vda", "no initramfs"),
        fix=("CONFIG_VIRTIO_BLK=y", "CONFIG_VIRTIO_PCI=y", "--modules"),
        evidence=('Cannot open root device "vda"', "Unable to mount root fs"),
    ),
    "root=/dev/sda on virtio": Case(
        "root-virtio-wrong-name-edited",
        facts("root=/dev/sda rw console=ttyS0 nokaslr"),
        Code.ROOT_DEVICE_MISSING,
        cause=("root=/dev/sda but the VM's disk is /dev/vda",),
        fix=("use root=/dev/vda",),
        evidence=("fe00      65536 vda", 'Cannot open root device "sda"'),
    ),
    "root=/dev/sda on nvme": Case(
        "root-nvme-wrong-name",
        facts("root=/dev/sda rw console=ttyS0 nokaslr", disks=NVME),
        Code.ROOT_DEVICE_MISSING,
        cause=("root=/dev/sda", "/dev/nvme0n1"),
        fix=("use root=/dev/nvme0n1",),
    ),
    "partitioned virtio disk": Case(
        "root-virtio-partitioned-edited",
        facts(),
        Code.ROOT_PARTITIONED,
        cause=("root=/dev/vda", "vda1"),
        fix=("use root=/dev/vda1",),
        evidence=("List of all partitions:", "fe01      64512 vda1"),
    ),
    "partitioned nvme disk": Case(
        "root-nvme-partitioned",
        facts("root=/dev/nvme0n1 rw console=ttyS0 nokaslr", disks=NVME),
        Code.ROOT_PARTITIONED,
        fix=("use root=/dev/nvme0n1p1",),
    ),
    "rootfstype=xfs without xfs": Case(
        "root-nvme-rootfstype-xfs",
        facts("root=/dev/nvme0n1 rootfstype=xfs rw console=ttyS0", disks=NVME),
        Code.ROOT_FS_MISSING,
        cause=("xfs",),
        fix=("CONFIG_XFS_FS=y",),
        evidence=("error -19",),
    ),
    "rootwait, no driver": Case(
        "rootwait-virtio-no-driver",
        facts("root=/dev/vda rootwait rw console=ttyS0 nokaslr"),
        Code.ROOT_DRIVER_MISSING,
        fix=("CONFIG_VIRTIO_BLK=y",),
        evidence=("Waiting for root device /dev/vda",),
    ),
    "initramfs: root=/dev/sda": Case(
        "initramfs-wrong-root",
        facts("root=/dev/sda rw console=ttyS0 nokaslr", has_initrd=True),
        Code.ROOT_DEVICE_MISSING,
        cause=("root=/dev/sda but the VM's disk is /dev/vda",),
        fix=("use root=/dev/vda",),
        evidence=("kdlab-initramfs: root device /dev/sda did not appear",),
    ),
    "initramfs: no disk": Case(
        "initramfs-no-disk", facts(disks=(), has_initrd=True), Code.ROOT_NO_DISK
    ),
    "initramfs: partitioned disk": Case(
        "initramfs-partitioned",
        facts(has_initrd=True),
        Code.ROOT_PARTITIONED,
        fix=("use root=/dev/vda1",),
        evidence=("vda: vda1", "mount: mounting /dev/vda on /newroot failed"),
    ),
    "initramfs: rootfstype=xfs": Case(
        "initramfs-rootfstype-xfs",
        facts("root=/dev/vda rootfstype=xfs rw console=ttyS0 nokaslr", has_initrd=True),
        Code.ROOT_FS_MISSING,
        cause=("no xfs filesystem", "ext3 ext2 ext4"),
        fix=("CONFIG_XFS_FS=y",),
    ),
    "initramfs: no /sbin/init": Case(
        "initramfs-no-init",
        facts(has_initrd=True),
        Code.INIT_MISSING,
        cause=("the root filesystem /dev/vda has no /sbin/init",),
        fix=("init=",),
    ),
    "no init at all": Case(
        "init-none-found",
        facts("root=/dev/nvme0n1 rw console=ttyS0 nokaslr", disks=NVME),
        Code.INIT_MISSING,
        cause=("/sbin/init, /etc/init, /bin/init, /bin/sh",),
        fix=("init=",),
        evidence=("VFS: Mounted root (ext4 filesystem)", "No working init found"),
    ),
    "init=/bin/sh missing": Case(
        "init-requested-missing",
        facts("root=/dev/nvme0n1 rw console=ttyS0 init=/bin/sh", disks=NVME),
        Code.INIT_MISSING,
        cause=("init /bin/sh does not exist",),
        evidence=("Requested init /bin/sh failed (error -2)",),
    ),
    "init exits": Case(
        "init-exits",
        facts(NO_ROOT, disks=(), has_initrd=True),
        Code.INIT_DIED,
        cause=("exited with status 1",),
        fix=("poweroff -f",),
        evidence=("init: nothing to do", "Attempted to kill init! exitcode=0x00000100"),
    ),
    "sysrq crash": Case(
        "panic-sysrq",
        facts(NO_ROOT, disks=(), has_initrd=True),
        Code.KERNEL_PANIC,
        cause=("sysrq triggered crash",),
        fix=("kdlabctl logs linux-6.1", "kdlabctl gdb linux-6.1"),
        evidence=("sysrq: Trigger a crash", "sysrq_handle_crash+0x16/0x20"),
    ),
    "NULL pointer oops": Case(
        "oops-null-pointer",
        facts(NO_ROOT, disks=(), has_initrd=True),
        Code.KERNEL_OOPS,
        cause=("NULL pointer dereference", "wakeup_flusher_threads+0x17/0xb0", "sync"),
        fix=("list *(wakeup_flusher_threads+0x17)", "kdlabctl logs linux-6.1"),
        evidence=("Oops: 0000 [#1]", "RIP: 0010:wakeup_flusher_threads+0x17/0xb0"),
    ),
    "general protection fault": Case(
        "oops-general-protection",
        facts(NO_ROOT, disks=(), has_initrd=True),
        Code.KERNEL_OOPS,
        cause=("general protection fault", "0xdead000000000cf0"),
        evidence=("general protection fault",),
    ),
    "BUG_ON": Case(
        "bug-on",
        facts(NO_ROOT, disks=(), has_initrd=True),
        Code.KERNEL_BUG,
        cause=("fs/buffer.c:2918", "free_buffer_head"),
        fix=("break fs/buffer.c:2918",),
        evidence=("kernel BUG at fs/buffer.c:2918!", "invalid opcode"),
    ),
    "WARN": Case(
        "warn-on",
        facts(NO_ROOT, disks=(), has_initrd=True),
        Code.KERNEL_WARNING,
        cause=("fs/buffer.c:1145", "__brelse", "Trying to free free buffer"),
        evidence=("WARNING: CPU: 0 PID: 83 at fs/buffer.c:1145",),
        severity=Severity.WARNING,
    ),
    "no console=ttyS0": Case(
        "no-output",
        facts("root=/dev/vda rw nokaslr", has_initrd=True),
        Code.NO_CONSOLE_OUTPUT,
        cause=("console=ttyS0 is missing",),
        fix=("add console=ttyS0",),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_recorded_boot(case: Case) -> None:
    found = diagnosed(case.log, case.facts)
    assert (found.code, found.severity) == (case.code, case.severity), found
    for words in case.cause:
        assert words in found.problem, found.problem
    for words in case.fix:
        assert words in found.fix, found.fix
    for words in case.evidence:
        assert any(words in line for line in found.evidence), found.evidence


@pytest.mark.parametrize(
    ("log", "boot"),
    [
        (
            "boot-shell-kdlabd",
            facts("console=ttyS0 nokaslr", disks=(), has_initrd=True),
        ),
        ("boot-login", facts(has_initrd=True)),
        ("userspace-ready", facts(NO_ROOT, disks=(), has_initrd=True)),
    ],
)
def test_a_good_boot_has_no_diagnosis(log: str, boot: BootFacts) -> None:
    assert diagnose(console(log), boot) is None


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_evidence_is_quoted_from_the_log(case: Case) -> None:
    found = diagnosed(case.log, case.facts)
    assert "\n" not in found.problem
    assert "\n" not in found.fix
    assert len(found.evidence) <= MAX_EVIDENCE
    log = console(case.log).replace("\r", "")
    for line in found.evidence:
        assert line in log


# One kernel message, several causes: the facts decide.


def test_the_same_panic_means_no_disk_or_no_driver() -> None:
    log = console("root-virtio-no-driver")
    assert diagnosed_text(log, facts(disks=())).code is Code.ROOT_NO_DISK
    assert diagnosed_text(log, facts()).code is Code.ROOT_DRIVER_MISSING


def test_driver_missing_with_an_initrd_blames_the_initramfs() -> None:
    found = diagnosed("root-virtio-no-driver", facts(has_initrd=True))
    assert found.code is Code.ROOT_DRIVER_MISSING
    assert "the initramfs did not load" in found.problem


def test_initramfs_without_devices_is_a_missing_driver_when_the_vm_has_a_disk() -> None:
    found = diagnosed("initramfs-no-disk", facts(has_initrd=True))
    assert found.code is Code.ROOT_DRIVER_MISSING


def test_a_partition_on_a_whole_disk_image_names_the_disk() -> None:
    found = diagnosed("root-virtio-wrong-name-edited", facts("root=/dev/vda1 rw"))
    assert found.code is Code.ROOT_DEVICE_MISSING
    assert "/dev/vda has no partitions" in found.problem
    assert found.fix == "use root=/dev/vda"


def test_root_on_the_wrong_disk_names_all_of_the_vms_disks() -> None:
    found = diagnosed(
        "root-virtio-wrong-name-edited", facts("root=/dev/sda rw", disks=("vda", "vdb"))
    )
    assert found.code is Code.ROOT_DEVICE_MISSING
    # vdb was not listed by the kernel, so only vda can be named.
    assert found.problem == "root=/dev/sda but the VM's disk is /dev/vda"


def test_root_uuid_without_an_initramfs() -> None:
    found = diagnosed("root-virtio-wrong-name-edited", facts("root=UUID=1234-abcd"))
    assert found.code is Code.ROOT_DEVICE_MISSING
    assert "needs an initramfs" in found.problem
    assert "root=/dev/vda" in found.fix


def test_no_root_parameter_at_all() -> None:
    found = diagnosed("root-virtio-wrong-name-edited", facts("console=ttyS0"))
    assert found.code is Code.ROOT_DEVICE_MISSING
    assert found.fix == "add root=/dev/vda to the command line"


def whole_nvme_disk(log: str) -> str:
    """root-nvme-partitioned without its partition: an unformatted whole disk."""
    return re.sub(r".*103:00001.*\n", "", log).replace(" nvme0n1: p1", "")


def test_a_disk_no_filesystem_takes() -> None:
    """The device is there, whole, and none of ext3, ext2, ext4 mounts it."""
    log = whole_nvme_disk(console("root-nvme-partitioned"))
    found = diagnosed_text(log, facts("root=/dev/nvme0n1 rw", disks=NVME))
    assert found.code is Code.ROOT_MOUNT_FAILED
    assert "/dev/nvme0n1" in found.problem
    assert "CONFIG_EXT4_FS=y" in found.fix


def test_filesystems_tried_without_ext4() -> None:
    """6.1 prints each filesystem it tried as a line of its own."""
    log = whole_nvme_disk(console("root-nvme-partitioned"))
    log = re.sub(r"\[[ .\d]+\]  ext[23]\r\n", "", log)
    log = log.replace("]  ext4\r\n", "]  vfat\r\n")
    assert "]  vfat\r\n" in log
    assert "ext3" not in log
    found = diagnosed_text(log, facts("root=/dev/nvme0n1 rw", disks=NVME))
    assert found.code is Code.ROOT_FS_MISSING
    assert found.fix == "set CONFIG_EXT4_FS=y"
    assert "(it has: vfat)" in found.problem


def test_filesystems_tried_listed_on_one_line() -> None:
    """Kernels before 5.x print them on the line itself."""
    log = whole_nvme_disk(console("root-nvme-partitioned"))
    log = re.sub(r"\[[ .\d]+\]  ext\d\r\n", "", log)
    log = log.replace("tried: ", "tried:  vfat msdos iso9660")
    found = diagnosed_text(log, facts("root=/dev/nvme0n1 rw", disks=NVME))
    assert found.code is Code.ROOT_FS_MISSING
    assert "vfat msdos iso9660" in found.problem


def test_rootwait_is_a_failure_only_once_the_vm_had_time() -> None:
    log = console("rootwait-virtio-no-driver")
    cmdline = "root=/dev/vda rootwait rw console=ttyS0 nokaslr"
    assert diagnose(log, facts(cmdline, seconds=5)) is None
    assert diagnose(log, facts(cmdline, seconds=5), patience=3) is not None
    assert diagnose(log, facts(cmdline, running=False)) is None


# kdlab's initramfs.


def test_initramfs_module_failure_is_the_cause_of_no_disk() -> None:
    log = console("initramfs-no-disk").replace(
        "kdlab-initramfs: root device",
        "insmod: can't insert '/lib/modules/virtio_blk.ko': invalid module format\r\n"
        "kdlab-initramfs: cannot load module virtio_blk: insmod: can't insert "
        "'/lib/modules/virtio_blk.ko': invalid module format\r\n"
        "kdlab-initramfs: root device",
    )
    found = diagnosed_text(log, facts(has_initrd=True))
    assert found.code is Code.INITRAMFS_MODULE_FAILED
    assert "virtio_blk" in found.problem
    assert "--modules" in found.fix


def test_initramfs_without_devtmpfs() -> None:
    log = console("initramfs-no-disk").replace(
        "kdlab-initramfs: root device",
        "kdlab-initramfs: cannot mount devtmpfs (CONFIG_DEVTMPFS=y?): no device node "
        "will appear\r\nkdlab-initramfs: root device",
    )
    found = diagnosed_text(log, facts(has_initrd=True))
    assert found.code is Code.DEVTMPFS_MISSING
    assert found.fix == "set CONFIG_DEVTMPFS=y and CONFIG_DEVTMPFS_MOUNT=y"
    # kdlabctl kernel check gives the same fix for the same problem.
    (checked,) = [f for f in kconfig.check({}) if f.option == "CONFIG_DEVTMPFS"]
    assert checked.fix.partition(", then rebuild")[0] == found.fix


def test_initramfs_unsupported_root() -> None:
    log = console("initramfs-wrong-root").replace(
        "kdlab-initramfs: root device /dev/sda did not appear within 15 s; "
        "block devices: vda",
        "kdlab-initramfs: root=nfs is not supported here: use root=/dev/NAME, "
        "root=UUID=... or root=LABEL=...",
    )
    found = diagnosed_text(log, facts("root=nfs", has_initrd=True))
    assert found.code is Code.ROOT_INVALID


def test_initramfs_retry_that_succeeds_clears_the_failure() -> None:
    """Leaving the emergency shell tries again; what counts is the last try."""
    log = console("initramfs-wrong-root") + (
        "exit\r\nkdlab-initramfs: mounted /dev/vda with rw, starting /sbin/init\r\n"
    )
    assert diagnose(log, facts(has_initrd=True)) is None


def test_initramfs_pseudo_disks_are_not_the_vms_disks() -> None:
    log = console("initramfs-no-disk").replace(
        "block devices: none: is the disk's driver loaded?",
        "block devices: loop0 loop1 ram0 sr0",
    )
    assert diagnosed_text(log, facts(has_initrd=True)).code is Code.ROOT_DRIVER_MISSING
    assert diagnosed_text(log, facts(disks=(), has_initrd=True)).code is (
        Code.ROOT_NO_DISK
    )


# The catalogue of the initramfs's lines: the script prints them, the
# diagnosis reads them back.

# For each field: shell variables as the script sets them, and the value the
# line then shows.
FIELD_SAMPLES: dict[str, list[tuple[dict[str, str], str]]] = {
    "module": [({"module": "virtio_blk"}, "virtio_blk")],
    "error": [
        (
            {"error": "insmod: can't insert 'x.ko':\n  unknown symbol in module"},
            "insmod: can't insert 'x.ko': unknown symbol in module",
        ),
        ({"error": ""}, "insmod failed"),
    ],
    "root": [({"root": "/dev/sda"}, "/dev/sda"), ({"root": ""}, "")],
    "disks": [({"disks": "vda vdb"}, "vda vdb"), ({"disks": ""}, NO_BLOCK_DEVICES)],
    "what": [
        ({"what": "/dev/vda"}, "/dev/vda"),
        ({"what": "UUID=1-2 (/dev/vda)"}, "UUID=1-2 (/dev/vda)"),
    ],
    "fstype": [({"rootfstype": "xfs"}, "xfs"), ({"rootfstype": ""}, ANY_FSTYPE)],
    "options": [({"options": "ro,noatime"}, "ro,noatime")],
    "known": [({"known": "ext3 ext2 ext4"}, "ext3 ext2 ext4"), ({"known": ""}, "")],
    "init": [({"init": "/sbin/init"}, "/sbin/init")],
    "tag": [({"tag": "work"}, "work")],
    "mountpoint": [({"mountpoint": "/mnt/work"}, "/mnt/work")],
    "mount_error": [
        (
            {"error": "mount: mounting work on /mnt/work failed:\n  No such device"},
            "mount: mounting work on /mnt/work failed: No such device",
        ),
        ({"error": ""}, "mount failed"),
    ],
    "port": [({"port": "org.kdlab.agent.0"}, "org.kdlab.agent.0")],
    "status": [({"status": "139"}, "139")],
}


def samples(message: Message) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Every combination of the samples of *message*'s fields: (variables, values)."""
    combinations = itertools.product(*(FIELD_SAMPLES[f] for f in message.fields))
    return [
        (
            {k: v for shell, _ in chosen for k, v in shell.items()},
            dict(zip(message.fields, (value for _, value in chosen), strict=True)),
        )
        for chosen in combinations
    ]


def test_the_scripts_print_the_catalogue_and_nothing_else() -> None:
    scripts = init_script(["virtio_blk"]) + userspace_script(["virtio_console"])
    # Each message is one double-quoted word.
    word = r'"(?:[^"\\]|\\.)*"'
    said = re.findall(
        rf"^\s*(?:say|emergency) ({word})", scripts.decode(), re.MULTILINE
    )
    shells = {message.shell for message in CATALOGUE.values()}
    assert [word for word in said if word != '"$*"'] != []
    assert {word for word in said if word != '"$*"'} == shells
    assert set(FIELD_SAMPLES) == {f for m in CATALOGUE.values() for f in m.fields}


@pytest.mark.parametrize("message", CATALOGUE.values(), ids=list(CATALOGUE))
def test_every_line_the_script_prints_is_recognized(message: Message) -> None:
    """The shell prints each message with each kind of value; what it printed
    is recognized as that message, with those values."""
    busybox = Path("/bin/busybox")
    require(busybox.is_file(), "/bin/busybox (apt-get install busybox-static)")
    script = init_script([]).decode()
    say = re.search(r"^say\(\) \{\n.*?^\}$", script, re.MULTILINE | re.DOTALL)
    assert say is not None
    cases = samples(message)
    program = "set -f\n" + say[0] + "\n"
    for variables, _ in cases:
        program += "".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items())
        program += f"say {message.shell}\n"
    done = subprocess.run(
        [busybox, "sh", "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = done.stdout.splitlines()
    assert printed == [message.text(**values) for _, values in cases]
    for line, (_, values) in zip(printed, cases, strict=True):
        assert recognize(line) == (message, values)
        # The console log may lose the blanks at the end of a line.
        assert recognize(line.rstrip()) == (message, values)


def initramfs_log(*lines: str) -> str:
    """A boot in which kdlab's initramfs prints *lines*, each failure followed
    by the emergency shell, as the script does."""
    shown = [
        text
        for line in lines
        for text in (
            line,
            *([EMERGENCY_SHELL.text()] if "mounted " not in line else []),
        )
    ]
    return "Linux version 6.1.0\r\nRun /init as init process\r\n" + "".join(
        f"{line}\r\n" for line in shown
    )


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        ([ROOT_UNSUPPORTED.text(root="nfs")], Code.ROOT_INVALID),
        (
            [ROOT_MISSING.text(root="/dev/sda", disks="vda")],
            Code.ROOT_DEVICE_MISSING,
        ),
        (
            [ROOT_MISSING.text(root="/dev/vda", disks=NO_BLOCK_DEVICES)],
            Code.ROOT_DRIVER_MISSING,
        ),
        (
            [
                MODULE_FAILED.text(module="virtio_blk", error="insmod failed"),
                ROOT_MISSING.text(root="/dev/vda", disks=NO_BLOCK_DEVICES),
            ],
            Code.INITRAMFS_MODULE_FAILED,
        ),
        (
            [
                DEVTMPFS_MISSING.text(),
                ROOT_MISSING.text(root="/dev/vda", disks="vda"),
            ],
            Code.DEVTMPFS_MISSING,
        ),
        (
            [
                CANNOT_MOUNT.text(
                    what="/dev/vda", fstype="xfs", options="rw", known="ext4"
                )
            ],
            Code.ROOT_FS_MISSING,
        ),
        (
            [
                CANNOT_MOUNT.text(
                    what="UUID=1 (/dev/vda)",
                    fstype=ANY_FSTYPE,
                    options="ro",
                    known="ext4",
                )
            ],
            Code.ROOT_MOUNT_FAILED,
        ),
        # A kernel that mounts no filesystem on a disk at all.
        (
            [
                CANNOT_MOUNT.text(
                    what="/dev/vda", fstype=ANY_FSTYPE, options="ro", known=""
                )
            ],
            Code.ROOT_MOUNT_FAILED,
        ),
        ([NO_INIT.text(init="/sbin/init", what="/dev/vda")], Code.INIT_MISSING),
        (
            [
                ROOT_MISSING.text(root="/dev/sda", disks="vda"),
                MOUNTED.text(what="/dev/vda", options="rw", init="/sbin/init"),
            ],
            None,
        ),
    ],
    ids=lambda value: value if isinstance(value, Code) else "",
)
def test_every_failure_the_initramfs_names_is_diagnosed(
    lines: list[str], code: Code | None
) -> None:
    # The command line names the root the initramfs looked for.
    root = re.search(r"root(?: device)? (/dev/\w+)", " ".join(lines))
    cmdline = KDLAB_CMDLINE.replace("/dev/vda", root[1] if root else "/dev/vda")
    found = diagnose(initramfs_log(*lines), facts(cmdline, has_initrd=True))
    assert (found.code if found else None) is code
    if found is not None:
        assert lines[-1].rstrip() in found.evidence


def test_a_module_userspace_could_not_load_is_a_warning_naming_it() -> None:
    failed = MODULE_FAILED.text(module="virtio_console", error="insmod failed")
    log = console("userspace-ready").replace(
        READY.text(), f"{failed}\r\n{READY.text()}"
    )
    found = diagnosed_text(log, facts(NO_ROOT, disks=(), has_initrd=True))
    assert (found.code, found.severity) == (
        Code.INITRAMFS_MODULE_FAILED,
        Severity.WARNING,
    )
    assert "virtio_console" in found.problem
    assert found.evidence == (failed,)


# The kernel's crash reports.


def test_a_panic_after_an_oops_is_reported_as_the_oops() -> None:
    log = console("oops-null-pointer").replace(
        "---[ end trace 0000000000000000 ]---",
        "---[ end trace 0000000000000000 ]---\r\n"
        "[    6.567300] Kernel panic - not syncing: Fatal exception",
    )
    found = diagnosed_text(log, facts(NO_ROOT, disks=()))
    assert found.code is Code.KERNEL_OOPS
    assert found.problem.endswith("the kernel then panicked")


def test_a_root_failure_after_an_oops_is_reported_as_the_oops() -> None:
    oops = console("oops-null-pointer")
    report = oops[oops.index("[    6.555995] BUG:") : oops.index("Killed")]
    log = console("initramfs-wrong-root").replace(
        "kdlab-initramfs: root device", report + "kdlab-initramfs: root device"
    )
    found = diagnosed_text(log, facts("root=/dev/sda", has_initrd=True))
    assert found.code is Code.KERNEL_OOPS


def test_without_a_gdbstub_the_fix_does_not_offer_gdb() -> None:
    found = diagnosed("panic-sysrq", facts(NO_ROOT, gdbstub=False))
    assert "kdlabctl gdb" not in found.fix
    assert "kdlabctl logs linux-6.1" in found.fix


def test_fix_names_the_vm_or_a_placeholder() -> None:
    boot = dataclasses.replace(facts(NO_ROOT), name="")
    assert "kdlabctl logs NAME" in diagnosed("panic-sysrq", boot).fix


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [swapper/0:1]", "stall"),
        ("rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:", "stall"),
        ("INFO: task kworker/0:1:15 blocked for more than 120 seconds.", "stall"),
        ("BUG: sleeping function called from invalid context at mm/slab.h:723", "bug"),
        ("BUG: KASAN: slab-out-of-bounds in foo_probe+0x1c/0x40", "bug"),
        ("BUG: unable to handle page fault for address: ffffc90000a3b000", "oops"),
        ("divide error: 0000 [#1] PREEMPT SMP NOPTI", "oops"),
    ],
)
def test_crash_headlines(line: str, code: str) -> None:
    log = (
        "[    0.000000] Linux version 6.1.0\n"
        f"[    5.000000] {line}\n"
        "[    5.000100] CPU: 0 PID: 1 Comm: swapper/0 Not tainted 6.1.0 #1\n"
        "[    5.000200] RIP: 0010:foo_probe+0x1c/0x40\n"
        "[    5.000300] Call Trace:\n"
        "[    5.000400]  <TASK>\n"
        "[    5.000500]  really_probe+0xdb/0x380\n"
    )
    found = diagnosed_text(log, facts(NO_ROOT))
    assert found.code == f"kernel-{code}"
    assert found.severity is Severity.ERROR
    assert "foo_probe+0x1c/0x40" in found.problem
    assert found.evidence[0].endswith(line)


def test_a_stack_trace_alone_is_a_warning() -> None:
    log = (
        "[    0.000000] Linux version 6.1.0\n"
        "[    9.000000] sysrq: Show Blocked State\n"
        "[    9.000100] task:kworker/0:1     state:D stack:0     pid:15    ppid:2\n"
        "[    9.000200] Call Trace:\n"
        "[    9.000300]  <TASK>\n"
        "[    9.000400]  __schedule+0x34d/0x9e0\n"
    )
    found = diagnosed_text(log, facts(NO_ROOT))
    assert (found.code, found.severity) == (Code.KERNEL_WARNING, Severity.WARNING)
    assert "sysrq: Show Blocked State" in found.problem


def test_lockdep_warning() -> None:
    log = (
        "[    0.000000] Linux version 6.1.0\n"
        "[    7.000000] ======================================================\n"
        "[    7.000001] WARNING: possible circular locking dependency detected\n"
    )
    found = diagnosed_text(log, facts(NO_ROOT))
    assert found.code is Code.KERNEL_WARNING
    assert "possible circular locking dependency" in found.problem


def test_a_program_saying_warning_is_not_the_kernel() -> None:
    log = console("boot-login") + "WARNING: disk almost full\r\n"
    assert diagnose(log, facts(has_initrd=True)) is None


# The initrd.


def test_an_initrd_the_kernel_cannot_unpack_explains_the_root_failure() -> None:
    log = console("root-virtio-no-driver").replace(
        "[    1.447417] registered taskstats",
        "[    1.440000] Initramfs unpacking failed: invalid magic at start of "
        "compressed archive\r\n[    1.447417] registered taskstats",
    )
    found = diagnosed_text(log, facts(has_initrd=True))
    assert found.code is Code.INITRD_INVALID
    assert found.severity is Severity.ERROR
    assert "invalid magic" in found.problem


def test_an_initrd_the_kernel_cannot_unpack_is_a_warning_if_it_booted() -> None:
    log = console("boot-login").replace(
        "Run /init as init process",
        "Initramfs unpacking failed: junk within compressed archive\r\n"
        "[    2.266079] Run /init as init process",
    )
    found = diagnosed_text(log, facts(has_initrd=True))
    assert (found.code, found.severity) == (Code.INITRD_INVALID, Severity.WARNING)


@pytest.mark.parametrize(
    ("status", "said"),
    [
        ("0x00000100", "exited with status 1"),
        ("0x00007f00", "exited with status 127"),
        ("0x0000000b", "was killed by SIGSEGV"),
        ("0x00000004", "was killed by SIGILL"),
        ("0x0000007e", "was killed by signal 126"),
    ],
)
def test_init_exit_status(status: str, said: str) -> None:
    log = console("init-exits").replace("exitcode=0x00000100", f"exitcode={status}")
    found = diagnosed_text(log, facts(NO_ROOT, has_initrd=True))
    assert found.code is Code.INIT_DIED
    assert said in found.problem


@pytest.mark.parametrize(
    ("error", "said"),
    [("-8", "is not an executable for this kernel"), ("-13", "is not executable")],
)
def test_init_that_exists_but_cannot_run(error: str, said: str) -> None:
    log = console("init-none-found").replace(
        "[    2.475662] Run /etc/init as init process",
        f"[    2.475000] Starting init: /sbin/init exists but couldn't execute it "
        f"(error {error})\r\n[    2.475662] Run /etc/init as init process",
    )
    found = diagnosed_text(log, facts("root=/dev/nvme0n1", disks=NVME))
    assert found.code is Code.INIT_MISSING
    assert found.problem.startswith(f"init /sbin/init {said}")


# No output.

SEABIOS = (
    "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n"
    "Booting from ROM...\r\n"
    "Probing EDD (edd=off to disable)... o\x1bc\x1b[?7l\x1b[2J"
)


def test_no_output_with_console_ttys0_blames_the_kernel_config() -> None:
    found = diagnosed("no-output", facts(has_initrd=True))
    assert found.code is Code.NO_CONSOLE_OUTPUT
    assert "console=ttyS0 is set" in found.problem
    assert "CONFIG_SERIAL_8250_CONSOLE=y" in found.fix


def test_no_output_names_the_console_that_was_chosen_instead() -> None:
    found = diagnosed("no-output", facts("root=/dev/vda console=tty0"))
    assert "console=tty0 prints elsewhere" in found.problem
    assert diagnose("", facts("console=ttyS0,115200n8")) is not None
    assert "missing" not in diagnosed_text("", facts("console=ttyS0,115200")).problem


def test_no_output_is_not_a_failure_before_the_patience_runs_out() -> None:
    assert diagnose("", facts(seconds=3)) is None
    assert diagnose("", facts(seconds=3), patience=2) is not None


def test_no_output_from_a_vm_that_stopped_is_a_failure_at_once() -> None:
    found = diagnosed_text("", facts(seconds=0.5, running=False))
    assert found.code is Code.NO_CONSOLE_OUTPUT
    assert "stopped" in found.problem


def test_no_output_from_a_vm_paused_for_the_debugger_is_no_failure() -> None:
    """Started paused, or stopped by gdb early: its CPUs wait, nothing is wrong."""
    waiting = facts(seconds=0.0, running=False, paused=True)
    assert diagnose("", waiting) is None
    at_breakpoint = facts(seconds=0.4, running=False, paused=True)
    assert diagnose("", at_breakpoint) is None


def test_no_output_counts_the_running_time_of_a_paused_vm() -> None:
    found = diagnosed_text("", facts(seconds=12.0, running=False, paused=True))
    assert found.code is Code.NO_CONSOLE_OUTPUT
    assert "after 12 s of running" in found.problem
    assert "stopped" not in found.problem


def test_firmware_output_is_not_kernel_output() -> None:
    found = diagnosed_text(SEABIOS, facts())
    assert found.code is Code.NO_CONSOLE_OUTPUT
    assert found.evidence[0] == "SeaBIOS (version 1.16.2-debian-1.16.2-1)"


def test_no_output_with_quiet_is_only_a_note() -> None:
    found = diagnosed_text("", facts(KDLAB_CMDLINE + " quiet"))
    assert (found.code, found.severity) == (Code.NO_CONSOLE_OUTPUT, Severity.NOTE)


# The gdbstub and KASLR.


def test_gdbstub_with_kaslr() -> None:
    found = diagnosed("boot-login", facts("root=/dev/vda console=ttyS0 kaslr"))
    assert (found.code, found.severity) == (Code.GDB_KASLR, Severity.WARNING)
    assert "remove kaslr" in found.fix
    assert found.evidence[0].endswith(
        "Command line: root=/dev/vda rw console=ttyS0 nokaslr"
    )


def test_gdbstub_without_nokaslr() -> None:
    found = diagnosed("boot-login", facts("root=/dev/vda console=ttyS0"))
    assert found.code is Code.GDB_KASLR
    assert found.fix == "add nokaslr to the command line"


def test_kaslr_without_a_gdbstub_or_with_nokaslr_is_fine() -> None:
    log = console("boot-login")
    assert diagnose(log, facts("root=/dev/vda console=ttyS0", gdbstub=False)) is None
    assert diagnose(log, facts("console=ttyS0 kaslr nokaslr")) is None
    # Words after "--" are init's, not the kernel's.
    assert diagnose(log, facts("console=ttyS0 -- nokaslr")) is not None


def test_a_kernel_without_kaslr_needs_no_nokaslr() -> None:
    log = console("init-exits")  # ends in "Kernel Offset: disabled"
    found = diagnosed_text(log, facts("console=ttyS0", disks=()))
    assert found.code is Code.INIT_DIED


# What serial consoles do to text.


def plain(log: str) -> str:
    return "\n".join(_STAMP.sub("", line) for line in log.replace("\r", "").split("\n"))


@pytest.mark.parametrize("name", ["root-virtio-wrong-name-edited", "oops-null-pointer"])
@pytest.mark.parametrize(
    "mangle",
    [
        lambda log: log.replace("\r\n", "\n"),
        lambda log: log.replace("\n", "\x1b[0m\x1b[?25h\n\x1b[6n"),
        plain,
        lambda log: "\x00" + log.replace("\n", "\n\x07\x00") + "\x1b[",
    ],
    ids=["lf", "escapes", "no-timestamps", "controls"],
)
def test_line_endings_escapes_and_timestamps_do_not_matter(
    name: str, mangle: Callable[[str], str]
) -> None:
    boot = facts("root=/dev/sda rw console=ttyS0", has_initrd=False)
    expected = diagnosed(name, boot)
    mangled = mangle(console(name))
    assert mangled != console(name)
    found = diagnosed_text(mangled, boot)
    assert (found.code, found.problem, found.fix) == (
        expected.code,
        expected.problem,
        expected.fix,
    )


def test_a_stray_escape_string_ends_with_its_line() -> None:
    """ESC P opens a device control string; a garbled one must not eat the log."""
    log = console("panic-sysrq").replace(
        "sysrq: Trigger", "\x1bP garbage sysrq: Trigger"
    )
    assert diagnosed_text(log, facts(NO_ROOT)).code is Code.KERNEL_PANIC


def test_a_kernel_message_glued_to_a_prompt_is_still_read() -> None:
    log = console("boot-login").replace(
        "kdlab-guest login: ",
        "kdlab-guest login: [   40.000000] Kernel panic - not syncing: Fatal exception",
    )
    found = diagnosed_text(log, facts(has_initrd=True))
    assert found.code is Code.KERNEL_PANIC
    assert (
        found.evidence[-1]
        == "[   40.000000] Kernel panic - not syncing: Fatal exception"
    )


def test_truncated_logs() -> None:
    log = console("root-virtio-wrong-name-edited")
    boot = facts("root=/dev/sda rw console=ttyS0")
    panic = log.index("Kernel panic")
    # Cut right after the panic line: the diagnosis is complete.
    cut = log[: log.index("\n", panic)]
    assert diagnosed_text(cut, boot).fix == "use root=/dev/vda"
    # Cut at every point: never an exception.
    for end in range(0, len(log), 97):
        diagnose(log[:end], boot)


def test_a_long_running_guest_log_is_read_at_both_ends(tmp_path: Path) -> None:
    log = console("root-virtio-wrong-name-edited")
    start, end = (
        log[: log.index("Kernel panic") - 2000],
        log[log.index("Kernel panic") - 2000 :],
    )
    chatter = (
        "[ 1000.000000] systemd-journald[1]: chatter line, as from a busy guest\r\n"
    )
    big = start + chatter * (3 * TAIL_SIZE // len(chatter)) + end
    path = tmp_path / "console.log"
    path.write_text(big, newline="")
    boot = facts("root=/dev/sda rw console=ttyS0")
    began = time.monotonic()
    text = read_console_log(path)
    found = diagnosed_text(text, boot)
    assert found.fix == "use root=/dev/vda"
    assert len(text) < len(big) / 2
    found = diagnosed_text(big, boot)  # diagnose() trims what it is given too
    assert found.fix == "use root=/dev/vda"
    assert time.monotonic() - began < 10


def test_one_huge_line_is_fast() -> None:
    began = time.monotonic()
    diagnose("BUG: " + "a, " * 500_000 + "\n" + "x" * 3_000_000, facts())
    assert time.monotonic() - began < 10


def test_a_fatal_earlier_boot_is_reported_while_the_next_one_boots() -> None:
    log = console("init-exits-reboot-loop")
    found = diagnosed_text(log, facts("console=ttyS0 nokaslr panic=1", disks=()))
    assert found.code is Code.INIT_DIED
    assert "earlier boot" in found.problem


def test_the_last_boot_comes_first() -> None:
    log = console("init-exits") + console("panic-sysrq")
    found = diagnosed_text(log, facts(NO_ROOT, disks=()))
    assert found.code is Code.KERNEL_PANIC
    assert "earlier" not in found.problem


def test_read_console_log_replaces_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(
        b"\xff\xfeLinux version 6.1\r\nKernel panic - not syncing: x\xc3\r\n"
    )
    found = diagnosed_text(read_console_log(path), facts(NO_ROOT))
    assert found.code is Code.KERNEL_PANIC


# Whatever the text, diagnose answers.

KEY_LINES = [
    "Linux version 6.1.0",
    "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
    "Kernel panic - not syncing: No working init found.",
    "Kernel panic - not syncing: Requested init /x failed (error -99).",
    "Kernel panic - not syncing: Attempted to kill init! exitcode=0xffffffff",
    "Kernel panic - not syncing: ",
    'VFS: Cannot open root device "vda" or unknown-block(0,0): error -6',
    'Please append a correct "root=" boot option; here are the available partitions:',
    "List of all partitions:",
    "fe00      65536 vda ",
    "  fe01      65536 vda1 ",
    "103:00000      65536 nvme0n1 ",
    "No filesystem could mount root, tried: ",
    "No filesystem could mount root, tried:  ext2",
    "ext4",
    " vda: vda1 vda2 < vda5 >",
    " nvme0n1: p1",
    "Waiting for root device /dev/vda...",
    "VFS: Mounted root (ext4 filesystem) on device 254:0.",
    "Run /sbin/init as init process",
    "Starting init: /sbin/init exists but couldn't execute it (error -8)",
    "kdlab-initramfs: root device /dev/sda did not appear within 15 s; "
    "block devices: vda",
    "kdlab-initramfs: root device /dev/sda did not appear; block devices: none: x",
    "kdlab-initramfs: cannot mount /dev/vda on /newroot with type xfs and options rw; "
    "this kernel mounts: ext4",
    "kdlab-initramfs: cannot mount UUID=1 (/dev/vda) on /newroot; this kernel mounts: ",
    "kdlab-initramfs: init /sbin/init is not on the root filesystem /dev/vda: x",
    "kdlab-initramfs: root= is not supported here",
    "kdlab-initramfs: cannot load module virtio_blk: x",
    "kdlab-initramfs: cannot mount devtmpfs",
    "kdlab-initramfs: mounted /dev/vda with rw, starting /sbin/init",
    "Initramfs unpacking failed: x",
    "BUG: kernel NULL pointer dereference, address: 0000000000000000",
    "kernel BUG at mm/x.c:1!",
    "Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "RIP: 0010:f+0x1/0x2",
    "CPU: 0 PID: 1 Comm: init Not tainted",
    "Call Trace:",
    "------------[ cut here ]------------",
    "WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2",
    "---[ end trace 0000000000000000 ]---",
    "Kernel Offset: disabled",
    "SeaBIOS (version 1.16.2)",
    "",
]

boot_facts = st.builds(
    BootFacts,
    cmdline=st.text(max_size=80)
    | st.sampled_from([KDLAB_CMDLINE, "root=UUID=x quiet", "root=/dev/vda1 kaslr"]),
    disks=st.lists(st.sampled_from(["vda", "vdb", "nvme0n1", "sda", ""])).map(tuple),
    has_initrd=st.booleans(),
    gdbstub=st.booleans(),
    seconds_since_start=st.floats(allow_nan=True, allow_infinity=True),
    running=st.booleans(),
    paused=st.booleans(),
    # VM names are validated: letters, digits, '.', '_', '-'.
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,9}", fullmatch=True),
)


def check(found: Diagnosis | None) -> None:
    if found is None:
        return
    assert found.code in set(Code)
    assert found.severity in set(Severity)
    assert "\n" not in found.problem
    assert "\n" not in found.fix
    assert len(found.evidence) <= MAX_EVIDENCE


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(log=st.text(), boot=boot_facts)
def test_diagnose_never_raises_on_any_text(log: str, boot: BootFacts) -> None:
    check(diagnose(log, boot))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=500)
@given(
    lines=st.lists(
        st.tuples(
            st.sampled_from(KEY_LINES),
            st.booleans(),
            st.sampled_from(["\n", "\r\n", "\r"]),
        )
    ),
    boot=boot_facts,
)
def test_diagnose_never_raises_on_kernel_messages_in_any_order(
    lines: list[tuple[str, bool, str]], boot: BootFacts
) -> None:
    log = "".join(
        (f"[{n:5d}.000000] " if stamp else "") + text + end
        for n, (text, stamp, end) in enumerate(lines)
    )
    check(diagnose(log, boot))


def test_a_fix_naming_what_only_the_console_said_is_not_public() -> None:
    """Anyone may read the public fix: a type or device the guest printed stays
    its owner's (issue 10.7); kdlab's own names stay public."""
    log = console("initramfs-rootfstype-xfs")
    said = "/dev/vda on /newroot with type xfs"
    assert said in log
    honest = diagnosed_text(log, facts(has_initrd=True))
    assert honest.code is Code.ROOT_FS_MISSING
    assert public_fix(honest, "vm") == "set CONFIG_XFS_FS=y"
    secret = "guestsecret"
    for quoted in (
        said.replace("xfs", secret),  # a filesystem the kernel lacks
        said.replace("vda", secret).replace("xfs", "ext4"),  # a failed mount
    ):
        found = diagnosed_text(log.replace(said, quoted), facts(has_initrd=True))
        assert secret in found.fix.lower()
        assert public_fix(found, "vm") == "its owner reads the fix: kdlabctl show vm"
