"""A TCP port of another network namespace, reached from the tests' own.

tests/support/sshhost.py's second host is a network namespace with only its
own loopback: a program run in it (:attr:`SshHost.within`) listens where the
tests' process cannot connect. :class:`Relay` makes such a port reachable
from here: it binds a free loopback port in the tests' namespace, then starts
``python3 -m tests.support.relay FD PORT`` through *within*, which inherits
that listening socket (a socket stays in the namespace it was made in) and
connects each connection it accepts to ``127.0.0.1:PORT`` in the namespace
it runs in, copying both ways. It runs as the tests' user (root), dies with
the tests' process (``setpriv --pdeathsig``) and is ended by
:meth:`Relay.close`.

It is for the tests' own clients (selenium to a chromedriver in the
namespace): whoever connects to the relay reaches the port as the relay's
user, so a server that tells users apart by their sockets (kdlabctl web)
must not be relayed to.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

from tests.support import REPO
from tests.support.timeouts import STOP_SECONDS

CONNECT_SECONDS = 10.0


class Relay:
    """``127.0.0.1:PORT`` of the namespace *within* enters, at
    ``127.0.0.1:``:attr:`port` here."""

    def __init__(self, within: Sequence[str], port: int) -> None:
        self.target = port
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            self.port: int = listener.getsockname()[1]
            fd = listener.fileno()
            self.process = subprocess.Popen(
                [*within, "setpriv", "--pdeathsig", "KILL", "--",
                 sys.executable, "-m", "tests.support.relay", str(fd), str(port)],
                stdin=subprocess.DEVNULL, pass_fds=(fd,), cwd=REPO,
            )  # fmt: skip

    def close(self) -> None:
        """End the relay and the connections it carries."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_SECONDS)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    """Until *source* ends, then end *sink*'s sending side too."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _carry(client: socket.socket, port: int) -> None:
    """Connect *client* to *port* here, both ways, until both ends are done."""
    with contextlib.ExitStack() as both:
        both.enter_context(client)
        both.enter_context(contextlib.suppress(OSError))
        inner = both.enter_context(
            socket.create_connection(("127.0.0.1", port), CONNECT_SECONDS)
        )
        inner.settimeout(None)
        back = threading.Thread(target=_copy, args=(inner, client), daemon=True)
        back.start()
        _copy(client, inner)
        back.join()


def main(argv: list[str]) -> int:
    fd, port = int(argv[0]), int(argv[1])
    with socket.socket(fileno=fd) as listener:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=_carry, args=(client, port), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
