"""Is this kernel config good for kdlab? Find a tree's ``.config``, read it, judge it.

A kernel boots in a kdlab VM from a whole-disk virtio root (``root=/dev/vda``) with
its console on ``ttyS0``, and is debugged with gdb and the kernel's ``lx-*`` helpers.
Each way a ``.config`` can defeat that is a :class:`Finding` with a concrete fix:
the classic ``VFS: Unable to mount root fs`` (virtio or ext4 missing, or modules
without an initramfs), a silent console, a gdb without symbols or helpers, a
Debian fstab that stalls the boot.

Pure functions: files are only read (and a build directory stat'ed), nothing runs.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

Config = Mapping[str, str]
"""A parsed ``.config``: ``{"CONFIG_VIRTIO_BLK": "m", ...}``; unset options absent."""


class KernelError(Exception):
    """A kernel tree, build directory or config kdlab cannot use; the message says
    what to do about it."""


class Severity(enum.StrEnum):
    """How much a finding matters: only errors fail ``kdlabctl kernel check``."""

    ERROR = "error"  # the VM cannot boot, show output or be debugged
    WARNING = "warning"  # works only with help (an initramfs), or in some images
    NOTE = "note"  # kdlab handles it; worth knowing


@dataclass(frozen=True)
class Finding:
    """One problem of a config for kdlab, and what to set instead."""

    code: str  # stable, for scripts: "module-needs-initramfs", ...
    severity: Severity
    option: str  # CONFIG_...
    problem: str
    fix: str


class Location(NamedTuple):
    """Where a kernel's files are: its ``.config`` and, when known, source and build."""

    config: Path
    tree: Path | None  # the source tree (scripts/config, Kconfig files)
    build: Path | None  # the tree itself, or the O= directory


# What kdlab's VMs boot from: virtio disk behind virtio-pci, ext4 root.
BOOT_DRIVERS = ("VIRTIO_PCI", "VIRTIO_BLK", "EXT4_FS")
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

_REBUILD = "then rebuild (kdlabctl kernel build PATH)"


def locate(path: Path | str) -> Location:
    """Find the ``.config`` for *path*: a source tree, an ``O=`` build directory, or
    a config file (``/boot/config-*``, or a ``.config`` whose directory is a tree)."""
    path = Path(path)
    if path.is_file():
        if path.name != ".config":
            return Location(path, None, None)
        return Location(path, *directories(path.parent))
    tree, build = directories(path)
    if tree is None and build is None:
        raise KernelError(
            f"{path} is neither a kernel source tree, an O= build directory "
            "nor a .config file"
        )
    assert build is not None
    config = build / ".config"
    if not config.is_file():
        hint = "" if build != tree else " (built with O=DIR? give DIR instead)"
        raise KernelError(
            f"no .config in {build}{hint}: run kdlabctl kernel configure {path}"
        )
    return Location(config, tree, build)


def source_tree_of(build: Path) -> Path | None:
    """The source tree an ``O=`` directory was made from, or None if it is not one.

    Kbuild leaves a ``source`` symlink and a ``Makefile`` that includes the tree's.
    """
    link = build / "source"
    if link.is_symlink() and is_source_tree(link.resolve()):
        return link.resolve()
    try:
        makefile = (build / "Makefile").read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^include\s+(\S+)/Makefile\s*$", makefile, re.MULTILINE)
    if match and is_source_tree(Path(match.group(1))):
        return Path(match.group(1))
    return None


def is_source_tree(path: Path) -> bool:
    """Whether *path* is the top of a Linux source tree."""
    return all(
        (path / name).exists() for name in ("Kconfig", "Makefile", "scripts/config")
    )


def directories(path: Path) -> tuple[Path | None, Path | None]:
    """(tree, build) for a directory: a tree builds in itself, an O= directory in
    itself from its tree; (None, None) for anything else."""
    if is_source_tree(path):
        return path, path
    tree = source_tree_of(path)
    return (tree, path) if tree is not None else (None, None)


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


def check(config: Config, build_dir: Path | None = None) -> list[Finding]:
    """Everything in *config* that stops a kdlab VM from booting or being debugged,
    errors first. With *build_dir*, also what the last build left out."""
    findings = [
        *_debug_info(config),
        *_gdb_scripts(config, build_dir),
        *_boot_drivers(config),
        *_console(config),
        *_devtmpfs(config),
        *_initrd(config),
        *_systemd(config),
        *_fstab_filesystems(config),
        *_power_button(config),
        *_kaslr(config),
    ]
    order = list(Severity)
    return sorted(findings, key=lambda f: order.index(f.severity))


def errors(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity is Severity.ERROR]


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
        ],
        True,
    )
    wanted.update(DEBUG_INFO_NONE=False, DEBUG_INFO_REDUCED=False)
    return wanted


def report(
    findings: Sequence[Finding], config: Path | None = None
) -> dict[str, object]:
    """The findings as plain data: what ``kdlabctl kernel check --json`` prints."""
    counts = {s.value: sum(f.severity is s for f in findings) for s in Severity}
    data: dict[str, object] = {
        "ok": counts[Severity.ERROR] == 0,
        "counts": counts,
        "findings": [asdict(f) for f in findings],
    }
    if config is not None:
        data["config"] = str(config)
    return data


def report_json(findings: Sequence[Finding], config: Path | None = None) -> str:
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
) -> Finding:
    return Finding(code, severity, f"CONFIG_{option}", problem, fix)


def _debug_info(config: Config) -> Iterator[Finding]:
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


def _gdb_scripts(config: Config, build_dir: Path | None) -> Iterator[Finding]:
    if not _on(config, "GDB_SCRIPTS"):
        yield _finding(
            "no-gdb-scripts",
            Severity.ERROR,
            "GDB_SCRIPTS",
            "no vmlinux-gdb.py: gdb has no lx-* helpers (lx-dmesg, lx-ps, ...)",
            f"set CONFIG_GDB_SCRIPTS=y (needs debug info), {_REBUILD}",
        )
    elif (
        build_dir is not None
        and (build_dir / "vmlinux").is_file()
        and not (build_dir / "vmlinux-gdb.py").exists()
    ):
        yield _finding(
            "gdb-scripts-not-built",
            Severity.WARNING,
            "GDB_SCRIPTS",
            f"vmlinux is built but {build_dir / 'vmlinux-gdb.py'} is missing",
            "run make scripts_gdb (kdlabctl kernel build PATH does)",
        )


def _boot_drivers(config: Config) -> Iterator[Finding]:
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


def _console(config: Config) -> Iterator[Finding]:
    for option in CONSOLE:
        if not _on(config, option):
            yield _finding(
                "no-serial-console",
                Severity.ERROR,
                option,
                "no console on ttyS0: the VM boots (or panics) without a word",
                f"set CONFIG_{option}=y (built in, not a module), {_REBUILD}",
            )


def _devtmpfs(config: Config) -> Iterator[Finding]:
    if not _on(config, "DEVTMPFS"):
        yield _finding(
            "no-devtmpfs",
            Severity.ERROR,
            "DEVTMPFS",
            "no /dev: systemd and kdlab's initramfs mount devtmpfs there",
            f"set CONFIG_DEVTMPFS=y and CONFIG_DEVTMPFS_MOUNT=y, {_REBUILD}",
        )


def _initrd(config: Config) -> Iterator[Finding]:
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


def _systemd(config: Config) -> Iterator[Finding]:
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


def _fstab_filesystems(config: Config) -> Iterator[Finding]:
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


def _power_button(config: Config) -> Iterator[Finding]:
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


def _kaslr(config: Config) -> Iterator[Finding]:
    if _on(config, "RANDOMIZE_BASE"):
        yield _finding(
            "kaslr",
            Severity.NOTE,
            "RANDOMIZE_BASE",
            "KASLR moves the kernel away from vmlinux's addresses: breakpoints miss",
            "nothing to do: kdlab boots with nokaslr while a gdbstub is on "
            "(set CONFIG_RANDOMIZE_BASE=n to debug without kdlab)",
        )
