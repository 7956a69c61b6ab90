"""The first program inside an image build's namespaces (see kdlabd.host.sandbox).

It is run by path with ``python -I -S``, never imported by kdlabd, so it uses
the standard library only. Two commands:

``setup --writable DIR ... [--chroot-shim FILE] -- ARGV``
    Runs as the init of the build's new PID namespace, in its own mount
    namespace: names the host ``kdlab-build``, makes every mount read-only but
    the *writable* directories, puts the shim over the host's ``chroot`` when
    asked (debootstrap runs its chroot commands by that path), then executes
    ARGV with umask 022.

``chroot --keep N,N,... TARGET [COMMAND ...]``
    What debootstrap's ``chroot TARGET COMMAND`` runs instead: COMMAND (dpkg,
    and through it the packages' maintainer scripts) runs in TARGET with no
    network (a new, empty network namespace), only the capabilities numbered
    in ``--keep`` (none of CAP_SYS_ADMIN, CAP_SYS_CHROOT, CAP_MKNOD: it can
    neither leave the chroot nor mount, nor make device nodes) and no way to
    gain more. debootstrap's own ``chroot TARGET mount -t proc proc /proc`` is
    done here instead, as a /proc that shows processes only (``subset=pid``:
    no /proc/sys, /proc/sysrq-trigger or /proc/kcore), and its sysfs mount is
    not done at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import stat
import sys

HOSTNAME = b"kdlab-build"
NOT_FOUND = "kdlab-sandbox: command not found: "  # as kdlabd.host.sandbox expects

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_REMOUNT = 0x20
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_RELATIME = 0x200000
_MS_STRICTATIME = 0x1000000
# Per-mount flags as /proc/self/mountinfo spells them: a bind remount must
# repeat them, or it would clear (say) nosuid while making the mount read-only.
_MOUNT_FLAGS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
}
_CLONE_NEWNET = 0x40000000
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _unescape(path: str) -> str:
    r"""A mountinfo path: spaces and such are written as octal (``\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), path)


def _mounts() -> list[tuple[str, int]]:
    """Every mount point (outermost first) and its per-mount flags."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as file:
        for line in file:
            fields = line.split()
            options = fields[5].split(",")
            flags = sum(_MOUNT_FLAGS.get(option, 0) for option in options)
            if "ro" in options:
                flags |= _MS_RDONLY
            found.append((_unescape(fields[4]), flags))
    return found


def _readonly_but(writable: list[str]) -> None:
    """Every mount read-only, except bind mounts of *writable* on themselves."""
    for path in writable:
        _mount(path, path, "", _MS_BIND | _MS_REC)
    for target, flags in _mounts():
        try:
            _mount("none", target, "", _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
        except FileNotFoundError:  # under a mount made since: hidden anyway
            continue
    flags_of = dict(_mounts())
    for path in writable:
        _mount("none", path, "", _MS_REMOUNT | _MS_BIND | flags_of[path] & ~_MS_RDONLY)


def setup(args: list[str]) -> None:
    writable: list[str] = []
    shim = ""
    while args and args[0] != "--":
        option, value, args = args[0], args[1], args[2:]
        if option == "--writable":
            writable.append(os.path.realpath(value))
        elif option == "--chroot-shim":
            shim = value
        else:
            raise SystemExit(f"sandbox_init setup: unknown option {option}")
    argv = args[1:]
    _check(_libc.sethostname(HOSTNAME, len(HOSTNAME)), "sethostname")
    if shim:
        chroot = os.path.realpath("/usr/sbin/chroot")
        _mount(shim, chroot, "", _MS_BIND)
    _readonly_but(writable)
    os.umask(0o022)
    _exec(argv)


def _exec(argv: list[str]) -> None:
    """Become *argv*; a missing program is reported as kdlabd recognizes it."""
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        print(f"{NOT_FOUND}{argv[0]}", flush=True)
        raise SystemExit(127) from None


def _mount_proc(target: str) -> None:
    """debootstrap's /proc for the chroot: processes only, nothing to tune."""
    proc = os.path.join(target, "proc")
    if not stat.S_ISDIR(os.lstat(proc).st_mode):
        raise SystemExit(f"{proc} is not a directory")
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _mount("proc", proc, "proc", flags, "subset=pid")


def _close_directories() -> None:
    """A directory descriptor from outside would lead out of the chroot."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.close(fd)
            except OSError:
                continue


def _last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as file:
        return int(file.read())


def _drop_capabilities(keep: set[int], last: int) -> None:
    for cap in range(last + 1):
        if cap not in keep:
            _check(
                _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}"
            )
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def chroot(args: list[str]) -> None:
    if len(args) < 3 or args[0] != "--keep":
        raise SystemExit("usage: sandbox_init chroot --keep N,N TARGET [COMMAND...]")
    keep = {int(n) for n in args[1].split(",") if n}
    target, command = args[2], args[3:] or ["/bin/sh", "-i"]
    if command == ["mount", "-t", "proc", "proc", "/proc"]:
        _mount_proc(target)
        return
    if command == ["mount", "-t", "sysfs", "sysfs", "/sys"]:
        return  # packages get no /sys: nothing in it is theirs to change
    _close_directories()
    last = _last_capability()  # while the host's /proc is in sight
    _check(_libc.unshare(_CLONE_NEWNET), "unshare the network")
    os.chroot(target)
    os.chdir("/")
    _drop_capabilities(keep, last)
    _exec(command)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    try:
        if command == "setup":
            setup(args)
        elif command == "chroot":
            chroot(args)
        else:
            raise SystemExit(f"sandbox_init: unknown command {command}")
    except OSError as err:  # a sentence for the build's error, no traceback
        print(f"kdlab-sandbox: {err}", flush=True)
        raise SystemExit(126) from None


if __name__ == "__main__":
    main()
