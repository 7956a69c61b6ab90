"""What a diagnosis can say: its codes, and what of it anyone may read."""

from __future__ import annotations

import enum
import os

from kdlab.kernel.findings import Finding, Severity


class Code(enum.StrEnum):
    """What was found. The values are stable: clients may match on them."""

    NO_CONSOLE_OUTPUT = "no-console-output"
    ROOT_NO_DISK = "root-no-disk"
    ROOT_DRIVER_MISSING = "root-driver-missing"
    ROOT_DEVICE_MISSING = "root-device-missing"
    ROOT_PARTITIONED = "root-partitioned"
    ROOT_FS_MISSING = "root-fs-missing"
    ROOT_MOUNT_FAILED = "root-mount-failed"
    ROOT_INVALID = "root-invalid"
    DEVTMPFS_MISSING = "devtmpfs-missing"
    INITRAMFS_MODULE_FAILED = "initramfs-module-failed"
    INITRD_INVALID = "initrd-invalid"
    INIT_MISSING = "init-missing"
    INIT_DIED = "init-died"
    KERNEL_OOPS = "kernel-oops"
    KERNEL_BUG = "kernel-bug"
    KERNEL_STALL = "kernel-stall"
    KERNEL_PANIC = "kernel-panic"
    KERNEL_WARNING = "kernel-warning"
    GDB_KASLR = "gdb-kaslr"
    AGENT_UNREACHABLE = "agent-unreachable"
    SHARE_NOT_MOUNTED = "share-not-mounted"


# What anyone may read of a diagnosis: the cause without the guest's words.
# A cause quotes the console (a panic message, a task name, a path), which
# only those who may read the VM's log may see.
SUMMARIES: dict[Code, str] = {
    Code.NO_CONSOLE_OUTPUT: "the kernel printed nothing on the serial console",
    Code.ROOT_NO_DISK: "root= names a disk but the VM has none",
    Code.ROOT_DRIVER_MISSING: "the kernel has no driver for the root disk",
    Code.ROOT_DEVICE_MISSING: "the root device does not exist",
    Code.ROOT_PARTITIONED: "root= names a whole disk that is partitioned",
    Code.ROOT_FS_MISSING: "the kernel cannot read the root filesystem",
    Code.ROOT_MOUNT_FAILED: "the root filesystem could not be mounted",
    Code.ROOT_INVALID: "root= is not a device the kernel understands",
    Code.DEVTMPFS_MISSING: "the kernel has no devtmpfs",
    Code.INITRAMFS_MODULE_FAILED: "the initramfs could not load a module",
    Code.INITRD_INVALID: "the initrd is not one the kernel can unpack",
    Code.INIT_MISSING: "no init program was found",
    Code.INIT_DIED: "init exited",
    Code.KERNEL_OOPS: "kernel oops",
    Code.KERNEL_BUG: "kernel bug",
    Code.KERNEL_STALL: "the kernel is stuck",
    Code.KERNEL_PANIC: "kernel panic",
    Code.KERNEL_WARNING: "the kernel warned",
    Code.GDB_KASLR: "KASLR is on while a debugger is expected",
    Code.AGENT_UNREACHABLE: "kdlab's agent has no port: kdlabctl exec cannot "
    "reach the guest",
    Code.SHARE_NOT_MOUNTED: "a shared directory could not be mounted",
}


Diagnosis = Finding[Code]
"""One problem of a boot, and what to do about it. Its cause (``problem``)
quotes the console, and so does its fix when ``fix_quotes_evidence``."""


def summary(found: Diagnosis) -> str:
    """The cause as anyone may read it: no text of the guest's console."""
    return SUMMARIES[found.code]


def public_fix(found: Diagnosis, name: str) -> str:
    """The fix as anyone may read it: a crash's fix names the code location
    the console reported, so only the way to the report is public."""
    if found.code in _CRASHES:
        return f"its owner reads the report: kdlabctl logs {name}"
    if found.fix_quotes_evidence:
        return f"its owner reads the fix: kdlabctl show {name}"
    return found.fix


_CRASHES = frozenset(
    {
        Code.KERNEL_OOPS,
        Code.KERNEL_BUG,
        Code.KERNEL_STALL,
        Code.KERNEL_PANIC,
        Code.KERNEL_WARNING,
    }
)


def fatal(code: Code, cause: str, fix: str, evidence: tuple[str, ...]) -> Diagnosis:
    """A diagnosis of severity error: the boot, or the kernel, stops."""
    return Diagnosis(code, Severity.ERROR, cause, fix, evidence)


_ERRNO_MEANING = {
    -2: "no such device node",
    -6: "no such device",
    -19: "no such filesystem type",
    -22: "no filesystem the kernel knows",
}


def errno_text(error: int | None) -> str:
    """A kernel error number in words, to append: " (error -6: no such device)"."""
    if error is None:
        return ""
    meaning = _ERRNO_MEANING.get(error) or os.strerror(-error).lower()
    return f" (error {error}: {meaning})"
