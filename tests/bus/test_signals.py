"""What a desktop client that never polls sees: signals, through match rules.

A dbus-next client subscribes with AddMatch like any other client would;
the changes are made by kdlabctl in another process.
"""

from __future__ import annotations

from typing import Any

import pytest
from dbus_next import Message

from kdlab.wire import BUS_NAME, MANAGER_PATH, VM_INTERFACE
from tests.bus.conftest import Ctl
from tests.bus.contract import MANAGER
from tests.support.bus import OBJECT_MANAGER, PROPERTIES, BusClient
from tests.support.clients import assert_no_traceback

pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]

UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"


def announced_changes(client: BusClient, path: str) -> list[dict[str, Any]]:
    """The VM properties announced with PropertiesChanged on *path* so far."""
    announced = []
    for msg in client.signals:
        if (msg.path, msg.interface, msg.member) == (
            path,
            PROPERTIES,
            "PropertiesChanged",
        ):
            interface, changed, invalidated = msg.body
            assert (interface, invalidated) == (VM_INTERFACE, [])
            announced.append({key: value.value for key, value in changed.items()})
    return announced


def announced_states(client: BusClient, path: str) -> list[str]:
    """The State values announced with PropertiesChanged on *path* so far."""
    return [changed["State"] for changed in announced_changes(client, path)]


def test_start_and_stop_announce_each_state(client: BusClient, ctl: Ctl) -> None:
    path = client.vm_path("booted")
    client.add_match(type="signal", sender=BUS_NAME, path=path, interface=PROPERTIES)

    assert ctl("start", "booted").returncode == 0
    client.wait_until(lambda: announced_states(client, path)[-1:] == ["running"])
    assert announced_states(client, path) == ["starting", "running"]

    assert ctl("stop", "--force", "booted").returncode == 0
    client.wait_until(lambda: announced_states(client, path)[-1:] == ["stopped"])
    assert announced_states(client, path) == [
        "starting",
        "running",
        "stopping",
        "stopped",
    ]
    # The new boot's mark comes with "starting", how it ended with "stopped";
    # nothing else changes.
    starting, running, stopping, stopped = announced_changes(client, path)
    assert set(starting) == {"State", "Booted"}
    assert starting["Booted"] > 0
    assert set(running) == set(stopping) == {"State"}
    assert stopped == {"State": "stopped", "LastStop": "requested"}


def _removal_signals(client: BusClient, ctl: Ctl, name: str) -> tuple[Message, Message]:
    """Delete *name*; return its VMRemoved and InterfacesRemoved signals."""
    path = client.vm_path(name)
    client.add_match(type="signal", sender=BUS_NAME, path_namespace=MANAGER_PATH)
    assert ctl("delete", name).returncode == 0
    removed = client.wait_for_signal(lambda msg: msg.member == "VMRemoved")
    gone = client.wait_for_signal(lambda msg: msg.member == "InterfacesRemoved")
    assert gone.interface == OBJECT_MANAGER
    assert gone.body == [path, [VM_INTERFACE]]
    return removed, gone


def test_delete_announces_the_removal(client: BusClient, ctl: Ctl) -> None:
    removed, _gone = _removal_signals(client, ctl, "idle")
    assert (removed.path, removed.interface) == (MANAGER_PATH, MANAGER)
    assert removed.body == ["idle", f"{MANAGER_PATH}/vm/idle"]
    assert "idle" not in client.vm_names()
    # The contract: calls on the old path fail with a standard error.
    name, text = client.error(removed.body[1], VM_INTERFACE, "Start", "a{sv}", [{}])
    assert name in (UNKNOWN_METHOD, UNKNOWN_OBJECT)
    assert_no_traceback(text)


def test_interfaces_removed_comes_from_the_object_manager(
    client: BusClient, ctl: Ctl
) -> None:
    _removed, gone = _removal_signals(client, ctl, "idle")
    assert gone.path == MANAGER_PATH
