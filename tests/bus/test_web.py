"""``kdlabctl web``: the caller's Cockpit session, to the caller's browser only.

Real parts: Debian's cockpit-ws and cockpit-bridge, run by ``kdlabctl web``
as a login user (alice) on a private bus; the probes (tests.support.web) run
as login users too, because the front tells users apart by their sockets.
The page is a package of the test's own in alice's 0700 home
($XDG_DATA_HOME, which the bridge inherits): only a bridge that is alice's
can serve it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kdlab.errors import EXIT_UNAVAILABLE, InvalidArgument
from kdlabctl import web
from tests.support.bus import BusClient, PrivateBus
from tests.support.clients import assert_no_traceback
from tests.support.logins import PYTHON, Logins, LoginUser, kdlabctl_command
from tests.support.prereq import require
from tests.support.web import WebServer, exchange, processes_of

pytestmark = pytest.mark.bus

MARKER = "kdlab-web-probe-page"
COCKPIT = ("cockpit-ws", "cockpit-bridge")
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"


@pytest.fixture
def share(logins: Logins) -> Iterator[Path]:
    """alice's $XDG_DATA_HOME for the test, holding a ``kdlab`` Cockpit package."""
    require(Path(web.COCKPIT_WS).exists(), "cockpit-ws (apt-get install cockpit-ws)")
    alice = logins.alice
    root = alice.home / "web-share"
    package = root / "cockpit" / "kdlab"
    package.mkdir(parents=True)
    (package / "manifest.json").write_text('{"version": 0}')
    (package / "index.html").write_text(f"<html><body>{MARKER}</body></html>")
    for path in (root, root / "cockpit", package, *package.iterdir()):
        os.chown(path, alice.uid, alice.gid)
    root.chmod(0o700)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=True)


@pytest.fixture
def server(logins: Logins, bus: PrivateBus, share: Path) -> Iterator[WebServer]:
    running = WebServer(logins.alice, bus.address, env=f"XDG_DATA_HOME={share}")
    try:
        yield running
    finally:
        running.close()


def probe(
    logins: Logins, user: LoginUser, port: int, requests: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The answers to *requests*, sent by *user* (tests.support.web)."""
    command = (
        f"cd ~/kdlab && {PYTHON} -m tests.support.web {port} "
        f"{shlex.quote(json.dumps(requests))}"
    )
    result = logins.run(user, command)
    assert result.returncode == 0, result.stderr
    answers: list[dict[str, Any]] = json.loads(result.stdout)
    return answers


def target_of(url: str) -> str:
    """The request target of *url* (its path and query)."""
    return "/" + url.split("/", 3)[3]


def test_the_url_gets_the_callers_session(
    logins: Logins, client: BusClient, server: WebServer
) -> None:
    assert server.url.startswith(f"http://127.0.0.1:{server.port}/")
    assert server.path == web.PAGE
    assert server.token
    origin = {"Origin": f"http://127.0.0.1:{server.port}"}
    cookie = {"Cookie": server.cookie}
    signed_in, page, socket_, manifests = probe(
        logins,
        logins.alice,
        server.port,
        [
            {"target": target_of(server.url)},
            {"target": web.PAGE, "headers": cookie},
            {"target": "/cockpit/socket", "websocket": True, "bus_id": True,
             "headers": {**cookie, **origin}},
            {"target": "/cockpit/@localhost/manifests.json", "headers": cookie},
        ],
    )  # fmt: skip
    assert signed_in["status"] == 303
    assert signed_in["headers"]["location"] == web.PAGE, "the token leaves the URL"
    set_cookie = signed_in["headers"]["set-cookie"]
    assert set_cookie.startswith(server.cookie + ";")
    assert "HttpOnly" in set_cookie
    assert "SameSite=Strict" in set_cookie
    assert page["status"] == 200, page
    assert MARKER in page["body"]
    assert socket_["status"] == 101, socket_
    assert socket_["init"]
    # The page's "system" bus is the one kdlabctl was given (--bus).
    get_id = client.call(DBUS_PATH, DBUS_NAME, "GetId", destination=DBUS_NAME)
    assert socket_["bus_id"] == get_id.body[0]
    assert manifests["status"] == 200
    assert '"kdlab"' in manifests["body"]


def test_without_the_secret_nothing_passes(logins: Logins, server: WebServer) -> None:
    port = server.port
    cookie = {"Cookie": server.cookie}
    origin = {"Origin": f"http://127.0.0.1:{port}"}
    wrong = "x" + server.token[1:]
    refused = [
        {"target": web.PAGE},
        {"target": f"{web.PAGE}?kdlab-token={wrong}"},
        {"target": f"{web.PAGE}?kdlab-token="},
        {"target": web.PAGE, "headers": {"Cookie": f"kdlab-web-{port}={wrong}"}},
        {"target": web.PAGE, "headers": {"Cookie": f"kdlab-web-1={server.token}"}},
        {"target": "/cockpit/socket", "websocket": True, "headers": origin},
        {"target": "/cockpit/socket", "websocket": True,
         "headers": {"Cookie": f"kdlab-web-{port}={wrong}", **origin}},
        # DNS rebinding: a page of another name, resolved to 127.0.0.1.
        {"target": web.PAGE, "headers": {**cookie, "Host": f"evil.example:{port}"}},
        {"target": f"{web.PAGE}?kdlab-token={server.token}",
         "headers": {"Host": f"evil.example:{port}"}},
        {"target": "/cockpit/socket", "websocket": True,
         "headers": {**cookie, "Origin": f"http://evil.example:{port}"}},
        {"target": web.PAGE, "method": "POST",
         "headers": {**cookie, "Origin": "null"}},
    ]  # fmt: skip
    for request, answer in zip(
        refused, probe(logins, logins.alice, port, refused), strict=True
    ):
        assert answer["status"] == 403, (request, answer)
        assert MARKER not in answer.get("body", ""), request
        assert "set-cookie" not in answer["headers"], request


def test_another_user_gets_nothing_even_with_the_token(
    logins: Logins, server: WebServer
) -> None:
    """bob (group kdlab too) and root reach the port; the front refuses
    their sockets before it reads a request: the token alone is not enough."""
    cookie = {"Cookie": server.cookie}
    origin = {"Origin": f"http://127.0.0.1:{server.port}"}
    attempts = [
        {"target": web.PAGE},
        {"target": target_of(server.url)},
        {"target": web.PAGE, "headers": cookie},
        {"target": "/cockpit/socket", "websocket": True,
         "headers": {**cookie, **origin}},
    ]  # fmt: skip
    answers = probe(logins, logins.bob, server.port, attempts)
    answers += [exchange(server.port, attempt) for attempt in attempts]  # root
    for answer in answers:
        assert answer["status"] == 403, answer
        assert MARKER not in answer.get("body", "")
        assert "set-cookie" not in answer["headers"]
    # And alice, with the same requests, is let in: the refusals were bob's.
    assert probe(logins, logins.alice, server.port, attempts[2:3])[0]["status"] == 200


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_it_and_all_it_started(
    logins: Logins, server: WebServer, number: int
) -> None:
    answer = probe(
        logins,
        logins.alice,
        server.port,
        [{"target": web.PAGE, "headers": {"Cookie": server.cookie}}],
    )[0]
    assert answer["status"] == 200  # cockpit-ws and its bridge are at work
    assert len(processes_of(logins.alice.uid, COCKPIT)) == 2
    code, stderr = server.stop(number)
    assert code == 0, stderr
    assert_no_traceback(stderr)
    assert processes_of(logins.alice.uid, COCKPIT) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), 5).close()


def test_it_serves_whatever_its_listening_sockets_descriptor(
    logins: Logins, share: Path
) -> None:
    """Started with descriptors 3 to 9 open (as with --host, whose session
    holds several), kdlabctl web's socket for cockpit-ws is 10 or more: a
    number Debian's sh cannot redirect from. cockpit-ws still gets it."""
    taken = " ".join(f"{fd}</dev/null" for fd in range(3, 10))
    running = WebServer(
        logins.alice, "unix:path=/nonexistent", env=f"XDG_DATA_HOME={share}",
        before=f"exec {taken}",
    )  # fmt: skip
    try:
        answer = probe(
            logins,
            logins.alice,
            running.port,
            [{"target": web.PAGE, "headers": {"Cookie": running.cookie}}],
        )[0]
        assert answer["status"] == 200, answer
        assert MARKER in answer["body"]
    finally:
        code, stderr = running.stop()
    assert code == 0, stderr
    assert "Bad fd number" not in stderr


def test_a_port_taken_is_invalid_argument(logins: Logins, bus: PrivateBus) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = logins.kdlabctl(logins.alice, bus.address, "web", "--port", str(port))
    assert result.returncode == InvalidArgument.exit_code, result
    assert result.stdout == ""
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "another --port" in result.stderr
    assert_no_traceback(result.stderr)
    assert processes_of(logins.alice.uid, COCKPIT) == []


def test_without_cockpit_ws_it_says_what_to_install(
    logins: Logins, bus: PrivateBus
) -> None:
    command = kdlabctl_command(bus.address, "web")
    result = logins.run(
        logins.alice, f"export KDLAB_COCKPIT_WS=/nonexistent/cockpit-ws && {command}"
    )
    assert result.returncode == EXIT_UNAVAILABLE, result
    assert result.stdout == ""
    assert "cockpit-ws is not installed" in result.stderr
    assert "apt-get install cockpit-ws" in result.stderr
    assert_no_traceback(result.stderr)


def test_another_address_is_explicit_and_warned_about(
    logins: Logins, bus: PrivateBus, share: Path
) -> None:
    """Bound to every address, it warns; bob on this host is still refused."""
    running = WebServer(
        logins.alice, bus.address, "--address", "0.0.0.0", env=f"XDG_DATA_HOME={share}"
    )
    try:
        assert running.url.startswith(f"http://{socket.gethostname()}:")
        attempt = [{"target": web.PAGE, "headers": {"Cookie": running.cookie}}]
        assert probe(logins, logins.bob, running.port, attempt)[0]["status"] == 403
        assert probe(logins, logins.alice, running.port, attempt)[0]["status"] == 200
        code, stderr = running.stop()
    finally:
        running.close()
    assert code == 0
    assert "warning: serving on 0.0.0.0" in stderr
    assert "gets your session" in stderr
