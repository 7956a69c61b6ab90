"""Is this kernel config good for kdlab? The rules, on a parsed ``.config``.

A kernel boots in a kdlab VM from a whole-disk virtio root (``root=/dev/vda``) with
its console on ``ttyS0``, and is debugged with gdb and the kernel's ``lx-*`` helpers
(:mod:`kdlab.kernel.guest`). Each way a ``.config`` can defeat that is a
:class:`~kdlab.kernel.findings.Finding` with a concrete fix: the classic ``VFS:
Unable to mount root fs`` (virtio or ext4 missing, or modules without an
initramfs), a silent console, a gdb without symbols or helpers, a Debian fstab
that stalls the boot. The boot diagnosis gives the same fixes for what it sees
of the same problems (:data:`DEVTMPFS_FIX`, :func:`fs_option`, ...).

Pure functions on text: finding and reading a tree's ``.config`` is kdlabctl's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from kdlab.kernel.findings import Finding, Severity
from kdlab.kernel.guest import (
    AGENT_DRIVERS,
    DUMP_CORE,
    DUMP_DRIVERS,
    ROOT_DISK_DRIVERS,
    ROOT_FS,
    SHARE_DRIVERS,
)

Config = Mapping[str, str]
"""A parsed ``.config``: ``{"CONFIG_VIRTIO_BLK": "m", ...}``; unset options absent."""

ConfigFinding = Finding[str]
"""A finding of the config check; its code is one of a few stable strings
(``"module-needs-initramfs"``, ...)."""

# The filesystem each type needs, by type as mount(8) and rootfstype= name it.
FS_OPTIONS = {
    "ext2": "EXT4_FS",
    "ext3": "EXT4_FS",
    "ext4": "EXT4_FS",
    "xfs": "XFS_FS",
    "btrfs": "BTRFS_FS",
    "vfat": "VFAT_FS",
    "f2fs": "F2FS_FS",
    "erofs": "EROFS_FS",
    "squashfs": "SQUASHFS",
    "iso9660": "ISO9660_FS",
    "9p": "9P_FS",
    "virtiofs": "VIRTIO_FS",
}

# What kdlab's VMs boot from: virtio disk behind virtio-pci, ext4 root.
BOOT_DRIVERS = (*ROOT_DISK_DRIVERS, FS_OPTIONS[ROOT_FS])
CONSOLE = ("SERIAL_8250", "SERIAL_8250_CONSOLE")
# kdlab's images do not mount these, but the fstab of syzkaller's create-image.sh
# and its copies does: a kernel without them waits for the mount and times out.
FSTAB_FILESYSTEMS = ("CONFIGFS_FS", "SECURITYFS")

# systemd's README, "REQUIREMENTS" (v252, Debian 12), plus what glibc and Debian's
# boot rely on where tinyconfig turns it off (each checked by booting a Debian 12
# image to a login prompt).
SYSTEMD_NEEDS = {
    "CGROUPS": "systemd puts every service in a cgroup",
    "INOTIFY_USER": "systemd and udev watch files with inotify",
    "SIGNALFD": "systemd's event loop reads signals from a signalfd",
    "TIMERFD": "systemd's timers are timerfds",
    "EPOLL": "systemd's event loop is epoll",
    "EVENTFD": "systemd's event loop wakes itself with eventfds",
    "UNIX": "journald, udev and D-Bus talk over AF_UNIX sockets",
    "SYSFS": "udev and systemd read devices from /sys",
    "PROC_FS": "everything reads /proc",
    "FHANDLE": "systemd and libudev track mounts with name_to_handle_at()",
    "FUTEX": "glibc's threads and locks are futexes",
    "MULTIUSER": "without it there are no uids but root: setuid() fails",
    "POSIX_TIMERS": "glibc and systemd use clock_* and timer_* calls",
    "SHMEM": "memfd_create() and a tmpfs that can be limited need shmem",
    "TMPFS": "systemd mounts /run, /dev/shm and /tmp as tmpfs",
    "FILE_LOCKING": "dpkg, systemd and udev take flock() locks",
    # Without it PID_MAX_LIMIT is 32768, and Debian's sysctl.d sets 4194304.
    "BASE_FULL": "kernel.pid_max cannot take Debian's value: systemd-sysctl fails",
}

# A graceful "kdlabctl stop" is an ACPI power-button press: the kernel turns it
# into an input event and systemd-logind reads it from /dev/input/event*.
POWER_BUTTON = {
    "ACPI": "the guest never sees the power button",
    "INPUT": "the guest has no input devices, the power button among them",
    "ACPI_BUTTON": "the power button is no input device",
    "INPUT_EVDEV": "systemd-logind cannot read the power button from /dev/input",
}

# kdlabctl exec and shared directories (what each option gives them; each is
# a driver of kdlab.kernel.guest that kdlab's initramfs loads).
GUEST_SERVICES = {
    "VIRTIO_CONSOLE": "kdlabctl exec cannot reach the guest: kdlab's agent talks "
    "to kdlabd over a virtio-serial port",
    "FUSE_FS": "shared directories (--share) cannot be mounted: virtiofs is FUSE",
    "VIRTIO_FS": "shared directories (--share) cannot be mounted in the guest",
}
# The drivers kdlab's initramfs loads when they are modules: as good as built
# in for a VM that boots it (a note, not a warning).
_LOADED_BY_INITRAMFS = {**DUMP_DRIVERS, **AGENT_DRIVERS, **SHARE_DRIVERS}

# A dump kdlabd writes on a panic: what each option gives it (FW_CFG_SYSFS and
# PVPANIC_MMIO are :data:`~kdlab.kernel.guest.DUMP_DRIVERS`).
DUMPS = {
    "FW_CFG_SYSFS": "dumps carry no VMCOREINFO (the guest gives QEMU none): "
    "drgn and crash cannot read them",
    "PVPANIC": "kdlabd learns of a panic only from the console, later, and "
    "misses a panic that prints nothing",
    "PVPANIC_MMIO": "QEMU's pvpanic device has no driver: kdlabd learns of a "
    "panic only from the console",
    "MAGIC_SYSRQ": "no /proc/sysrq-trigger: echo c there cannot crash the "
    "kernel for a dump",
}
# crash reads a dump through the slab allocator's structures: SLAB or SLUB.
# SLOB (tinyconfig's choice until Linux 6.4) stops it at kmem_cache_init().
CRASH_ALLOCATOR = "SLUB"

# The option that selects DUMP_CORE (neither has a prompt): /proc/kcore, cheap.
# wanted_options asks for both: the selector makes the other stick.
DUMP_CORE_SELECTOR = "PROC_KCORE"

DEVTMPFS_FIX = "set CONFIG_DEVTMPFS=y and CONFIG_DEVTMPFS_MOUNT=y"
"""Without devtmpfs no device node appears in ``/dev``: neither systemd nor
kdlab's initramfs (which mounts it itself) finds a disk or a console."""

_REBUILD = "then rebuild (kdlabctl kernel build PATH)"


def options_text(options: Iterable[str]) -> str:
    """``CONFIG_VIRTIO_PCI=y and CONFIG_VIRTIO_BLK=y``: *options* built in."""
    return " and ".join(f"CONFIG_{option}=y" for option in options)


def fs_option(fstype: str) -> str:
    """``CONFIG_XFS_FS=y``: what a kernel needs to mount *fstype*."""
    return f"CONFIG_{FS_OPTIONS.get(fstype, f'{fstype.upper()}_FS')}=y"


def parse(text: str) -> dict[str, str]:
    """The options a ``.config`` sets, as Kconfig reads it: the last line wins.

    ``# CONFIG_X is not set`` means absent; strings lose their quotes and escapes.
    """
    options: dict[str, str] = {}
    for line in text.splitlines():
        if match := _ASSIGNMENT.match(line):
            name, value = match.groups()
            if value.startswith('"') and value.endswith('"') and len(value) > 1:
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            options[name] = value
        elif match := _UNSET.match(line):
            options.pop(match.group(1), None)
    return options


_ASSIGNMENT = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def check(
    config: Config, unbuilt_gdb_scripts: Path | None = None
) -> list[ConfigFinding]:
    """Everything in *config* that stops a kdlab VM from booting or being debugged,
    errors first. *unbuilt_gdb_scripts*: the ``vmlinux-gdb.py`` the last build
    left out, if it left it out."""
    findings = [
        *_debug_info(config),
        *_gdb_scripts(config, unbuilt_gdb_scripts),
        *_boot_drivers(config),
        *_console(config),
        *_devtmpfs(config),
        *_initrd(config),
        *_systemd(config),
        *_fstab_filesystems(config),
        *_power_button(config),
        *_dumps(config),
        *_needs(config, GUEST_SERVICES, "guest-service-needs", "guest-module"),
        *_kaslr(config),
    ]
    order = list(Severity)
    return sorted(findings, key=lambda f: order.index(f.severity))


def wanted_options() -> dict[str, bool]:
    """The options :func:`check` wants on (True) or off (False), with what they
    depend on: the ``scripts/config`` edits that make any config pass.

    ``DEBUG_INFO`` is a prompt before Linux 5.18 and selected by the DWARF choice
    since: both are asked for, and the choice's "none" is turned off.
    """
    wanted = dict.fromkeys(
        [
            "DEBUG_KERNEL",
            "DEBUG_INFO",
            "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT",
            "GDB_SCRIPTS",
            "VIRTIO_MENU",
            "BLK_DEV",
            *BOOT_DRIVERS,
            *CONSOLE,
            "DEVTMPFS",
            "DEVTMPFS_MOUNT",
            "BLK_DEV_INITRD",
            "RD_GZIP",
            *SYSTEMD_NEEDS,
            *FSTAB_FILESYSTEMS,
            *POWER_BUTTON,
            *DUMPS,
            *GUEST_SERVICES,
            DUMP_CORE_SELECTOR,
            DUMP_CORE[0],
            CRASH_ALLOCATOR,
        ],
        True,
    )
    wanted.update(DEBUG_INFO_NONE=False, DEBUG_INFO_REDUCED=False)
    return wanted


_REPORTED = ("code", "severity", "option", "problem", "fix")


def report(
    findings: Sequence[ConfigFinding], config: Path | None = None
) -> dict[str, object]:
    """The findings as plain data: what ``kdlabctl kernel check --json`` prints."""
    counts = {s.value: sum(f.severity is s for f in findings) for s in Severity}
    data: dict[str, object] = {
        "ok": counts[Severity.ERROR] == 0,
        "counts": counts,
        "findings": [{key: getattr(f, key) for key in _REPORTED} for f in findings],
    }
    if config is not None:
        data["config"] = str(config)
    return data


def report_json(findings: Sequence[ConfigFinding], config: Path | None = None) -> str:
    return json.dumps(report(findings, config), indent=2, sort_keys=True)


def _on(config: Config, option: str) -> bool:
    return config.get(f"CONFIG_{option}") == "y"


def _state(config: Config, option: str) -> str:
    """An option that should be =y, in words: the guest's disk image holds no
    modules of a kernel booted from outside it, so =m is as good as off."""
    if config.get(f"CONFIG_{option}") == "m":
        return "a module the image does not have"
    return "off"


def _finding(
    code: str, severity: Severity, option: str, problem: str, fix: str
) -> ConfigFinding:
    return Finding(code, severity, problem, fix, option=f"CONFIG_{option}")


def _debug_info(config: Config) -> Iterator[ConfigFinding]:
    if not _on(config, "DEBUG_INFO"):
        if "CONFIG_DEBUG_INFO_NONE" in config:  # the DWARF choice exists: >= 5.18
            how = "set CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y (or DWARF5)"
        else:
            how = (
                "set CONFIG_DEBUG_KERNEL=y and "
                "CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y (Linux >= 5.18) "
                "or CONFIG_DEBUG_INFO=y (older)"
            )
        yield _finding(
            "no-debug-info",
            Severity.ERROR,
            "DEBUG_INFO",
            "vmlinux has no DWARF: gdb shows no source, types or variables",
            f"{how}, {_REBUILD}",
        )
    if _on(config, "DEBUG_INFO_REDUCED"):
        yield _finding(
            "debug-info-reduced",
            Severity.ERROR,
            "DEBUG_INFO_REDUCED",
            "structure types are left out: gdb and the lx-* helpers cannot read them",
            f"set CONFIG_DEBUG_INFO_REDUCED=n, {_REBUILD}",
        )


def _gdb_scripts(config: Config, unbuilt: Path | None) -> Iterator[ConfigFinding]:
    if not _on(config, "GDB_SCRIPTS"):
        yield _finding(
            "no-gdb-scripts",
            Severity.ERROR,
            "GDB_SCRIPTS",
            "no vmlinux-gdb.py: gdb has no lx-* helpers (lx-dmesg, lx-ps, ...)",
            f"set CONFIG_GDB_SCRIPTS=y (needs debug info), {_REBUILD}",
        )
    elif unbuilt is not None:
        yield _finding(
            "gdb-scripts-not-built",
            Severity.WARNING,
            "GDB_SCRIPTS",
            f"vmlinux is built but {unbuilt} is missing",
            "run make scripts_gdb (kdlabctl kernel build PATH does)",
        )


def _boot_drivers(config: Config) -> Iterator[ConfigFinding]:
    for option in BOOT_DRIVERS:
        value = config.get(f"CONFIG_{option}")
        if value == "m":
            yield _finding(
                "module-needs-initramfs",
                Severity.WARNING,
                option,
                "built as a module: the root disk is found only with an initramfs",
                "boot with one (kdlabctl create --modules DIR builds it) or set "
                f"CONFIG_{option}=y",
            )
        elif value != "y":
            yield _finding(
                "missing-boot-driver",
                Severity.ERROR,
                option,
                "the root disk (virtio, ext4) cannot be mounted: "
                "VFS: Unable to mount root fs",
                f"set CONFIG_{option}=y, {_REBUILD}",
            )


def _console(config: Config) -> Iterator[ConfigFinding]:
    for option in CONSOLE:
        if not _on(config, option):
            yield _finding(
                "no-serial-console",
                Severity.ERROR,
                option,
                "no console on ttyS0: the VM boots (or panics) without a word",
                f"set CONFIG_{option}=y (built in, not a module), {_REBUILD}",
            )


def _devtmpfs(config: Config) -> Iterator[ConfigFinding]:
    if not _on(config, "DEVTMPFS"):
        yield _finding(
            "no-devtmpfs",
            Severity.ERROR,
            "DEVTMPFS",
            "no /dev: systemd and kdlab's initramfs mount devtmpfs there",
            f"{DEVTMPFS_FIX}, {_REBUILD}",
        )


def _initrd(config: Config) -> Iterator[ConfigFinding]:
    modules = [o for o in BOOT_DRIVERS if config.get(f"CONFIG_{o}") == "m"]
    if not modules:
        return
    needed = ", ".join(modules)
    if not _on(config, "BLK_DEV_INITRD"):
        yield _finding(
            "no-initrd-support",
            Severity.ERROR,
            "BLK_DEV_INITRD",
            f"{needed} can only load from an initramfs, and this kernel takes none",
            f"set CONFIG_BLK_DEV_INITRD=y, or build {needed} in (=y)",
        )
    elif not _on(config, "RD_GZIP"):
        yield _finding(
            "no-initrd-gzip",
            Severity.ERROR,
            "RD_GZIP",
            f"{needed} load from kdlab's initramfs, which is gzip'd: "
            "this kernel cannot unpack it",
            f"set CONFIG_RD_GZIP=y, or build {needed} in (=y)",
        )


def _systemd(config: Config) -> Iterator[ConfigFinding]:
    for option, why in SYSTEMD_NEEDS.items():
        if not _on(config, option):
            yield _finding(
                "systemd-needs",
                Severity.WARNING,
                option,
                f"systemd in a Debian image needs it (a busybox initramfs does "
                f"not): {why}",
                f"set CONFIG_{option}=y",
            )


def _fstab_filesystems(config: Config) -> Iterator[ConfigFinding]:
    for option in FSTAB_FILESYSTEMS:
        value = config.get(f"CONFIG_{option}")
        if value == "y":
            continue
        yield _finding(
            "fstab-filesystem",
            Severity.WARNING,
            option,
            f"{_state(config, option)}: a Debian fstab that mounts it (as "
            "syzkaller's create-image.sh writes) stalls the boot; kdlab's images "
            "do not mount it",
            f"set CONFIG_{option}=y, or remove the line from the image's /etc/fstab",
        )


def _power_button(config: Config) -> Iterator[ConfigFinding]:
    for option, why in POWER_BUTTON.items():
        if _on(config, option):
            continue
        yield _finding(
            "no-power-button",
            Severity.WARNING,
            option,
            f"{_state(config, option)}, so {why}: kdlabctl stop waits for its "
            "timeout, then pulls the plug",
            f"set CONFIG_{option}=y",
        )


def _dumps(config: Config) -> Iterator[ConfigFinding]:
    """What a dump needs (the VM still boots and debugs without it: warnings).

    A driver of :data:`~kdlab.kernel.guest.DUMP_DRIVERS` as a module works
    when kdlab's initramfs loads it: a note.
    """
    if not any(_on(config, option) for option in DUMP_CORE):
        yield _finding(
            "dump-needs",
            Severity.WARNING,
            DUMP_CORE[0],
            "the kernel keeps no VMCOREINFO: dumps cannot say where its "
            "symbols are (drgn and crash cannot read them)",
            f"set CONFIG_{DUMP_CORE_SELECTOR}=y (it selects CONFIG_CRASH_CORE, "
            "CONFIG_VMCORE_INFO since Linux 6.9)",
        )
    if _on(config, "SLOB"):
        yield _finding(
            "dump-needs",
            Severity.NOTE,
            "SLOB",
            "crash cannot read this kernel's dumps (it knows the SLAB and SLUB "
            "allocators only); drgn can",
            f"set CONFIG_{CRASH_ALLOCATOR}=y",
        )
    yield from _needs(config, DUMPS, "dump-needs", "dump-module")


def _needs(
    config: Config, needs: Mapping[str, str], code: str, module_code: str
) -> Iterator[ConfigFinding]:
    """Each option of *needs* (with what goes wrong without it) that is not
    built in: a warning *code*, or a note *module_code* when it is a module
    kdlab's initramfs loads."""
    for option, why in needs.items():
        module = _LOADED_BY_INITRAMFS.get(option)
        if module and config.get(f"CONFIG_{option}") == "m":
            yield _finding(
                module_code,
                Severity.NOTE,
                option,
                f"a module ({module}): {why} unless it is loaded; kdlab's "
                "initramfs loads it",
                "boot with kdlab's initramfs (the default without --image; "
                f"with one, --modules DIR) or set CONFIG_{option}=y",
            )
        elif not _on(config, option):
            yield _finding(
                code,
                Severity.WARNING,
                option,
                f"{_state(config, option)}: {why}",
                f"set CONFIG_{option}=y",
            )


def _kaslr(config: Config) -> Iterator[ConfigFinding]:
    if _on(config, "RANDOMIZE_BASE"):
        yield _finding(
            "kaslr",
            Severity.NOTE,
            "RANDOMIZE_BASE",
            "KASLR moves the kernel away from vmlinux's addresses: breakpoints miss",
            "nothing to do: kdlab boots with nokaslr while a gdbstub is on "
            "(set CONFIG_RANDOMIZE_BASE=n to debug without kdlab)",
        )
