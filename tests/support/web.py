"""``kdlabctl web`` under test: run by a login user, probed by login users.

kdlabctl web lets in only sockets of its own user, so a probe of the page
runs as a user too: ``python3 -m tests.support.web PORT REQUESTS`` (Debian's
python3, from the user's clone, standard library only) sends each request
of the JSON list REQUESTS to 127.0.0.1:PORT on a connection of its own and
prints the answers as a JSON list: ``status``, ``headers`` (names in lower
case), the start of ``body``; for a WebSocket upgrade (``"websocket": true``)
whether Cockpit's ``init`` came, and with ``"bus_id": true`` the id of the
bus the bridge calls "system" (org.freedesktop.DBus.GetId, through Cockpit's
protocol), which shows which bus the page reaches.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.logins import LOGIN_ENV, LoginUser, kdlabctl_command, login_argv
from tests.support.timeouts import STARTUP_TIMEOUT

PROBE_SECONDS = 10.0
BODY_CHARS = 4000


def _read_head(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0]:
        return 0, {}, b""  # closed without an answer
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


def _frame(text: str) -> bytes:
    """A masked text frame, as a client must send."""
    payload = text.encode()
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x81])
    if size < 126:
        head += bytes([0x80 | size])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", size)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return head + mask + body


class _Frames:
    """Text frames from the server (unmasked), after the handshake's *rest*."""

    def __init__(self, conn: socket.socket, rest: bytes) -> None:
        self.conn = conn
        self.buffer = rest

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError("the WebSocket closed")
            self.buffer += chunk
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def next(self) -> str:
        first, second = self._take(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack(">H", self._take(2))[0]
        elif size == 127:
            size = struct.unpack(">Q", self._take(8))[0]
        payload = self._take(size)
        if first & 0x0F == 0x8:
            raise EOFError("the server closed the WebSocket")
        return payload.decode()


def _bus_id(conn: socket.socket, frames: _Frames) -> str:
    """The id of the bridge's "system" bus, asked over Cockpit's protocol."""
    conn.sendall(_frame('\n{"command":"init","version":1}'))
    opening = {
        "command": "open",
        "channel": "probe1",
        "payload": "dbus-json3",
        "bus": "system",
        "name": "org.freedesktop.DBus",
    }
    conn.sendall(_frame("\n" + json.dumps(opening)))
    call = {
        "call": ["/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId", []],
        "id": "1",
    }
    conn.sendall(_frame("probe1\n" + json.dumps(call)))
    while True:
        channel, _, text = frames.next().partition("\n")
        if channel != "probe1":
            continue
        message = json.loads(text)
        if message.get("id") == "1":
            return str(message["reply"][0][0]) if "reply" in message else repr(message)


def exchange(port: int, request: dict[str, Any]) -> dict[str, Any]:
    """Send *request* (method, target, headers, websocket, bus_id); its answer."""
    headers = dict(request.get("headers", {}))
    headers.setdefault("Host", f"127.0.0.1:{port}")
    if request.get("websocket"):
        headers.update({
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Protocol": "cockpit1",
        })  # fmt: skip
    lines = [f"{request.get('method', 'GET')} {request['target']} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", port), PROBE_SECONDS) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            status, answer, rest = _read_head(conn)
        except ConnectionError:
            return {"status": 0, "headers": {}, "body": ""}
        result: dict[str, Any] = {"status": status, "headers": answer}
        if request.get("websocket") and status == 101:
            frames = _Frames(conn, rest)
            result["init"] = '"command":"init"' in frames.next()
            if request.get("bus_id"):
                result["bus_id"] = _bus_id(conn, frames)
            return result
        body = rest
        while len(body) < BODY_CHARS and (chunk := conn.recv(65536)):
            body += chunk
        result["body"] = body[:BODY_CHARS].decode("utf-8", "replace")
        return result


def main(argv: list[str]) -> int:
    port, requests = int(argv[0]), json.loads(argv[1])
    print(json.dumps([exchange(port, request) for request in requests]))
    return 0


# ---- the server side ----------------------------------------------------------


class WebServer:
    """``kdlabctl [--bus BUS] web ARGS`` run by *user*, with *env* (shell
    assignments) before it, after the shell command *before* (in the same
    shell), through the command line *within* when given (``nsenter
    --net=...``); :attr:`url` is the first line it printed.

    Its stderr (cockpit-ws's and the bridge's too) goes to the file *log*
    when given (a server kept running for many tests: a pipe nobody reads
    would fill and stall them), else to a pipe :meth:`stop` reads."""

    def __init__(
        self,
        user: LoginUser,
        bus: str,
        *args: str,
        env: str = "",
        log: Path | None = None,
        within: Sequence[str] = (),
        before: str = "",
    ) -> None:
        self.user = user
        self.log = log
        command = kdlabctl_command(bus, "web", *args)
        if env:
            command = f"export {env} && {command}"
        if before:
            command = f"{before} && {command}"
        with contextlib.ExitStack() as files:
            stderr: Any = subprocess.PIPE
            if log is not None:
                stderr = files.enter_context(log.open("wb"))
            self.process = subprocess.Popen(
                login_argv(user, command, within),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=LOGIN_ENV,
                cwd="/",
            )
        self.url = self._first_line()
        parts = urlsplit(self.url)
        self.port = parts.port or 0
        self.path = parts.path
        self.token = parse_qs(parts.query).get("kdlab-token", [""])[0]

    def _first_line(self) -> str:
        """The first line of stdout, or "" when it exits or is silent too long."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                byte = os.read(self.process.stdout.fileno(), 1)
                if not byte:
                    break
                line += byte
        return line.decode().strip()

    @property
    def cookie(self) -> str:
        return f"kdlab-web-{self.port}={self.token}"

    def kdlabctl_pid(self) -> int:
        """The kdlabctl process (runuser's child: the login shell exec'd it)."""
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == self.process.pid:
                    return int(entry.name)
        raise AssertionError("kdlabctl web is not running")

    def stop(self, number: int = signal.SIGINT) -> tuple[int, str]:
        """Send *number* to kdlabctl; its exit code and stderr."""
        with contextlib.suppress(AssertionError, ProcessLookupError):
            os.kill(self.kdlabctl_pid(), number)
        _, stderr = self.process.communicate(timeout=STARTUP_TIMEOUT)
        said = self.output() if stderr is None else stderr.decode()
        return self.process.returncode, said

    def output(self) -> str:
        """What it wrote to its *log* so far ("" without one)."""
        return "" if self.log is None else self.log.read_text(errors="replace")

    def close(self) -> None:
        """Stop it if a test left it running."""
        if self.process.poll() is None:
            self.stop(signal.SIGTERM)


def processes_of(uid: int, names: tuple[str, ...]) -> list[str]:
    """Processes (zombies too) of *uid* named one of *names*: "PID NAME STATE"."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            status = dict(
                line.split(":\t", 1)
                for line in (entry / "status").read_text().splitlines()
                if ":\t" in line
            )
            if int(status["Uid"].split()[0]) == uid and status["Name"] in names:
                found.append(f"{entry.name} {status['Name']} {status['State']}")
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
