"""``kdlabctl gdb`` and ``gdb-proxy``: gdb on a VM's stub, brokered by kdlabd.

kdlabd hands an authorized caller a connected stream (``VM.OpenGdb``);
``gdb-proxy`` relays it to stdin/stdout so that gdb's ``target remote | CMD``
can use it. vmlinux is found the way virtme-ng finds it.
"""

from __future__ import annotations

import os
import selectors
import shlex
import sys
import termios
import tty
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DEBUG_DIRS = (
    "/usr/lib/debug/boot/vmlinux-{release}",
    "/usr/lib/debug/lib/modules/{release}/vmlinux",
    "/boot/vmlinux-{release}",
)


def vmlinux_candidates(
    props: Mapping[str, Any], explicit: str | None
) -> Iterator[Path]:
    """Where vmlinux may be, best first: --vmlinux, the recorded path, the build
    tree of the kernel, then the distribution's debug directories."""
    if explicit:
        yield Path(explicit)
        return
    if props.get("Vmlinux"):
        yield Path(props["Vmlinux"])
    kernel = Path(props["KernelPath"]) if props.get("KernelPath") else None
    if kernel is not None:
        # arch/x86/boot/bzImage -> the tree's top, where `make` leaves vmlinux.
        if (
            len(kernel.parts) > 4
            and kernel.parts[-4] == "arch"
            and kernel.parts[-2] == "boot"
        ):
            yield kernel.parents[3] / "vmlinux"
        yield kernel.parent / "vmlinux"
    release = props.get("KernelRelease")
    if release:
        for pattern in DEBUG_DIRS:
            yield Path(pattern.format(release=release))


def find_vmlinux(props: Mapping[str, Any], explicit: str | None) -> Path:
    tried = []
    for candidate in vmlinux_candidates(props, explicit):
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    looked = (
        ", ".join(tried)
        if tried
        else "nowhere: the VM records no kernel path or release"
    )
    raise FileNotFoundError(
        f"no vmlinux found (looked at {looked}): pass --vmlinux PATH"
    )


def gdb_command(
    vmlinux: Path, proxy: list[str], gdb_args: list[str], gdb: str = "gdb"
) -> list[str]:
    """The gdb command line: symbols, the lx-* helpers if built, the brokered target."""
    command = [gdb, "-q"]
    if (vmlinux.parent / "vmlinux-gdb.py").is_file():
        # Trust exactly the directory of this vmlinux, never `safe-path /`.
        command += ["-iex", f"add-auto-load-safe-path {vmlinux.parent}"]
    command += ["-ex", f"target remote | {shlex.join(proxy)}", *gdb_args, str(vmlinux)]
    return command


def relay(sock_fd: int, stdin: int = 0, stdout: int = 1) -> None:
    """Copy stdin to *sock_fd* and *sock_fd* to stdout until either side closes."""
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ, sock_fd)
    selector.register(sock_fd, selectors.EVENT_READ, stdout)
    while True:
        for key, _ in selector.select():
            data = os.read(key.fd, 65536)
            if not data:
                return
            _write_all(key.data, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def proxy_command(bus: str, name: str) -> list[str]:
    return [sys.executable, "-m", "kdlabctl", "--bus", bus, "gdb-proxy", name]


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
        selector = selectors.DefaultSelector()
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
