"""``kdlabctl gdb`` and ``gdb-proxy``: gdb on a VM's stub, brokered by kdlabd.

kdlabd hands an authorized caller a connected stream (``VM.OpenGdb``).
``kdlabctl gdb`` asks for it before gdb starts, then relays it itself: gdb 13
cannot take a connected descriptor (``target remote`` opens a path: a tty, a
unix socket it connects to, or a ``| CMD`` pipe; ``/proc/self/fd/N`` of a
socket is a path it cannot connect to), so gdb connects to a socket in a
directory only the caller may enter and kdlabctl, which waits for gdb anyway,
copies between the two (:func:`serve_gdb`): no second process. ``gdb-proxy``
relays a stream of its own on stdin/stdout, for a gdb the user starts. vmlinux
is found the way virtme-ng finds it, but a VM's recorded paths are used only
by the VM's owner: they name files the owner chose. gdb auto-loads the
kernel's ``vmlinux-gdb.py`` only when nobody but the caller and root could
have changed it (see :func:`untrusted`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import stat
import struct
import subprocess
import sys
import termios
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from kdlab.wire import is_safe_release

DEBUG_DIRS = (
    "/usr/lib/debug/boot/vmlinux-{release}",
    "/usr/lib/debug/lib/modules/{release}/vmlinux",
    "/boot/vmlinux-{release}",
)
GDB_SCRIPT = "vmlinux-gdb.py"
# What vmlinux-gdb.py imports: it puts <its directory>/scripts/gdb on sys.path.
GDB_SCRIPT_PACKAGE = ("scripts", "gdb")


class Recorded(Protocol):
    """What a VM records of its kernel (a :class:`kdlabctl.client.VM` has it)."""

    @property
    def owner(self) -> int: ...
    @property
    def vmlinux(self) -> str: ...
    @property
    def kernel_path(self) -> str: ...
    @property
    def kernel_release(self) -> str: ...


def vmlinux_candidates(vm: Recorded, explicit: str | None, uid: int) -> Iterator[Path]:
    """Where vmlinux may be, best first: --vmlinux, the recorded path, the build
    tree of the kernel, then the distribution's debug directories.

    The recorded paths count only when *uid* owns the VM: for anyone else they
    are files another user chose.
    """
    if explicit:
        yield Path(explicit)
        return
    if vm.owner == uid:
        yield from _recorded_candidates(vm)
    release = vm.kernel_release
    if release and is_safe_release(release):
        for pattern in DEBUG_DIRS:
            yield Path(pattern.format(release=release))


def _recorded_candidates(vm: Recorded) -> Iterator[Path]:
    if vm.vmlinux:
        yield Path(vm.vmlinux)
    kernel = Path(vm.kernel_path) if vm.kernel_path else None
    if kernel is not None:
        # arch/x86/boot/bzImage -> the tree's top, where `make` leaves vmlinux.
        if (
            len(kernel.parts) > 4
            and kernel.parts[-4] == "arch"
            and kernel.parts[-2] == "boot"
        ):
            yield kernel.parents[3] / "vmlinux"
        yield kernel.parent / "vmlinux"


class VmlinuxMismatch(Exception):
    """Every vmlinux found has another build ID than the kernel that ran."""


def find_vmlinux(
    vm: Recorded, explicit: str | None, uid: int, build_id: str = ""
) -> Path:
    """The first vmlinux of :func:`vmlinux_candidates` that is a file, resolved.

    With *build_id* (a dump's: the kernel that ran), a file of another build
    ID is passed over, and when only such files are found,
    :class:`VmlinuxMismatch` names them with their build IDs.
    """
    from kdlabctl.gdbcache import read_build_id  # it imports this module

    tried, mismatched = [], []
    for candidate in vmlinux_candidates(vm, explicit, uid):
        if not candidate.is_file():
            tried.append(str(candidate))
            continue
        found = read_build_id(candidate) if build_id else build_id
        if found == build_id:
            return candidate.resolve()
        mismatched.append(f"{candidate} (build ID {found or 'none'})")
    if mismatched:
        raise VmlinuxMismatch(
            f"no vmlinux has the dump's build ID {build_id}: found "
            f"{', '.join(mismatched)}; pass --vmlinux PATH of the kernel that ran"
        )
    looked = ", ".join(tried) if tried else "nowhere"
    if not explicit and vm.owner != uid:
        looked += (
            f" (the paths recorded with the VM are used by its owner, uid "
            f"{vm.owner}, only)"
        )
    raise FileNotFoundError(
        f"no vmlinux found (looked at {looked}): pass --vmlinux PATH"
    )


def untrusted(path: Path, uid: int) -> str:
    """Why someone other than *uid* and root could change *path*, or "".

    Like ssh's StrictModes: *path* (symlinks resolved) and every directory
    above it must belong to *uid* or root and be writable by no one else. A
    directory above it may be root's sticky one (/tmp): there, nobody may
    rename or remove what another user created.
    """
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as err:
        return f"{path} cannot be resolved ({err})"
    for depth, node in enumerate((real, *real.parents)):
        try:
            info = os.lstat(node)
        except OSError as err:
            return f"{node}: {err.strerror}"
        if info.st_uid not in (uid, 0):
            return f"{node} belongs to uid {info.st_uid}"
        if not info.st_mode & 0o022:
            continue
        if depth and info.st_uid == 0 and info.st_mode & stat.S_ISVTX:
            continue
        who = "everyone" if info.st_mode & 0o002 else f"group {info.st_gid}"
        return f"{node} is writable by {who}"
    return ""


def gdb_script(vmlinux: Path, uid: int) -> tuple[Path | None, str]:
    """The ``vmlinux-gdb.py`` gdb may auto-load for *vmlinux* (resolved), or why not.

    Returns (script, "") when it is trusted, (None, reason) when it is not,
    and (None, "") when there is no script. The script, the directory of
    vmlinux and the package the script imports must pass :func:`untrusted`.
    """
    script = vmlinux.parent / GDB_SCRIPT
    if not script.is_file():
        return None, ""
    package = vmlinux.parent.joinpath(*GDB_SCRIPT_PACKAGE)
    checked = [script, vmlinux.parent]
    if package.is_dir():
        checked.append(package)
        for top, dirs, files in os.walk(package):
            checked += [Path(top, name) for name in (*dirs, *files)]
    for path in checked:
        reason = untrusted(path, uid)
        if reason:
            return None, reason
    return script, ""


def gdb_command(
    vmlinux: Path,
    target: Path,
    gdb_args: list[str],
    script: Path | None,
    *,
    gdb: str = "gdb",
    index_cache: Sequence[str] = (),
) -> list[str]:
    """The gdb command line: symbols, the lx-* helpers if trusted, the target.

    *target* is the socket :func:`gdb_listener` made. *script* is the one file
    gdb may auto-load (:func:`gdb_script`); without it no script of vmlinux's
    auto-loads, whatever the user's gdbinit allows. *index_cache* are the
    options of the caller's index cache (:func:`kdlabctl.gdbcache.gdb_options`).
    """
    command = [gdb, "-q"]
    if script is not None:
        # Trust exactly this file, never its directory or `safe-path /`.
        command += ["-iex", f"add-auto-load-safe-path {script}"]
    else:
        command += [
            "-iex",
            "set auto-load python-scripts off",
            "-iex",
            "set auto-load gdb-scripts off",
        ]
    command += [*index_cache, "-ex", f"target remote {target}", *gdb_args]
    return [*command, str(vmlinux)]


# gdb reads `target remote HOST:PORT` as TCP, and a word ends at a blank.
_NOT_IN_TARGET = frozenset(": \t\n")
# struct ucred: pid, uid, gid.
_UCRED = struct.Struct("3i")


@contextlib.contextmanager
def gdb_listener() -> Iterator[tuple[socket.socket, Path]]:
    """A unix socket gdb can ``target remote``, in a new directory only the
    caller (and root) may enter; both are gone afterwards."""
    import shutil  # here: create imports this module to find vmlinux
    import tempfile

    for base in (None, "/tmp"):  # $TMPDIR first, unless gdb cannot use it
        directory = Path(tempfile.mkdtemp(prefix="kdlab-gdb-", dir=base))
        path = directory / "stub"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if not _NOT_IN_TARGET.isdisjoint(str(path)):
                raise OSError(f"gdb cannot connect to {path}")
            listener.bind(str(path))
            listener.listen(1)
        except OSError:
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)
            if base is not None:
                raise
            continue
        try:
            yield listener, path
        finally:
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)
        return


def serve_gdb(listener: socket.socket, stub: int, gdb: subprocess.Popen[bytes]) -> int:
    """Relay between *gdb*'s connection to *listener* and the *stub* until one
    hangs up; then *gdb*'s exit status, once it exits.

    Only the gdb process itself may connect. When it hangs up (detach,
    disconnect, exit), the stub's connection is shut down, which frees QEMU's
    one debugger place; gdb may go on without a target.
    """
    connection = _accept_from(listener, gdb)
    try:
        if connection is not None:
            with connection:
                relay(stub, connection.fileno(), connection.fileno())
    finally:
        hang_up(stub)
    return gdb.wait()


def _accept_from(
    listener: socket.socket, gdb: subprocess.Popen[bytes]
) -> socket.socket | None:
    """gdb's connection to *listener*, or None when gdb exits without one."""
    exited = os.pidfd_open(gdb.pid)
    selector = selectors.DefaultSelector()
    try:
        selector.register(exited, selectors.EVENT_READ)
        selector.register(listener, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fd == exited:
                    return None
                connection, _ = listener.accept()
                creds = connection.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size
                )
                if _UCRED.unpack(creds)[0] == gdb.pid:
                    return connection
                connection.close()  # not our gdb
    finally:
        selector.close()
        os.close(exited)


def hang_up(stream: int) -> None:
    """Shut the connection on *stream* down for every holder of it (gdb too)."""
    with (
        socket.fromfd(stream, socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        contextlib.suppress(OSError),  # the other end hung up first
    ):
        sock.shutdown(socket.SHUT_RDWR)


def relay(sock_fd: int, stdin: int = 0, stdout: int = 1) -> None:
    """Copy stdin to *sock_fd* and *sock_fd* to stdout until either side closes
    (or breaks the connection)."""
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ, sock_fd)
    selector.register(sock_fd, selectors.EVENT_READ, stdout)
    with selector:
        while True:
            for key, _ in selector.select():
                try:
                    data = os.read(key.fd, 65536)
                    if data:
                        _write_all(key.data, data)
                except ConnectionError:  # reset, or a broken pipe
                    return
                if not data:
                    return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


ESCAPE = b"\x1d"  # Ctrl-], as in virsh console and telnet


def console(sock_fd: int, banner: str, stdin: int = 0, stdout: int = 1) -> str:
    """Interactive console on *sock_fd* until Ctrl-] or the VM closes it.

    A terminal on stdin is put in raw mode (keys such as Ctrl-C go to the
    guest) and restored afterwards; keys typed before that are kept, not
    flushed. *banner* goes to stderr once raw mode is on, so whoever waits
    for it knows every key from then on reaches the VM unechoed. Returns why
    the session ended.
    """
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin, termios.TCSADRAIN)
    print(banner, end="\r\n", file=sys.stderr, flush=True)
    try:
        # poll, not epoll: epoll refuses a file or /dev/zero as stdin (EPERM).
        selector = selectors.PollSelector()
        selector.register(stdin, selectors.EVENT_READ)
        selector.register(sock_fd, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                data = os.read(key.fd, 65536)
                if key.fd == sock_fd:
                    if not data:
                        return "the console closed (the VM stopped)"
                    _write_all(stdout, data)
                    continue
                if not data:
                    return "end of input"
                if ESCAPE in data:
                    _write_all(sock_fd, data[: data.index(ESCAPE)])
                    return "detached"
                _write_all(sock_fd, data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
