"""The patches of kdlabd/bus/dbus_next_patches.py that no other test shows.

Each test here fails with the patch it names removed (the module's docstring
lists the tests of the others).
"""

from __future__ import annotations

import os

import pytest

from kdlab.errors import NoSuchVM
from kdlab.wire import MANAGER_PATH, VM_INTERFACE
from tests.bus.contract import MANAGER
from tests.bus.test_security import daemon_pid
from tests.support.bus import BusClient
from tests.support.testdriver import Lab

pytestmark = pytest.mark.bus

ROUNDS = 20


@pytest.mark.usefixtures("kdlabd")
def test_returned_descriptors_are_not_kept(client: BusClient) -> None:
    """Patch 4: a descriptor kdlabd returns is the caller's; kdlabd keeps no copy."""
    fds = f"/proc/{daemon_pid(client)}/fd"
    path = client.vm_path("booted")  # has a console log
    before = len(os.listdir(fds))
    for _ in range(ROUNDS):
        reply = client.call(path, VM_INTERFACE, "OpenConsoleLog")
        (fd,) = reply.unix_fds
        os.close(fd)
    client.sleep(0.1)  # the last reply's descriptor is closed once it is written
    assert len(os.listdir(fds)) - before == 0, f"after {ROUNDS} OpenConsoleLog"


def test_an_error_reply_logs_no_traceback(kdlabd: Lab, client: BusClient) -> None:
    """Patch 5: an error reply is an answer, not a crash in kdlabd's log."""
    for _ in range(ROUNDS):
        name, _message = client.error(MANAGER_PATH, MANAGER, "GetVM", "s", ["nope"])
        assert name == NoSuchVM.dbus_name()
    errors = [e for e in kdlabd.daemon.events() if e["level"] == "error"]
    assert errors == []
    assert "Traceback" not in kdlabd.daemon.log()
