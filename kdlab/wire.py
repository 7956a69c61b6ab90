"""Names on the bus, shared by kdlabd and kdlabctl.

This module is stdlib-only on purpose: kdlabctl imports it, and must start
without pulling in libvirt or lxml.
"""

from __future__ import annotations

import os
import re

BUS_NAME = "org.kdlab.Kdlab1"
MANAGER_PATH = "/org/kdlab/Kdlab1"
MANAGER_INTERFACE = "org.kdlab.Kdlab1.Manager"
VM_INTERFACE = "org.kdlab.Kdlab1.VM"
VM_PATH_PREFIX = f"{MANAGER_PATH}/vm"
IMAGE_INTERFACE = "org.kdlab.Kdlab1.Image"
IMAGE_PATH_PREFIX = f"{MANAGER_PATH}/image"
JOB_INTERFACE = "org.kdlab.Kdlab1.Job"
JOB_PATH_PREFIX = f"{MANAGER_PATH}/job"
DUMP_INTERFACE = "org.kdlab.Kdlab1.Dump"
DUMP_PATH_PREFIX = f"{MANAGER_PATH}/dump"
NO_DUMP_PATH = "/"  # a VM's LatestDump when it has none
RECORDING_INTERFACE = "org.kdlab.Kdlab1.Recording"
RECORDING_PATH_PREFIX = f"{MANAGER_PATH}/recording"
NO_RECORDING_PATH = "/"  # a VM's RunRecording when it runs no recording
PROCESS_INTERFACE = "org.kdlab.Kdlab1.Process"
PROCESS_PATH_PREFIX = f"{MANAGER_PATH}/process"
ERROR_PREFIX = "org.kdlab.Kdlab1.Error."

# Bumped on every additive change of the interfaces in xml/dbus/.
API_REVISION = 9

# The ``a{sv}`` options of each method that takes them: every key and its D-Bus
# type, as the contract (xml/dbus/) documents them. kdlabd refuses any other
# key or type; kdlabctl sends each value with its key's type.
CREATE_OPTIONS = {
    "kernel": "h",
    "initrd": "h",
    "cmdline": "s",
    "memory_mib": "u",
    "vcpus": "u",
    "gdb": "b",
    "gdb_tcp_port": "q",
    "vmlinux": "s",
    "kernel_path": "s",
    "tree": "s",
    "image": "s",
    "disk_size": "t",
    "extra_disks": "at",
    "on_panic": "s",
    "shares": "a{ss}",
    "initramfs": "s",
}
BUILD_OPTIONS = {"suite": "s", "size": "t", "packages": "as", "ssh_key": "s"}
START_OPTIONS = {"paused": "b", "kernel": "h", "checkpoint": "s", "initrd": "h"}
SAVE_CHECKPOINT_OPTIONS: dict[str, str] = {}
RESTORE_CHECKPOINT_OPTIONS = {"paused": "b"}
STOP_OPTIONS = {"force": "b", "timeout": "u"}
TAKE_DUMP_OPTIONS = {"compress": "b"}
RECORD_OPTIONS = {"name": "s", "paused": "b", "single_cpu": "b"}
REPLAY_OPTIONS = {"snapshot_interval": "d"}
EXEC_OPTIONS = {
    "stdin": "h",
    "env": "as",
    "cwd": "s",
    "tty": "b",
    "rows": "q",
    "cols": "q",
    "timeout": "d",
}

# A VM's OnPanic (CreateVM's on_panic): what kdlabd does when its kernel panics.
ON_PANIC_DUMP_AND_STOP = "dump-and-stop"
ON_PANIC_DUMP_AND_KEEP = "dump-and-keep"
ON_PANIC_IGNORE = "ignore"
ON_PANIC_VALUES = (ON_PANIC_DUMP_AND_STOP, ON_PANIC_DUMP_AND_KEEP, ON_PANIC_IGNORE)

# A VM's Initramfs (CreateVM's initramfs): kdlab's own initramfs it boots, by
# the mode kdlabctl built it in (kdlab.kernel.initramfs.MODE_*); "": none of
# kdlab's (the caller's own initrd, or none).
INITRAMFS_VALUES = ("", "root", "userspace")

# A dump's Reason, Format and State properties.
DUMP_REASON_PANIC = "panic"
DUMP_REASON_OOPS = "oops"
DUMP_REASON_REQUESTED = "requested"
DUMP_FORMAT_ELF = "elf"
DUMP_FORMAT_KDUMP_ZLIB = "kdump-zlib"
DUMP_STATE_WRITING = "writing"
DUMP_STATE_COMPLETE = "complete"
JOB_KIND_DUMP = "dump"

# A VM's Run, and a recording's State and Ended properties.
RUN_RECORD = "record"
RUN_REPLAY = "replay"
RECORDING_STATE_RECORDING = "recording"
RECORDING_STATE_COMPLETE = "complete"
RECORDING_ENDED_STOP = "stop"
RECORDING_ENDED_PANIC = "panic"
RECORDING_ENDED_LIMIT = "limit"
RECORDING_ENDED_CRASHED = "crashed"
# A process's State, and how it ended (its How and Exited's how).
PROCESS_STATE_RUNNING = "running"
PROCESS_STATE_EXITED = "exited"
PROCESS_EXITED = "exited"
PROCESS_SIGNALED = "signaled"
PROCESS_TIMEOUT = "timeout"
PROCESS_KILLED = "killed"
PROCESS_LOST = "lost"
# A share's tag (virtiofs allows 36 bytes), and how many a VM may have.
SHARE_TAG = re.compile(r"[A-Za-z0-9_.-]{1,36}")
SHARES_MAX = 8

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def escape_path_label(label: str) -> str:
    """Escape one object-path element the way systemd's sd_bus_path_encode does.

    Every byte outside [A-Za-z0-9] (and a leading digit) becomes ``_xx`` in
    lowercase hex; the empty string becomes ``_``.
    """
    if not label:
        return "_"
    out = []
    for i, byte in enumerate(label.encode()):
        char = chr(byte)
        if char in _ALNUM and not (i == 0 and char.isdigit()):
            out.append(char)
        else:
            out.append(f"_{byte:02x}")
    return "".join(out)


def unescape_path_label(label: str) -> str:
    """Reverse :func:`escape_path_label`."""
    if label == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(label):
        if label[i] == "_":
            raw.append(int(label[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(label[i]))
            i += 1
    return raw.decode()


def vm_path(name: str) -> str:
    """Object path of the VM called *name*."""
    return f"{VM_PATH_PREFIX}/{escape_path_label(name)}"


def image_path(name: str) -> str:
    """Object path of the image called *name*."""
    return f"{IMAGE_PATH_PREFIX}/{escape_path_label(name)}"


def dump_path(dump_id: str) -> str:
    """Object path of the dump *dump_id*."""
    return f"{DUMP_PATH_PREFIX}/{escape_path_label(dump_id)}"


def recording_path(recording_id: str) -> str:
    """The object path of the recording *recording_id*."""
    return f"{RECORDING_PATH_PREFIX}/{escape_path_label(recording_id)}"


def process_path(process_id: int) -> str:
    """Object path of the command *process_id* run in a guest."""
    return f"{PROCESS_PATH_PREFIX}/{process_id}"


def job_path(job_id: int) -> str:
    """Object path of job *job_id*."""
    return f"{JOB_PATH_PREFIX}/{job_id}"


RELEASE_MAX = 64  # struct utsname's release holds 65 bytes with the NUL
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def is_safe_release(release: str) -> bool:
    """Whether a kernel release (``uname -r``) may go into a path.

    kdlabctl looks for ``/usr/lib/debug/boot/vmlinux-RELEASE``: a release is
    letters, digits, ``. _ - +``, starting with a letter or digit, never ``..``.
    """
    return (
        len(release) <= RELEASE_MAX
        and _RELEASE.fullmatch(release) is not None
        and ".." not in release
    )


SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"


def bus_address(bus: str) -> str:
    """The D-Bus address for ``--bus system|session|ADDRESS``."""
    if bus == "system":
        return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", SYSTEM_BUS_DEFAULT)
    if bus == "session":
        address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        if not address:
            raise ValueError("--bus session: DBUS_SESSION_BUS_ADDRESS is not set")
        return address
    return bus
