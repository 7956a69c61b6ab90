"""A host that does not play by the bridge's rules, in place of ssh.

``kdlabctl --host`` trusts the host's kdlabd with its commands, not with its
own process: a compromised host, or a broken kdlabctl there, may send any
bytes. :func:`argv` is the command line of such a back (a plain process, as
``ssh`` would be); each scenario is a function of this module, run in it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from kdlab.agent.protocol import HEADER, HEADER_SIZE
from kdlabctl.bridge import MAGIC, PROTOCOL, Frame
from tests.support import REPO

HELLO = {
    "protocol": PROTOCOL,
    "uid": 0,
    "user": "root",
    "hostname": "evil",
    "version": "0",
    "bus_error": "",
}


def argv(scenario: str) -> list[str]:
    """The back that plays *scenario* (a function's name here)."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); "
        f"from tests.bus import hostileback; hostileback.SCENARIOS[{scenario!r}]()"
    )
    return [sys.executable, "-c", code]


def send(kind: int, channel: int, payload: bytes = b"", flags: int = 0) -> None:
    os.write(1, HEADER.pack(len(payload), channel, kind, flags) + payload)


def greet(hello: bytes | None = None) -> None:
    os.write(1, MAGIC)
    send(Frame.HELLO, 0, hello or json.dumps(HELLO).encode())


def linger() -> None:
    """Stay, reading what comes, until the front ends the channel."""
    while os.read(0, 65536):
        pass


def huge_uid() -> None:
    """A hello whose uid is no uid (JSON's 1e999 is infinity)."""
    greet(json.dumps(HELLO).replace('"uid": 0', '"uid": 1e999').encode())
    linger()


def accept_and_vanish() -> None:
    """The host answers hello, then dies before it answers a CONNECT."""
    greet()
    header = os.read(0, HEADER_SIZE)
    assert HEADER.unpack(header)[2] == Frame.CONNECT
    time.sleep(0.5)


SCENARIOS: dict[str, Callable[[], None]] = {
    "huge_uid": huge_uid,
    "accept_and_vanish": accept_and_vanish,
}
