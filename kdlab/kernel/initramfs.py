"""kdlab's initramfs: its ``/init``, and the catalogue of the lines it prints.

The ``/init`` has two modes, one per kind of VM:

- root (a VM with an image, :func:`init_script`): load the modules a virtio
  root disk needs, mount the root the kernel command line names and switch to
  it. Whatever fails is named on the console in a line of its own
  (``kdlab-initramfs: root device /dev/sda did not appear ...``), followed by
  an emergency shell; no panic follows.
- userspace (a VM without an image or initrd of its own,
  :func:`userspace_script`): the initramfs is the whole system. It mounts
  /proc, /sys, /dev (with /dev/pts), /run and /tmp, loads the kernel's
  modules, names the agent's virtio-serial port, mounts each shared directory
  of ``kdlab.shares=`` at ``/mnt/TAG``, says it is ready (:data:`READY`), and
  hands PID 1 to busybox init (:func:`inittab`), which keeps kdlab's agent
  (``kdlabctl exec``) and a shell on the console running, powers off on the
  ACPI power button (``kdlabctl stop``, through busybox acpid) and on
  ``poweroff``. PID 1 never exits: leaving the shell starts another.

Both name what fails in the catalogue's lines, and the boot diagnosis reads
them to tell what went wrong.

Both sides use one catalogue (:data:`CATALOGUE`): each line is a named
:class:`Message`, a template whose fields (``{root}``) the script prints with
shell expressions (``$root``) and the diagnosis reads with patterns. The script
is generated from the catalogue (:func:`init_script`), and kdlabd recognizes the
lines with it (:func:`recognize`): the two cannot drift apart.

kdlabctl packs the script with busybox and the modules (:mod:`kdlabctl.initramfs`).
"""

from __future__ import annotations

import re
import shlex
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from kdlab.agent import GUEST_PORT, PORT_NAME
from kdlab.kernel.guest import (
    ROOT_DEVICE,
    ROOT_FS,
    SHARES_DIRECTORY,
    SHARES_PARAMETER,
)

MODE_ROOT = "root"
MODE_USERSPACE = "userspace"
"""The two modes by name, as a VM's ``Initramfs`` would say which it boots
(a property kdlabd does not have yet: until then kdlabctl reads "")."""

PREFIX = "kdlab-initramfs: "
"""What every line of the script starts with."""

DIRECTORIES = ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")
"""The directories ``/init`` expects in the archive (the new root is mounted on
``/newroot``)."""
USERSPACE_DIRECTORIES = (
    "bin",
    "dev",
    "etc",
    "etc/acpi",
    "etc/acpi/PWRF",
    "lib",
    "lib/modules",
    SHARES_DIRECTORY.lstrip("/"),
    "proc",
    "root",
    "run",
    "sys",
    "tmp",
)
"""The directories of the userspace mode's archive (``etc/acpi`` is busybox
acpid's)."""
AGENT = "bin/kdlab-agent"
"""Where the userspace archive holds kdlab's agent (:mod:`kdlab.agent`)."""
POWER_BUTTON_HANDLER = "etc/acpi/PWRF/00000080"
"""What busybox acpid runs when the ACPI power button is pressed (its event
``PWRF``, parameter ``00000080``): :func:`power_button_handler`."""
AGENT_PORT_WAIT_SECONDS = 5
"""How long the userspace script waits for the agent's port once a
virtio-serial device is there (the host adds ports after the driver binds)."""

ROOT_FORMS = "root=/dev/NAME, root=UUID=... or root=LABEL=..."
"""The ``root=`` forms the script can look up."""
ROOT_WAIT_SECONDS = 15
"""How long the script waits for the root device to appear."""
NO_BLOCK_DEVICES = "none: is the disk's driver loaded?"
"""What the script lists as block devices when ``/sys/block`` is empty."""
ANY_FSTYPE = f"{ROOT_FS} or any"
"""The mount type the script names when no ``rootfstype=`` was given: it tries
:data:`~kdlab.kernel.guest.ROOT_FS`, then lets mount guess."""


def module_path(name: str) -> str:
    """Where the archive holds the module *name*, relative to its root."""
    return f"lib/modules/{name}.ko"


def mounted_device(what: str) -> str:
    """The device of a ``{what}`` field: ``/dev/vda`` for ``UUID=1 (/dev/vda)``
    (the script names a looked-up root by its tag, then its device)."""
    looked_up = re.fullmatch(r"\S+ \((?P<device>\S+)\)", what)
    return looked_up["device"] if looked_up else what


@dataclass(frozen=True)
class Field:
    """A value a message carries: how the script prints it, how it is read."""

    shell: str
    """A shell expression, valid inside double quotes."""
    pattern: str
    """A regular expression for the value as it appears in the line."""


FIELDS = {
    "module": Field("$module", r"[^\s:]+"),
    # insmod's error, on one line.
    "error": Field("$(echo ${error:-insmod failed})", r".*"),
    "root": Field("$root", r"\S*"),
    "disks": Field(f"${{disks:-{NO_BLOCK_DEVICES}}}", r".*"),
    # The root as root= named it, then the device a tag was found on.
    "what": Field("$what", r"\S+(?: \(\S+\))?"),
    "fstype": Field(f"${{rootfstype:-{ANY_FSTYPE}}}", r"\S+(?: or any)?"),
    "options": Field("$options", r"\S+"),
    # The filesystems the kernel can mount on a block device.
    "known": Field("$known", r".*"),
    "init": Field("$init", r"\S+"),
    "tag": Field("$tag", r"\S+"),
    "mountpoint": Field("$mountpoint", r"\S+"),
    # mount's error, on one line.
    "mount_error": Field("$(echo ${error:-mount failed})", r".*"),
    "port": Field("$port", r"\S+"),
    "status": Field("$status", r"\d+"),
}


@dataclass(frozen=True)
class Message:
    """One line the script prints (after :data:`PREFIX`), with ``{field}``s of
    :data:`FIELDS` in it."""

    name: str
    template: str

    @cached_property
    def parts(self) -> list[tuple[str, str | None]]:
        """The template as (literal text, field name or None) pairs."""
        return [
            (text, name) for text, name, _, _ in string.Formatter().parse(self.template)
        ]

    @property
    def fields(self) -> list[str]:
        return [name for _, name in self.parts if name is not None]

    @cached_property
    def shell(self) -> str:
        """The line as a double-quoted shell word, as the script prints it."""
        word = "".join(
            re.sub(r'([\\"$`])', r"\\\1", text) + (FIELDS[name].shell if name else "")
            for text, name in self.parts
        )
        return f'"{word}"'

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """What matches the line as the console log shows it: stripped, so that
        a field left empty at its end takes the space before it along."""
        regex = ""
        for index, (text, name) in enumerate(self.parts):
            last = index == len(self.parts) - 1
            if name is None:
                regex += re.escape(text)
            elif last and text.endswith(" "):
                field = FIELDS[name].pattern
                regex += f"{re.escape(text[:-1])}(?: (?P<{name}>{field}))?"
            else:
                regex += f"{re.escape(text)}(?P<{name}>{FIELDS[name].pattern})"
        return re.compile(f"^{re.escape(PREFIX)}{regex}$")

    def text(self, **values: str) -> str:
        """The line the script prints with these *values*."""
        return PREFIX + self.template.format(**values)

    def match(self, line: str) -> dict[str, str] | None:
        """The values of the fields when *line* is this message."""
        found = self.pattern.match(line.strip())
        if found is None:
            return None
        return {name: found[name] or "" for name in self.fields}


DEVTMPFS_MISSING = Message(
    "DEVTMPFS_MISSING",
    "cannot mount devtmpfs (CONFIG_DEVTMPFS=y?): no device node will appear",
)
MODULE_FAILED = Message("MODULE_FAILED", "cannot load module {module}: {error}")
ROOT_UNSUPPORTED = Message(
    "ROOT_UNSUPPORTED", f"root={{root}} is not supported here: use {ROOT_FORMS}"
)
ROOT_MISSING = Message(
    "ROOT_MISSING",
    f"root device {{root}} did not appear within {ROOT_WAIT_SECONDS} s; "
    "block devices: {disks}",
)
CANNOT_MOUNT = Message(
    "CANNOT_MOUNT",
    "cannot mount {what} on /newroot with type {fstype} and options {options}; "
    "this kernel mounts: {known}",
)
NO_INIT = Message(
    "NO_INIT", "init {init} is not on the root filesystem {what}: give init=..."
)
EMERGENCY_SHELL = Message(
    "EMERGENCY_SHELL", "emergency shell: look around, then leave it (exit) to try again"
)
MOUNTED = Message("MOUNTED", "mounted {what} with {options}, starting {init}")
SHARE_FAILED = Message(
    "SHARE_FAILED", "cannot mount share {tag} on {mountpoint}: {mount_error}"
)
AGENT_PORT_MISSING = Message(
    "AGENT_PORT_MISSING",
    "no virtio-serial port {port}: kdlabctl exec cannot reach this VM (the VM "
    "has no such port, or the kernel no virtio_console: CONFIG_VIRTIO_CONSOLE)",
)
READY = Message(
    "READY",
    "ready: a shell on the console, kdlab's agent for kdlabctl exec; "
    "poweroff (or kdlabctl stop) powers off",
)
AGENT_EXITED = Message(
    "AGENT_EXITED", "kdlab's agent exited with status {status}; starting it again"
)
SHELL_ENDED = Message(
    "SHELL_ENDED", "the shell ended; a new one starts (poweroff powers off)"
)
POWER_BUTTON = Message("POWER_BUTTON", "power button pressed: powering off")

CATALOGUE = {
    message.name: message
    for message in (
        DEVTMPFS_MISSING,
        MODULE_FAILED,
        ROOT_UNSUPPORTED,
        ROOT_MISSING,
        CANNOT_MOUNT,
        NO_INIT,
        EMERGENCY_SHELL,
        MOUNTED,
        SHARE_FAILED,
        AGENT_PORT_MISSING,
        READY,
        AGENT_EXITED,
        SHELL_ENDED,
        POWER_BUTTON,
    )
}
"""Every line the script can print, by name."""


def recognize(line: str) -> tuple[Message, dict[str, str]] | None:
    """The message *line* is, with its values; None for any other line."""
    if not line.startswith(PREFIX):
        return None
    for message in CATALOGUE.values():
        values = message.match(line)
        if values is not None:
            return message, values
    return None


def init_script(modules: Sequence[str]) -> bytes:
    """The ``/init`` that loads *modules* in this order and mounts the root."""
    return _script(
        "load the modules a virtio root disk needs, mount the root that the "
        "kernel command line names, and switch to it.",
        _SETUP + _SWITCH_ROOT,
        modules,
    )


def userspace_script(modules: Sequence[str]) -> bytes:
    """The userspace mode's ``/init``: set up, load *modules* in this order,
    mount the shares, then become busybox init (:func:`inittab`), which runs
    it again for each of its services (``/init agent``, ...)."""
    return _script(
        "the whole system of a VM without a root disk: set up, then hand PID 1 "
        "to busybox init (/etc/inittab), which runs this script again for each "
        "service.",
        _SERVICES + _SETUP + _USERSPACE,
        modules,
    )


def inittab() -> bytes:
    """busybox init's ``/etc/inittab`` in the userspace mode: the services it
    keeps running, and what it does on ``poweroff`` and Ctrl-Alt-Del."""
    return _INITTAB.encode()


def power_button_handler() -> bytes:
    """busybox acpid's handler of the power button (:data:`POWER_BUTTON_HANDLER`)."""
    return b"#!/bin/sh\nexec /init power-button\n"


def _script(purpose: str, body: str, modules: Sequence[str]) -> bytes:
    values = {
        "PURPOSE": purpose,
        "PREFIX": PREFIX,
        "MODULES": shlex.join(modules),
        "MODULE_PATH": module_path("$module"),
        "ROOT_DEVICE": ROOT_DEVICE,
        "ROOT_FS": ROOT_FS,
        "ROOT_WAIT_TRIES": str(ROOT_WAIT_SECONDS * 10),
        "AGENT": f"/{AGENT}",
        "PORT_NAME": PORT_NAME,
        "GUEST_PORT": GUEST_PORT,
        "PORT_WAIT_TRIES": str(AGENT_PORT_WAIT_SECONDS * 10),
        "SHARES_PARAMETER": SHARES_PARAMETER,
        "SHARES_DIRECTORY": SHARES_DIRECTORY,
        **{name: message.shell for name, message in CATALOGUE.items()},
    }
    script = re.sub(r"@([A-Z_]+)@", lambda m: values[m[1]], _HEAD + body)
    return script.encode()


# The scripts' parts. Each failure is said by emergency (or say), with a
# message of the catalogue.
_HEAD = r"""#!/bin/busybox sh
# kdlab's initramfs (kdlab/kernel/initramfs.py): @PURPOSE@
export PATH=/bin
set -f  # words of the command line are never globs

say() {
    echo "@PREFIX@$*"
}
"""

# PID 1 mounts, installs busybox's applets and loads the modules.
_SETUP = r"""
# busybox --install finds itself through /proc/self/exe.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev ||
    say @DEVTMPFS_MISSING@
cmdline=$(cat /proc/cmdline)

for module in @MODULES@; do
    # As modprobe does, give MODULE.PARAM=VALUE from the command line to MODULE.
    params=
    for arg in $cmdline; do
        case $arg in
            "$module".*=*) params="$params ${arg#"$module".}" ;;
        esac
    done
    error=$(insmod "/@MODULE_PATH@" $params 2>&1) ||
        say @MODULE_FAILED@
done
"""

_SWITCH_ROOT = r"""
emergency() {
    say "$*"
    say @EMERGENCY_SHELL@
    # cttyhack makes the console the shell's controlling tty: job control, ^C.
    setsid cttyhack sh
}

root=@ROOT_DEVICE@ rootfstype= rootflags= mode=ro init=/sbin/init
for arg in $cmdline; do
    case $arg in
        --) break ;;
        root=*) root=${arg#root=} ;;
        rootfstype=*) rootfstype=${arg#rootfstype=} ;;
        rootflags=*) rootflags=${arg#rootflags=} ;;
        ro | rw) mode=$arg ;;
        init=*) init=${arg#init=} ;;
    esac
done
options=$mode${rootflags:+,$rootflags}

find_root() {
    case $root in
        UUID=* | LABEL=*) findfs "$root" 2>/dev/null ;;
        *) [ -b "$root" ] && echo "$root" ;;
    esac
}

wait_for_root() {
    tries=@ROOT_WAIT_TRIES@
    until device=$(find_root); do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || return 1
        sleep 0.1
    done
}

mount_root() {
    if [ -n "$rootfstype" ]; then
        mount -t "$rootfstype" -o "$options" "$device" /newroot
    else
        mount -t @ROOT_FS@ -o "$options" "$device" /newroot 2>/dev/null ||
            mount -o "$options" "$device" /newroot
    fi
}

try_root() {
    case $root in
        /dev/* | UUID=* | LABEL=*) ;;
        *)
            emergency @ROOT_UNSUPPORTED@
            return 1
            ;;
    esac
    if ! wait_for_root; then
        # One line: the names, separated by blanks.
        disks=$(echo $(ls /sys/block))
        emergency @ROOT_MISSING@
        return 1
    fi
    what=$root
    [ "$device" = "$root" ] || what="$root ($device)"
    if ! mount_root; then
        known=$(echo $(grep -v nodev /proc/filesystems))
        emergency @CANNOT_MOUNT@
        return 1
    fi
    if [ ! -e "/newroot$init" ] && [ ! -L "/newroot$init" ]; then
        umount /newroot
        emergency @NO_INIT@
        return 1
    fi
}

until try_root; do :; done
say @MOUNTED@
for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs" 2>/dev/null || umount -l "/$fs"
done
# The kernel's arguments for init (single, ...) are this script's.
exec switch_root /newroot "$init" "$@"
"""

# busybox init runs the script again (not as PID 1) for each service of
# /etc/inittab; each returns to init, which starts it again.
_SERVICES = r"""
if [ "$$" != 1 ]; then
    case ${1-} in
        agent)
            @AGENT@
            status=$?
            say @AGENT_EXITED@
            sleep 1 # not in a loop faster than that
            ;;
        shell)
            export HOME=/root
            cd /root
            # cttyhack makes the console the shell's controlling tty: job
            # control, ^C.
            setsid cttyhack sh
            say @SHELL_ENDED@
            ;;
        power-button)
            # acpid's output goes to its log: this line is for the console.
            say @POWER_BUTTON@ >/dev/console
            # At once: busybox init's poweroff waits 2 s for processes to end,
            # and the agent's commands end with the VM anyway.
            sync
            exec poweroff -f
            ;;
        *)
            echo "usage: /init agent|shell|power-button (busybox init's services)" >&2
            exit 2
            ;;
    esac
    exit 0
fi
"""

_USERSPACE = r"""
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname kdlab

# udev would name the virtio-serial ports in /dev/virtio-ports; there is none.
link_ports() {
    mkdir -p /dev/virtio-ports
    for vport in $(ls /sys/class/virtio-ports 2>/dev/null); do
        name=$(cat "/sys/class/virtio-ports/$vport/name" 2>/dev/null)
        [ -n "$name" ] && ln -sf "../$vport" "/dev/virtio-ports/$name"
    done
    [ -e @GUEST_PORT@ ]
}

port=@PORT_NAME@
if ls /sys/bus/virtio/drivers/virtio_console 2>/dev/null | grep -q '^virtio'; then
    # The driver is bound: the host adds its ports in a moment.
    tries=@PORT_WAIT_TRIES@
    until link_ports; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || break
        sleep 0.1
    done
fi
link_ports ||
    say @AGENT_PORT_MISSING@

shares=
for arg in $cmdline; do
    case $arg in
        --) break ;;
        @SHARES_PARAMETER@=*) shares=${arg#@SHARES_PARAMETER@=} ;;
    esac
done
for tag in $(echo "$shares" | tr , ' '); do
    mountpoint=@SHARES_DIRECTORY@/$tag
    mkdir -p "$mountpoint"
    error=$(mount -t virtiofs "$tag" "$mountpoint" 2>&1) ||
        say @SHARE_FAILED@
done

say @READY@
exec init
"""

_INITTAB = """\
# kdlab's initramfs (kdlab/kernel/initramfs.py): busybox init's services.
::respawn:/init agent
::respawn:/init shell
::respawn:/bin/acpid -f -l /run/acpid.log
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
"""
