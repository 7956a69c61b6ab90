"""The initramfs and the initrd: kdlab's own initramfs failing, an initrd the
kernel could not unpack.

kdlab's initramfs (:mod:`kdlab.kernel.initramfs`) names what failed in lines of
its own, then offers an emergency shell: no panic follows. They are read with
the catalogue the script is generated from. In its userspace mode, the line
:data:`~kdlab.kernel.initramfs.READY` says the VM came up to kdlab's shell:
what it could not offer there (a module, the agent's port, a share) is a
warning, not a failed boot.
"""

from __future__ import annotations

import re

from kdlab.kernel import initramfs
from kdlab.kernel.diagnosis.boot import Context
from kdlab.kernel.diagnosis.codes import Code, Diagnosis, fatal
from kdlab.kernel.diagnosis.devices import DEVICE_NAME, PSEUDO_DISK, Devices
from kdlab.kernel.diagnosis.init import NO_INIT_FIX
from kdlab.kernel.diagnosis.log import MAX_EVIDENCE
from kdlab.kernel.diagnosis.root import RootAttempt, explain_root
from kdlab.kernel.findings import Severity
from kdlab.kernel.guest import SHARES_DIRECTORY
from kdlab.kernel.initramfs import (
    AGENT_PORT_MISSING,
    ANY_FSTYPE,
    CANNOT_MOUNT,
    DEVTMPFS_MISSING,
    MODULE_FAILED,
    MOUNTED,
    NO_BLOCK_DEVICES,
    NO_INIT,
    PREFIX,
    READY,
    ROOT_FORMS,
    ROOT_MISSING,
    ROOT_UNSUPPORTED,
    SHARE_FAILED,
    Message,
)
from kdlab.kernel.kconfig import DEVTMPFS_FIX

_FAILURES = (ROOT_UNSUPPORTED, ROOT_MISSING, CANNOT_MOUNT, NO_INIT)
"""The lines that end an attempt to mount the root (an emergency shell follows)."""

_Said = tuple[int, Message, dict[str, str]]
"""A line of the initramfs: its index in the boot, the message and its values."""


def _said(ctx: Context) -> list[_Said]:
    """The lines of kdlab's initramfs in the boot."""
    return [
        (index, *recognized)
        for index, line in enumerate(ctx.boot.lines)
        if (recognized := initramfs.recognize(line.text)) is not None
    ]


def kdlab_initramfs(ctx: Context) -> Diagnosis | None:
    """kdlab's initramfs could not mount the root, and said why."""
    boot = ctx.boot
    said = _said(ctx)
    # Leaving the emergency shell tries again: only the latest attempt counts.
    mounted = [index for index, message, _ in said if message is MOUNTED]
    start = mounted[-1] + 1 if mounted else 0
    attempt = [entry for entry in said if entry[0] >= start]
    failures = [entry for entry in attempt if entry[1] in _FAILURES]
    if not failures:
        return None
    index, message, values = failures[-1]
    if ctx.crashed_before(index):
        return None  # a crash came first: it is the cause
    evidence = boot.shown(boot.said(PREFIX, start, index + 1)[-4:])
    if message is ROOT_UNSUPPORTED:
        return fatal(
            Code.ROOT_INVALID,
            f"kdlab's initramfs cannot look up root={values['root']}",
            f"use {ROOT_FORMS}",
            evidence,
        )
    if message is NO_INIT:
        return fatal(
            Code.INIT_MISSING,
            f"the root filesystem {values['what']} has no {values['init']}",
            NO_INIT_FIX,
            evidence,
        )
    if message is ROOT_MISSING:
        before = [entry for entry in attempt if entry[0] < index]
        return _initramfs_no_device(ctx, start, index, values, before)
    return _initramfs_cannot_mount(ctx, index, values, evidence)


def kdlab_userspace(ctx: Context) -> Diagnosis | None:
    """kdlab's userspace initramfs came up without all it offers: a module it
    could not load, no port for the agent, a share it could not mount."""
    said = _said(ctx)
    if not any(message is READY for _, message, _ in said):
        return None
    shown = ctx.boot.shown
    failed = [(i, found) for i, message, found in said if message is MODULE_FAILED]
    if failed:
        modules = ", ".join(dict.fromkeys(found["module"] for _, found in failed))
        return Diagnosis(
            Code.INITRAMFS_MODULE_FAILED,
            Severity.WARNING,
            f"the initramfs could not load {modules}",
            "the initramfs needs this kernel's own modules: give the kernel's "
            "/lib/modules/RELEASE (--modules DIR)",
            shown(i for i, _ in failed),
        )
    for index, message, found in said:
        if message is AGENT_PORT_MISSING:
            return Diagnosis(
                Code.AGENT_UNREACHABLE,
                Severity.WARNING,
                f"kdlab's agent has no virtio-serial port {found['port']}: "
                "kdlabctl exec cannot reach the guest",
                "build the kernel with CONFIG_VIRTIO_CONSOLE=y (or as a module, "
                "with --modules DIR); a VM created before kdlab had exec has no "
                "port: create it again",
                shown([index]),
            )
    shares = [(i, found) for i, message, found in said if message is SHARE_FAILED]
    if shares:
        tags = ", ".join(found["tag"] for _, found in shares)
        return Diagnosis(
            Code.SHARE_NOT_MOUNTED,
            Severity.WARNING,
            f"the shared directory {tags} could not be mounted: "
            f"{shares[0][1]['mount_error']}",
            "the kernel needs virtiofs (CONFIG_VIRTIO_FS=y, or as a module with "
            f"--modules DIR); try it in the guest: mount -t virtiofs TAG "
            f"{SHARES_DIRECTORY}/TAG",
            shown(i for i, _ in shares),
        )
    return None


def _initramfs_no_device(
    ctx: Context,
    start: int,
    index: int,
    values: dict[str, str],
    before: list[_Said],
) -> Diagnosis:
    boot = ctx.boot
    said = boot.said(PREFIX, start, index + 1)
    evidence = boot.shown(said[-4:])
    if any(message is DEVTMPFS_MISSING for _, message, _ in before):
        return fatal(
            Code.DEVTMPFS_MISSING,
            "the kernel has no devtmpfs, so no device node appears in /dev",
            DEVTMPFS_FIX,
            boot.shown(said[:1] + said[-2:]),
        )
    listed = values["disks"]
    names = [] if listed == NO_BLOCK_DEVICES else listed.split()
    disks = [
        d for d in names if DEVICE_NAME.fullmatch(d) and not PSEUDO_DISK.fullmatch(d)
    ]
    modules = [(i, found) for i, message, found in before if message is MODULE_FAILED]
    if not disks and modules:
        failed = ", ".join(dict.fromkeys(found["module"] for _, found in modules))
        return fatal(
            Code.INITRAMFS_MODULE_FAILED,
            f"the initramfs could not load {failed}, so no disk appeared",
            "the initramfs needs this kernel's own modules: build it from the "
            "kernel's /lib/modules/RELEASE (--modules DIR)",
            boot.shown([*(i for i, _ in modules[:3]), *said[-2:]]),
        )
    sizes = dict.fromkeys(disks, 0)
    for disk, parts in boot.partition_scans.items():
        if disk in sizes:
            sizes.update(dict.fromkeys(parts, 0))
    return explain_root(ctx, RootAttempt(Devices(sizes), evidence))


def _initramfs_cannot_mount(
    ctx: Context, index: int, values: dict[str, str], evidence: tuple[str, ...]
) -> Diagnosis:
    boot = ctx.boot
    device = initramfs.mounted_device(values["what"]).removeprefix("/dev/")
    # The kernel's complaint about the device and busybox mount's, just before.
    complaints = [
        i
        for i in range(max(0, index - 20), index)
        if f"({device})" in boot.lines[i].text
        or boot.lines[i].text.startswith((f"{device}: ", "mount: "))
    ]
    sizes = dict.fromkeys([*ctx.facts.disks, device], 0)
    for disk, parts in boot.partition_scans.items():
        sizes.update(dict.fromkeys([disk, *parts], 0))
    fstype = values["fstype"]
    attempt = RootAttempt(
        Devices(sizes),
        (*boot.shown(complaints[-3:]), *evidence)[:MAX_EVIDENCE],
        fstypes=tuple(values["known"].split()),
        fstype=None if fstype == ANY_FSTYPE else fstype,
        device=device,
    )
    return explain_root(ctx, attempt)


# The initrd image itself.

_UNPACK_FAILED = re.compile(
    r"^(?:Initramfs unpacking failed: (?P<why>.*)"
    r"|RAMDISK: Couldn't find valid RAM disk image)"
)


def _initrd_invalid(ctx: Context, *, panicked: bool) -> Diagnosis | None:
    """An initrd the kernel could not unpack: the cause of what fails next."""
    found = ctx.boot.last(_UNPACK_FAILED)
    panic = ctx.panic
    if found is None or (panic is not None) != panicked:
        return None
    why = found[1]["why"] or "it is not an initramfs the kernel can read"
    return Diagnosis(
        Code.INITRD_INVALID,
        Severity.ERROR if panicked else Severity.WARNING,
        f"the kernel could not unpack the initrd: {why}"
        + ("" if panicked else "; it booted without it"),
        "give a newc cpio archive, compressed with a method the kernel has "
        "(CONFIG_RD_GZIP=y, CONFIG_RD_ZSTD=y, ...)",
        ctx.boot.shown([found[0], *([panic[0]] if panic else [])]),
    )


def initrd_broken(ctx: Context) -> Diagnosis | None:
    """An initrd the kernel could not unpack, and a panic for want of it."""
    return _initrd_invalid(ctx, panicked=True)


def initrd_ignored(ctx: Context) -> Diagnosis | None:
    """An initrd the kernel could not unpack, and booted without."""
    return _initrd_invalid(ctx, panicked=False)
