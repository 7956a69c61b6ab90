"""kdlabctl.web's logic on its own: request heads, the redirect, /proc/net/tcp,
the bridge's environment.

What it lets through and what not, end to end with real cockpit-ws and real
users, is tests/bus/test_web.py.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

import pytest

from kdlabctl import web
from kdlabctl.bridge import RemoteInfo
from tests.support import REPO


def test_a_request_head_is_parsed() -> None:
    request = web.Request(
        b"GET /a?b=c HTTP/1.1\r\nHost: 127.0.0.1:1\r\nCookie: x=1\r\nCookie: y=2"
    )
    assert (request.method, request.target) == ("GET", "/a?b=c")
    assert request.one("host") == "127.0.0.1:1"
    assert request.values("cookie") == ["x=1", "y=2"]
    assert request.one("origin") is None


@pytest.mark.parametrize(
    "head",
    [
        b"GET /\r\nHost: a",  # HTTP/0.9
        b"GET / HTTP/2\r\nHost: a",
        b"GET  / HTTP/1.1\r\nHost: a",
        b"GET / HTTP/1.1\r\nHost : a",  # a space before the colon: smuggling
        b"GET / HTTP/1.1\r\n folded",
    ],
)
def test_a_malformed_head_is_refused(head: bytes) -> None:
    with pytest.raises(ValueError, match=r"request line|header line"):
        web.Request(head)


def test_two_hosts_are_refused() -> None:
    request = web.Request(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:1\r\nHost: evil:1")
    with pytest.raises(ValueError, match="host twice"):
        request.one("host")


def test_forwarded_is_one_request_per_connection() -> None:
    request = web.Request(
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nKeep-Alive: 5"
    )
    forwarded = request.forwarded().decode()
    assert forwarded.endswith("\r\nconnection: close\r\n\r\n")
    assert "keep-alive" not in forwarded.lower()


def test_an_upgrade_is_forwarded_as_it_came() -> None:
    request = web.Request(
        b"GET /cockpit/socket HTTP/1.1\r\nHost: h\r\n"
        b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket"
    )
    assert request.upgrade
    assert b"connection: keep-alive, Upgrade\r\n" in request.forwarded()


@pytest.mark.parametrize(
    ("target", "location"),
    [
        (f"{web.PAGE}?kdlab-token=T", web.PAGE),
        ("/x?a=1&kdlab-token=T&b=2", "/x?a=1&b=2"),
        ("//evil.example/?kdlab-token=T", web.PAGE),  # never off this server
        ("/\\evil.example/?kdlab-token=T", web.PAGE),  # "//evil.example/"
    ],
)
def test_the_redirect_drops_the_token_and_stays_here(
    target: str, location: str
) -> None:
    assert web.without_token(target) == location


def test_the_owner_of_a_loopback_socket_is_found() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                ours = client.getsockname()
                theirs = client.getpeername()
                assert web.socket_owner(ours, theirs) == os.getuid()
                assert web.socket_owner(theirs, ("127.0.0.2", 1)) is None


def test_proc_net_tcp6_addresses_are_read() -> None:
    """/proc/net/tcp6 prints each 32-bit word of the address in host order."""
    if sys.byteorder != "little":
        raise AssertionError("the sample is a little-endian host's")
    assert web._end("00000000000000000000000001000000:1F90") == (
        ipaddress.ip_address("::1"),
        8080,
    )
    mapped = "0000000000000000FFFF00000100007F:0016"
    assert web._end(mapped) == (ipaddress.ip_address("127.0.0.1"), 22)


@pytest.mark.parametrize(
    ("remote", "caller"),
    [(None, ""), (RemoteInfo(1002, "bob", "0.1.0", "lab2"), "1002:bob")],
    ids=["here", "host"],
)
def test_the_bridge_says_who_the_page_is_on_kdlabds_host(
    remote: RemoteInfo | None, caller: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --host the page names the host's uids by the session's caller
    (kdlab.js reads the variable); here by this machine's passwd, whatever
    the environment kdlabctl web was started in said."""
    monkeypatch.setenv(web.HOST_CALLER_ENV, "0:root")
    with socket.socket(socket.AF_UNIX) as listener:
        cockpit = web.Cockpit("ws", "bridge", listener, "/x", "unix:path=/b",
                              remote=remote)  # fmt: skip
    assert cockpit.bridge_env[web.HOST_CALLER_ENV] == caller
    script = (REPO / "kdlabctl" / "cockpit" / "kdlab.js").read_text()
    assert f'const HOST_CALLER_ENV = "{web.HOST_CALLER_ENV}";' in script
