"""kdlabctl's console loop on a real pseudo-terminal and a real socket pair."""

from __future__ import annotations

import os
import pty
import select
import socket
import termios
import threading
from collections.abc import Iterator

import pytest

from kdlabctl import debug


class Terminal:
    """A pty whose slave side is the console's stdin and stdout."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.vm, self.ours = socket.socketpair()
        self.why: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def run() -> None:
            self.why = debug.console(
                self.ours.fileno(), "hello", self.slave, self.slave
            )

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def from_keyboard(self, count: int) -> bytes:
        """What reached the VM's side of the socket, *count* bytes of it."""
        self.vm.settimeout(10)
        data = b""
        while len(data) < count:
            chunk = self.vm.recv(count - len(data))
            assert chunk, f"socket closed after {data!r}"
            data += chunk
        return data

    def join(self) -> str | None:
        assert self._thread is not None
        self._thread.join(10)
        assert not self._thread.is_alive(), "the console did not return"
        return self.why

    def close(self) -> None:
        for fd in (self.master, self.slave):
            os.close(fd)
        self.vm.close()
        self.ours.close()


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    yield term
    term.close()


def test_keys_typed_before_raw_mode_reach_the_vm(terminal: Terminal) -> None:
    # A line typed while the terminal is still cooked sits in its line buffer;
    # switching to raw mode must not flush it (TCSAFLUSH would).
    os.write(terminal.master, b"typed-ahead\r")
    # The pty's line discipline takes the keys in asynchronously: wait until
    # the cooked line (\r turned into \n) is there, as it is for a person.
    assert select.select([terminal.slave], [], [], 10)[0], "the line never arrived"
    terminal.start()
    assert terminal.from_keyboard(len(b"typed-ahead\n")) == b"typed-ahead\n"
    os.write(terminal.master, b"\x03after")  # Ctrl-C goes to the guest too
    assert terminal.from_keyboard(6) == b"\x03after"
    terminal.vm.close()
    assert terminal.join() == "the console closed (the VM stopped)"


def test_raw_until_detach_then_restored(terminal: Terminal) -> None:
    cooked = termios.tcgetattr(terminal.slave)
    terminal.start()
    terminal.vm.sendall(b"guest says hi\r\n")
    seen = b""
    while b"guest says hi" not in seen:
        seen += os.read(terminal.master, 4096)
    assert not termios.tcgetattr(terminal.slave)[3] & termios.ECHO  # raw: no echo
    os.write(terminal.master, b"ls\x1dignored")
    assert terminal.join() == "detached"
    assert terminal.from_keyboard(2) == b"ls"
    assert termios.tcgetattr(terminal.slave) == cooked
