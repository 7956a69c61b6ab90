"""A stand-in for QEMU's gdbstub that a real gdb can attach to and detach from.

The bus tier runs no QEMU: kdlabd connects to this where it expects a VM's
stub socket and hands the connection to the caller, as it would QEMU's.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path


def _packet(payload: bytes) -> bytes:
    return b"$%s#%02x" % (payload, sum(payload) % 256)


def _answer(packet: bytes) -> bytes:
    """What QEMU's stub would say, as far as gdb needs to attach and detach."""
    if packet.startswith(b"qSupported"):
        return b"PacketSize=1000"
    if packet.startswith((b"H", b"D")):
        return b"OK"
    if packet == b"g":
        # x86-64 up to gs (16 GPRs, rip, eflags, 6 segments): the rest unavailable.
        return b"00" * (17 * 8 + 4 + 6 * 4)
    if packet.startswith(b"m"):
        return b"E01"
    return {b"?": b"S05", b"qAttached": b"1", b"qfThreadInfo": b"l"}.get(packet, b"")


class QemuSocket:
    """Where QEMU would listen for kdlabd (a gdbstub, a chardev): a unix
    socket whose connections, one at a time, go to :meth:`serve`."""

    def __init__(self, path: Path, backlog: int = 4) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(backlog)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            with conn:
                self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()


class RemoteStub(QemuSocket):
    """A unix socket speaking gdb's remote protocol; records each session's packets."""

    def __init__(self, path: Path) -> None:
        self.sessions: list[list[bytes]] = []
        self.ended = 0  # sessions the debugger hung up
        super().__init__(path)

    def serve(self, conn: socket.socket) -> None:
        self.sessions.append([])
        self._serve(conn, self.sessions[-1])
        self.ended += 1

    @staticmethod
    def _serve(conn: socket.socket, packets: list[bytes]) -> None:
        buffer = b""
        while data := conn.recv(4096):
            buffer += data
            while True:
                buffer = buffer.lstrip(b"+-\x03")
                end = buffer.find(b"#")
                if not buffer.startswith(b"$") or end < 0 or len(buffer) < end + 3:
                    break
                packet, buffer = buffer[1:end], buffer[end + 3 :]
                packets.append(packet)
                conn.sendall(b"+" + _packet(_answer(packet)))

    @property
    def attached(self) -> list[bool]:
        """Per session: did gdb attach (qSupported) and detach (D)?"""
        return [
            any(p.startswith(b"qSupported") for p in s) and b"D" in s
            for s in self.sessions
        ]

    def close(self) -> None:
        super().close()
        self._thread.join(timeout=10)
