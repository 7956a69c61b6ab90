"""kdlabd's host: the :class:`kdlabd.core.host.Host` port on this machine.

Sockets (a gdbstub's, console viewers', shares' for QEMU), kdlabd's own files (a VM's
directory, its console logs) and the descriptors callers pass. Which paths,
time limits and rules apply is core's: this module does what it is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
from pathlib import Path

from kdlabd.core import blocking
from kdlabd.core.host import Address, Listener, ViewerInput
from kdlabd.host import descriptors, facts
from kdlabd.host.descriptors import CallerDescriptors
from kdlabd.host.pipes import InputStream, OutputPipe
from kdlabd.host.viewers import SocketViewer

# /proc/net/unix's flag of a listening socket (the kernel's __SO_ACCEPTCON).
_ACCEPTING = 0x10000


class LocalHost(CallerDescriptors):
    """The machine kdlabd runs on; QEMU runs on it as *qemu_user* (None: the
    user does not exist, and only root reaches what is made for QEMU)."""

    def __init__(self, qemu_user: facts.QemuUser | None = None) -> None:
        self._qemu = qemu_user

    def free_descriptors(self) -> int:
        return descriptors.free()

    def console_viewer(self, typed: ViewerInput) -> tuple[SocketViewer, int]:
        return SocketViewer.pair(typed)

    async def connect(self, address: Address, *, seconds: float, what: str) -> int:
        family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(seconds)
            # A unix socket whose listener does not accept blocks in connect().
            await blocking.run(
                lambda: sock.connect(address), seconds=seconds + 1, what=what
            )
            sock.setblocking(True)
        except BaseException:
            sock.close()
            raise
        return sock.detach()

    async def open_stream(
        self, address: Address, *, seconds: float, what: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        fd = await self.connect(address, seconds=seconds, what=what)
        family = socket.AF_INET if isinstance(address, tuple) else socket.AF_UNIX
        sock = socket.socket(family, socket.SOCK_STREAM, fileno=fd)
        try:
            return await asyncio.open_connection(sock=sock, limit=1 << 20)
        except BaseException:
            sock.close()
            raise

    def output_pipe(self) -> tuple[OutputPipe, int]:
        return OutputPipe.make()

    def input_stream(self, fd: int) -> InputStream:
        return InputStream.of(fd)

    async def listen_for_qemu(
        self, path: Path, *, seconds: float, what: str
    ) -> tuple[int, Listener]:
        return await blocking.run(
            lambda: self._listen_for_qemu(path), seconds=seconds, what=what
        )

    def _listen_for_qemu(self, path: Path) -> tuple[int, Listener]:
        facts.prepare_private_dir(path.parent.parent, self._qemu)
        facts.prepare_private_dir(path.parent, self._qemu)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # Nobody but root and QEMU enters the directory; the socket's own
            # mode says the same.
            if self._qemu is not None:
                os.chown(path, self._qemu.uid, -1)
            os.chmod(path, 0o600)
            sock.listen(1)
            found = os.stat(path)
            listener = Listener(
                path, (found.st_dev, found.st_ino), os.fstat(sock.fileno()).st_ino
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return sock.detach(), listener

    def listens(self, listener: Listener) -> bool:
        try:
            found = os.stat(listener.path)
        except FileNotFoundError:
            return False
        if (found.st_dev, found.st_ino) != listener.file:
            return False
        # A socket no process holds any more is gone from the list.
        # Num RefCount Protocol Flags Type St Inode [Path]
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if (
                    len(fields) >= 7
                    and fields[6] == str(listener.socket)
                    and int(fields[3], 16) & _ACCEPTING
                ):
                    return True
        return False

    def open_read_only(self, path: Path) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read_excerpt(self, path: Path, head: int, tail: int) -> str:
        # A log can grow without bound (a guest printing in a loop).
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(0)
            if size <= head + tail:
                data = file.read()
            else:
                start = file.read(head)
                file.seek(size - tail)
                data = start + b"\n" + file.read()
        return data.decode("utf-8", errors="replace")

    def read_range(self, path: Path, offset: int, size: int) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def file_size(self, path: Path) -> int:
        return path.stat().st_size

    def write_atomically(self, path: Path, data: bytes) -> None:
        temporary = path.with_name(f".{path.name}.tmp")
        fd = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.rename(path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def remove_file(self, path: Path) -> None:
        path.unlink()

    def digest(self, path: Path) -> str:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()

    def has_file(self, path: Path) -> bool:
        return path.exists()

    def move(self, path: Path, new: Path) -> None:
        path.rename(new)

    def make_private_dir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def names(self, path: Path) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_tree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
