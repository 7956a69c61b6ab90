"""The root filesystem: why the kernel, or an initramfs, mounted none.

The kernel's message says *what* failed; the facts say *why*. "VFS: Unable to
mount root fs" is the same text whether the VM has no disk, the kernel has no
virtio_blk, or root= names the wrong disk; the VM's disks, its initrd and the
partition list the kernel printed tell these apart.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from kdlab.kernel.diagnosis.boot import Boot, Context
from kdlab.kernel.diagnosis.codes import Code, Diagnosis, errno_text, fatal
from kdlab.kernel.diagnosis.devices import DISK_PROBED, Devices, partition_of
from kdlab.kernel.diagnosis.log import MAX_EVIDENCE
from kdlab.kernel.guest import ROOT_DISK_DRIVERS, ROOT_FS
from kdlab.kernel.kconfig import FS_OPTIONS, fs_option, options_text


@dataclass(frozen=True)
class RootAttempt:
    """What a boot showed about its root device, for :func:`explain_root`."""

    devices: Devices
    evidence: tuple[str, ...]
    error: int | None = None
    """The errno of the kernel's failed mount."""
    fstypes: tuple[str, ...] = ()
    """The filesystems the kernel tried or has, when the log says."""
    fstype: str | None = None
    """The type a mount was asked for, when the log says (else rootfstype=)."""
    device: str | None = None
    """The device a mount was tried on, when the log says (else root=)."""


def explain_root(ctx: Context, attempt: RootAttempt) -> Diagnosis:
    """Why no root was mounted, from the devices the boot showed and the facts."""
    facts, cmd, devices, evidence = (
        ctx.facts,
        ctx.cmd,
        attempt.devices,
        attempt.evidence,
    )
    root_text = f"root={cmd.root}" if cmd.root else "no root= on the command line"
    if not facts.disks:
        return fatal(
            Code.ROOT_NO_DISK,
            f"the VM has no disk, so there is no root device ({root_text})",
            "give the VM a root disk: kdlabctl create --image IMAGE (it is "
            "/dev/vda), or boot into kdlab's shell: create it without "
            "--no-initramfs",
            evidence,
        )
    visible = [d for d in facts.disks if d in devices]
    if not visible:
        return _driver_missing(ctx, root_text, evidence)
    suggestion = f"root=/dev/{devices.best_root(visible[0])}"
    if cmd.root is None and attempt.device is None:
        return fatal(
            Code.ROOT_DEVICE_MISSING,
            f"{root_text}: the kernel does not know which disk holds the root",
            f"add {suggestion} to the command line",
            evidence,
        )
    device = attempt.device or cmd.root_device
    if device is None:
        return _tagged_root(ctx, suggestion, evidence)
    if device not in devices:
        return _device_missing(ctx, device, devices, evidence)
    if device in devices.disks() and devices.partitions(device):
        parts = " ".join(devices.partitions(device))
        return fatal(
            Code.ROOT_PARTITIONED,
            f"root=/dev/{device} is a partitioned disk ({parts}), not a filesystem",
            f"use root=/dev/{devices.best_root(device)}, or boot a whole-disk image",
            evidence,
        )
    return _mount_failed(ctx, device, attempt)


def _driver_missing(
    ctx: Context, root_text: str, evidence: tuple[str, ...]
) -> Diagnosis:
    disks = ", ".join(f"/dev/{d}" for d in ctx.facts.disks)
    modules = " and ".join(ROOT_DISK_DRIVERS.values())
    if ctx.facts.has_initrd:
        why = f"the initramfs did not load {modules}"
    else:
        why = f"{modules} are not built in, and no initramfs loads them"
    also = ""
    root = ctx.cmd.root_device
    if root is not None and not any(
        root == d or partition_of(root, d) for d in ctx.facts.disks
    ):
        also = f"; {root_text} names none of its disks either"
    return fatal(
        Code.ROOT_DRIVER_MISSING,
        f"the kernel does not see the VM's disk {disks}: {why}{also}",
        f"set {options_text(ROOT_DISK_DRIVERS)}, or create the VM with "
        "--modules DIR (an initramfs that loads them)",
        evidence,
    )


def _tagged_root(ctx: Context, suggestion: str, evidence: tuple[str, ...]) -> Diagnosis:
    if ctx.cmd.root_tag in ("UUID", "LABEL") and not ctx.facts.has_initrd:
        return fatal(
            Code.ROOT_DEVICE_MISSING,
            f"root={ctx.cmd.root} needs an initramfs: the kernel alone finds only "
            "root=/dev/NAME and root=PARTUUID=",
            f"use {suggestion}, or create the VM with --modules DIR (an initramfs)",
            evidence,
        )
    return fatal(
        Code.ROOT_DEVICE_MISSING,
        f"no disk of the VM matches root={ctx.cmd.root}",
        f"use {suggestion}, or check the image's identifiers (blkid)",
        evidence,
    )


def _device_missing(
    ctx: Context, device: str, devices: Devices, evidence: tuple[str, ...]
) -> Diagnosis:
    parent = next((d for d in devices.disks() if partition_of(device, d)), None)
    if parent is not None and not devices.partitions(parent):
        return fatal(
            Code.ROOT_DEVICE_MISSING,
            f"root=/dev/{device} but /dev/{parent} has no partitions "
            "(a whole-disk image)",
            f"use root=/dev/{parent}",
            evidence,
        )
    disks = [d for d in ctx.facts.disks if d in devices]
    target = parent or disks[0]
    what = "disk is" if len(disks) == 1 else "disks are"
    names = ", ".join(f"/dev/{d}" for d in disks)
    return fatal(
        Code.ROOT_DEVICE_MISSING,
        f"root=/dev/{device} but the VM's {what} {names}",
        f"use root=/dev/{devices.best_root(target)}",
        evidence,
    )


def _mount_failed(ctx: Context, device: str, attempt: RootAttempt) -> Diagnosis:
    named = attempt.fstype or ctx.cmd.params.get("rootfstype")
    fstype = named or ROOT_FS
    found = _mount_failure(device, fstype, named, attempt)
    # The fix of a missing filesystem names its type; a failed mount's, the device too.
    named_device = found.code is Code.ROOT_MOUNT_FAILED
    quoted = not _public_fstype(ctx, fstype) or (
        named_device and not _public_device(ctx, device)
    )
    return dataclasses.replace(found, fix_quotes_evidence=quoted)


def _public_device(ctx: Context, device: str) -> bool:
    """Whether *device* is one of the VM's disks (or a partition of one), or the
    command line's root=: not a name that only the console said."""
    disks = "|".join(re.escape(disk) for disk in ctx.facts.disks)
    return device == ctx.cmd.root_device or (
        bool(disks) and re.fullmatch(rf"(?:{disks})p?\d{{0,3}}", device) is not None
    )


def _public_fstype(ctx: Context, fstype: str) -> bool:
    """Whether *fstype* is one kdlab knows, or the command line's rootfstype=."""
    return fstype in FS_OPTIONS or fstype == ctx.cmd.params.get("rootfstype")


def _mount_failure(
    device: str,
    fstype: str,
    named: str | None,
    attempt: RootAttempt,
) -> Diagnosis:
    """A root filesystem type the kernel lacks, or a mount of it that failed."""
    # ENODEV from the kernel's mount: the type rootfstype= names is unknown.
    if (attempt.fstypes and fstype not in attempt.fstypes) or (
        named and attempt.error == -19
    ):
        has = f" (it has: {' '.join(attempt.fstypes)})" if attempt.fstypes else ""
        return fatal(
            Code.ROOT_FS_MISSING,
            f"the kernel cannot mount /dev/{device}: it has no {fstype} filesystem "
            f"built in{has}",
            f"set {fs_option(fstype)}",
            attempt.evidence,
        )
    return fatal(
        Code.ROOT_MOUNT_FAILED,
        f"the kernel found /dev/{device} but could not mount it"
        f"{errno_text(attempt.error)}",
        f"check that /dev/{device} holds a {fstype} filesystem "
        f"({fs_option(fstype)}); a partitioned image needs root=/dev/{device}1",
        attempt.evidence,
    )


_CANNOT_OPEN = re.compile(
    r'^VFS: Cannot open root device "[^"]*" or \S+: error (?P<error>-\d+)'
)
_TRIED = re.compile(r"^No filesystem could mount root, tried:(?P<names>.*)$")
_FS_NAME = re.compile(r"[a-z0-9_]+")
_ROOT_LINES = re.compile(
    r"^(?:/dev/root: |VFS: Cannot open root device|Waiting for root device|EXT4-fs \()"
)


def root_mount_failed(ctx: Context) -> Diagnosis | None:
    """The kernel's own root mount failed: ``VFS: Unable to mount root fs``."""
    panic = ctx.panic
    if panic is None or not panic[1].startswith("VFS: Unable to mount root fs"):
        return None
    boot, index = ctx.boot, panic[0]
    opened = boot.last(_CANNOT_OPEN, stop=index)
    tried = boot.last(_TRIED, stop=index)
    chosen = [i for i, _ in boot.find(_ROOT_LINES, stop=index)][-2:]
    listed = boot.partition_list
    if listed is not None:
        chosen += [listed[0], *listed[1][:3]]
    chosen += [tried[0]] if tried else []
    attempt = RootAttempt(
        devices=boot.seen,
        evidence=boot.shown([*chosen[-(MAX_EVIDENCE - 1) :], index]),
        error=int(opened[1]["error"]) if opened else None,
        fstypes=_tried_names(boot, tried),
    )
    return explain_root(ctx, attempt)


def _tried_names(
    boot: Boot, tried: tuple[int, re.Match[str]] | None
) -> tuple[str, ...]:
    """The filesystems of "No filesystem could mount root, tried: ...".

    Older kernels print the names on that line; 6.1 prints each as a record of
    its own (" ext3", " ext2", " ext4", then an empty one).
    """
    if tried is None:
        return ()
    index, match = tried
    names = match["names"].split()
    for line in boot.lines[index + 1 : index + 64]:
        if not _FS_NAME.fullmatch(line.text):
            break
        names.append(line.text)
    return tuple(names)


_WAITING = re.compile(r"^Waiting for root device (?P<root>\S+?)\.*$")
MOUNTED_ROOT = re.compile(r"^VFS: Mounted root \((?P<fs>\S+) filesystem\)")


def root_wait(ctx: Context) -> Diagnosis | None:
    """With ``rootwait`` the kernel waits for a missing root device for ever."""
    if not ctx.overdue:
        return None
    boot = ctx.boot
    waiting = boot.last(_WAITING)
    if waiting is None or boot.find(MOUNTED_ROOT, waiting[0]):
        return None
    if ctx.crashed_before(waiting[0]) or ctx.cmd.root_device in boot.seen:
        return None
    probes = [
        i for i in range(len(boot.lines)) if DISK_PROBED.search(boot.lines[i].text)
    ]
    evidence = boot.shown([*probes[-3:], waiting[0]])
    return explain_root(ctx, RootAttempt(boot.seen, evidence))
