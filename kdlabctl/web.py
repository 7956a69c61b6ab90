"""``kdlabctl web``: kdlab's Cockpit page for the calling user, with no Cockpit login.

Cockpit's ``cockpit-ws --local-session`` serves a session of whoever runs it
to whoever connects: on a TCP port, any local user would get the caller's
bridge, which runs commands as the caller (``cockpit.spawn``). So cockpit-ws
never listens on TCP here:

- cockpit-ws takes its listening socket by socket activation (``LISTEN_FDS``):
  a unix socket in a 0700 directory of the caller's, which nobody else can
  connect to. Its bridge is spawned by kdlabctl (``--local-session=-``), so it
  has the caller's environment (``DBUS_SYSTEM_BUS_ADDRESS`` for ``--bus``),
  and kdlabctl sees when the session ends.
- kdlabctl listens on the TCP port (loopback by default) and relays a
  connection to cockpit-ws only when it passes every check, in this order:
  the connecting socket belongs to the caller's uid (``/proc/net/tcp``: on
  the host, another user is refused even with the token; a remote peer of a
  non-loopback ``--address`` cannot be checked so); ``Host`` (and ``Origin``,
  if sent) name this server, so a DNS-rebinding page cannot talk to it; and
  the request carries the secret: the cookie ``kdlab-web-PORT``, which the
  printed URL's ``kdlab-token`` sets (HttpOnly, SameSite=Strict, compared in
  constant time) before it redirects to the page without the token.
- Each connection carries one request (``Connection: close`` towards
  cockpit-ws), so no later request on a connection skips the checks; a
  WebSocket upgrade, once checked, is relayed as a byte stream.
- SIGINT, SIGTERM and SIGHUP stop cockpit-ws, the bridge and whatever they
  started; both also die with kdlabctl (``setpriv --pdeathsig``).
- With ``--host``, kdlabd is on another host and sees the ssh user there:
  this machine's passwd does not name its uids. The bridge's environment
  says who the page is there (:data:`HOST_CALLER_ENV`, ``UID:USER``), so
  the page names owners as ``kdlabctl --host`` does (kdlabctl/caller.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit

from kdlab.errors import InvalidArgument
from kdlab.wire import bus_address

if TYPE_CHECKING:
    from kdlabctl.bridge import RemoteInfo

COCKPIT_WS = "/usr/lib/cockpit/cockpit-ws"
# Where cockpit-ws is, when not at its Debian path (and for the tests).
COCKPIT_WS_ENV = "KDLAB_COCKPIT_WS"
BRIDGE = "cockpit-bridge"
# The page's caller on kdlabd's host, "UID:USER" ("" for this machine's kdlabd);
# kdlabctl/cockpit/kdlab.js reads it.
HOST_CALLER_ENV = "KDLAB_WEB_HOST_CALLER"
PAGE = "/cockpit/@localhost/kdlab/index.html"
TOKEN = "kdlab-token"
COOKIE_PREFIX = "kdlab-web-"
HEADER_LIMIT = 64 * 1024
# A client that has not sent its request's header by then is dropped.
HEADER_SECONDS = 30.0
# How long a refused client may go on sending before its connection is closed.
LINGER_SECONDS = 2.0
# How long cockpit-ws and its bridge get to exit on SIGTERM before SIGKILL.
STOP_SECONDS = 5.0
# cockpit-ws takes the listening socket as descriptor 3 and LISTEN_PID must be
# its own pid, which only a shell that execs it knows ($$). bash, not sh: the
# socket's number may have two digits (with --host's session open), which
# dash cannot redirect from.
ACTIVATE = 'exec 3<&"$0"; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$@"'
ACTIVATE_SHELL = "bash"


class Unavailable(Exception):
    """A program ``kdlabctl web`` runs is not installed."""


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def programs() -> tuple[str, str]:
    """cockpit-ws and cockpit-bridge, or :class:`Unavailable` saying what to install."""
    ws = os.environ.get(COCKPIT_WS_ENV) or COCKPIT_WS
    bridge = shutil.which(BRIDGE)
    if not os.access(ws, os.X_OK):
        raise Unavailable(
            f"cockpit-ws is not installed ({ws} is missing): "
            "apt-get install cockpit-ws cockpit-bridge"
        )
    if bridge is None:
        raise Unavailable(
            "cockpit-bridge is not installed (not in PATH): "
            "apt-get install cockpit-bridge"
        )
    return ws, bridge


# ---- who is connecting ------------------------------------------------------


def _end(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An address:port of /proc/net/tcp{,6}: 32-bit words in host byte order."""
    ip_hex, port_hex = text.split(":")
    raw = bytes.fromhex(ip_hex)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    return _plain(ip), int(port_hex, 16)


def _plain(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """*ip*, an IPv4-mapped IPv6 address as the IPv4 address it maps."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def socket_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the TCP socket on this host whose ends are *local* and
    *remote*, or None when no such socket is here (a peer on another host)."""
    wanted = (
        _plain(ipaddress.ip_address(local[0])),
        local[1],
        _plain(ipaddress.ip_address(remote[0])),
        remote[1],
    )
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                rows = lines.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 7 and (*_end(fields[1]), *_end(fields[2])) == wanted:
                return int(fields[7])
    return None


# ---- HTTP, as far as the checks need it --------------------------------------


class Request:
    """A request's head: its line, its headers (names in lower case)."""

    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError("not an HTTP/1 request line")
        self.method, self.target, self.version = parts
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise ValueError("bad header line")
            self.headers.append((name.lower(), value.strip()))

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def one(self, name: str) -> str | None:
        """The header *name*, None if absent; twice is an error (smuggling)."""
        found = self.values(name)
        if len(found) > 1:
            raise ValueError(f"{name} twice")
        return found[0] if found else None

    @property
    def upgrade(self) -> bool:
        tokens = ",".join(self.values("connection")).lower().split(",")
        return "upgrade" in (token.strip() for token in tokens)

    def forwarded(self) -> bytes:
        """The head for cockpit-ws: one request per connection, except an upgrade."""
        headers = self.headers
        if not self.upgrade:
            dropped = ("connection", "keep-alive", "proxy-connection")
            headers = [(k, v) for k, v in headers if k not in dropped]
            headers.append(("connection", "close"))
        lines = [f"{self.method} {self.target} {self.version}"]
        lines += [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(status: str, text: str, extra: tuple[str, ...] = ()) -> bytes:
    body = (text + "\n").encode()
    head = [
        f"HTTP/1.1 {status}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "X-Content-Type-Options: nosniff",
        "Referrer-Policy: no-referrer",
        "Cache-Control: no-store",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


FORBIDDEN = response(
    "403 Forbidden", "kdlab web: open the URL kdlabctl web printed (with its token)"
)

BAD_REQUEST = response("400 Bad Request", "kdlab web: bad request")


def without_token(target: str) -> str:
    """*target* with the token taken out of its query: where the redirect goes."""
    path, _, query_text = target.partition("?")
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return PAGE  # never off this server (browsers read "/\\x" as "//x")
    query = parse_qsl(query_text.partition("#")[0], keep_blank_values=True)
    rest = urlencode([(key, value) for key, value in query if key != TOKEN])
    return path + (f"?{rest}" if rest else "")


# ---- cockpit-ws and its bridge ----------------------------------------------


def _descendants(roots: list[int]) -> list[int]:
    """*roots* and every process below them, by /proc's parent pids."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/stat", encoding="latin-1") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = list(roots), list(roots)
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _signal(pids: list[int], number: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, number)


async def _spawn(
    argv: list[str], end: socket.socket, env: dict[str, str], *fds: int
) -> asyncio.subprocess.Process:
    """*argv* on *end* as stdin and stdout, in a session of its own (the
    terminal's Ctrl-C is kdlabctl's to handle), killed if kdlabctl dies."""
    return await asyncio.create_subprocess_exec(
        *("setpriv", "--pdeathsig", "TERM", "--"), *argv,
        stdin=end.fileno(), stdout=end.fileno(), env=env, pass_fds=fds,
        start_new_session=True,
    )  # fmt: skip


class Cockpit:
    """cockpit-ws on the private listening socket, with a bridge of the caller's.

    Started at once and again for a connection after the session ended
    (cockpit-ws ends a local session 15 s after its last browser left).
    """

    def __init__(
        self,
        ws: str,
        bridge: str,
        listener: socket.socket,
        private: str,
        bus: str,
        *,
        remote: RemoteInfo | None = None,
    ) -> None:
        self.ws_program = ws
        self.bridge_program = bridge
        self.listener = listener
        # The page's D-Bus "system" bus is kdlabd's bus as kdlabctl reaches it,
        # and a kdlabctl the page spawns uses it too.
        # With --host, *bus* is the host's bridge here: $KDLAB_HOST must not
        # send that kdlabctl to the host again.
        self.bridge_env = dict(
            os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus, KDLAB_BUS=bus, KDLAB_HOST=""
        )
        caller = "" if remote is None else f"{remote.uid}:{remote.user}"
        self.bridge_env[HOST_CALLER_ENV] = caller
        # /etc/cockpit/cockpit.conf (UrlRoot, Origins) is for the system's
        # Cockpit, not this one.
        self.ws_env = dict(os.environ, XDG_CONFIG_DIRS=private)
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            self.ws_env.pop(name, None)
        self.processes: list[asyncio.subprocess.Process] = []
        self.lock = asyncio.Lock()
        self.watcher: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return bool(self.processes) and all(
            process.returncode is None for process in self.processes
        )

    async def ensure(self) -> None:
        async with self.lock:
            if not self.running:
                await self._stop()
                await self._start()

    async def _start(self) -> None:
        ours, theirs = socket.socketpair()
        fd = self.listener.fileno()
        try:
            bridge = await _spawn([self.bridge_program], ours, self.bridge_env)
            self.processes = [bridge]
            ws = [self.ws_program, "--no-tls", "--local-session=-"]
            activated = [ACTIVATE_SHELL, "-c", ACTIVATE, str(fd), *ws]
            self.processes.append(await _spawn(activated, theirs, self.ws_env, fd))
        finally:
            ours.close()
            theirs.close()
        self.watcher = asyncio.create_task(self._watch(list(self.processes)))

    async def _watch(self, processes: list[asyncio.subprocess.Process]) -> None:
        """When one of them ends (the session ended, or a crash), end the other."""
        waits = [asyncio.create_task(process.wait()) for process in processes]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        async with self.lock:
            if self.processes == processes:
                await self._stop()

    async def _stop(self) -> None:
        processes, self.processes = self.processes, []
        alive = [process.pid for process in processes if process.returncode is None]
        tree = _descendants(alive) if alive else []
        _signal(tree, signal.SIGTERM)
        waits = [process.wait() for process in processes]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), STOP_SECONDS)
        _signal(tree, signal.SIGKILL)  # what ignored SIGTERM
        await asyncio.gather(*(process.wait() for process in processes))

    async def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        async with self.lock:
            await self._stop()


# ---- the front ---------------------------------------------------------------


class Front:
    """The TCP side: checks each connection, then relays it to cockpit-ws."""

    def __init__(self, cockpit: Cockpit, socket_path: str, bound: str) -> None:
        self.cockpit = cockpit
        self.socket_path = socket_path
        self.bound = bound
        self.port = 0
        self.token = secrets.token_urlsafe(32)
        self.hosts: set[str] = set()
        self.clients: set[asyncio.Task[None]] = set()

    def listening(self, port: int) -> None:
        """Now that the port is known: the names a browser may call it by."""
        self.port = port
        names = {_host(self.bound)}
        if is_loopback(self.bound):
            names.add("localhost")
        elif ipaddress.ip_address(self.bound).is_unspecified:
            names.add(socket.gethostname().lower())
        self.hosts = {f"{name}:{port}" for name in names}
        if port == 80:
            self.hosts |= names

    @property
    def cookie(self) -> str:
        return f"{COOKIE_PREFIX}{self.port}"

    def url(self) -> str:
        host = self.bound
        if ipaddress.ip_address(host).is_unspecified:
            host = socket.gethostname()
        return f"http://{_host(host)}:{self.port}{PAGE}?{TOKEN}={self.token}"

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.clients.add(task)
        try:
            await self._serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, or sent more header than allowed
        except TimeoutError:
            pass
        finally:
            self.clients.discard(task)
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ours = writer.get_extra_info("sockname")
        peer = writer.get_extra_info("peername")
        if not self._callers(ours, peer):
            await _answer(reader, writer, FORBIDDEN)
            return
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_SECONDS)
        try:
            request = Request(head[:-4])
            verdict = self._check(request, ours[0])
        except ValueError:
            await _answer(reader, writer, BAD_REQUEST)
            return
        if verdict is not None:
            await _answer(reader, writer, verdict)
            return
        await self.cockpit.ensure()
        upstream_reader, upstream = await asyncio.open_unix_connection(self.socket_path)
        try:
            upstream.write(request.forwarded())
            await _relay(reader, writer, upstream_reader, upstream)
        finally:
            upstream.close()

    def _callers(self, ours: tuple[str, int], peer: tuple[str, int]) -> bool:
        """Is the connecting socket the caller's? On this host it is checked;
        a peer elsewhere (a non-loopback --address) only has the token."""
        owner = socket_owner(peer[:2], ours[:2])
        if owner is None:
            return not is_loopback(ours[0])
        return owner == os.getuid()

    def _check(self, request: Request, ours: str) -> bytes | None:
        """None when *request* may pass; else the answer that refuses it.

        The Host may be a name of the bound address or the address the
        client reached (*ours*, for a wildcard --address)."""
        hosts = self.hosts | {f"{_host(ours)}:{self.port}"}
        host = (request.one("host") or "").lower()
        if host not in hosts:
            return response("403 Forbidden", "kdlab web: not this server's address")
        origin = request.one("origin")
        if origin is not None and origin.lower() not in {
            f"http://{name}" for name in hosts
        }:
            return response("403 Forbidden", "kdlab web: cross-origin request")
        if not request.target.startswith("/"):
            raise ValueError("not an origin-form target")
        query = dict(parse_qsl(urlsplit(request.target).query))
        if TOKEN in query:  # the printed URL: trade the token for the cookie
            if request.method != "GET" or not self._is_token(query[TOKEN]):
                return FORBIDDEN
            cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
            return response(
                "303 See Other",
                "kdlab web: signed in",
                (f"Location: {without_token(request.target)}", f"Set-Cookie: {cookie}"),
            )
        return None if self._has_cookie(request) else FORBIDDEN

    def _has_cookie(self, request: Request) -> bool:
        for header in request.values("cookie"):
            for pair in header.split(";"):
                name, _, value = pair.strip().partition("=")
                if name == self.cookie and self._is_token(value):
                    return True
        return False

    def _is_token(self, text: str) -> bool:
        return hmac.compare_digest(text.encode(), self.token.encode())


def _host(ip: str) -> str:
    """*ip* as a URL's host part (IPv6 in brackets)."""
    return f"[{ip}]" if ":" in ip else ip


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    """Send *data*, then read what the client still sends, for a while:
    closing with unread data would reset the connection and could lose the
    answer before the client reads it."""
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            for _ in range(HEADER_LIMIT // 4096):
                if not await reader.read(4096):
                    break


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file, then pass the end of file on."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _relay(
    client_reader: asyncio.StreamReader,
    client: asyncio.StreamWriter,
    upstream_reader: asyncio.StreamReader,
    upstream: asyncio.StreamWriter,
) -> None:
    """Both ways, until cockpit-ws is done (it closes after its answer, or at
    the end of a WebSocket), or either side fails."""
    up = asyncio.create_task(_copy(client_reader, upstream))
    down = asyncio.create_task(_copy(upstream_reader, client))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if up.done() and not down.done() and up.exception() is None:
            await down  # the client said all it had to: the answer comes on
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


# ---- the command ---------------------------------------------------------------


@contextlib.contextmanager
def private_directory() -> Iterator[str]:
    """A 0700 directory of the caller's (mkdtemp), removed afterwards."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isdir(runtime) else None
    path = tempfile.mkdtemp(prefix="kdlab-web-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def serve(
    bound: str, port: int, bus: str, remote: RemoteInfo | None = None
) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP; the URL is stdout's first line.
    *remote*: who the page is on kdlabd's host, with ``--host``."""
    ws, bridge = programs()
    try:
        address_of_bus = bus_address(bus)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    if not is_loopback(bound):
        print(
            f"kdlabctl: warning: serving on {bound}, not loopback: anyone who "
            "reaches it with the URL gets your session (a shell as you), over "
            "unencrypted HTTP",
            file=sys.stderr,
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(number, stop.set)
    with private_directory() as private, socket.socket(socket.AF_UNIX) as listener:
        socket_path = os.path.join(private, "ws.sock")
        listener.bind(socket_path)
        listener.listen(128)
        cockpit = Cockpit(ws, bridge, listener, private, address_of_bus, remote=remote)
        front = Front(cockpit, socket_path, bound)
        try:
            server = await asyncio.start_server(
                front.serve, bound, port, limit=HEADER_LIMIT
            )
        except OSError as err:
            raise InvalidArgument(
                f"cannot listen on {_host(bound)}:{port}: {err.strerror}; "
                "give another --port (or none, for a free one)"
            ) from None
        try:
            front.listening(server.sockets[0].getsockname()[1])
            await cockpit.ensure()
            print(front.url(), flush=True)
            await stop.wait()
        finally:
            server.close()
            for task in list(front.clients):
                task.cancel()
            await asyncio.gather(*front.clients, return_exceptions=True)
            await cockpit.stop()
