"""Calls that race: kdlabd serializes the operations on one VM.

The calls are all sent before any reply is awaited, so kdlabd has them all
queued at once.
"""

from __future__ import annotations

import pytest
from dbus_next import Message, MessageType

from kdlab.errors import InvalidState, NoSuchVM
from kdlab.wire import BUS_NAME, VM_INTERFACE
from tests.support.bus import BusClient

pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]


def vm_call(client: BusClient, name: str, member: str) -> Message:
    options = ("a{sv}", [{}]) if member in ("Start", "Stop") else ("", [])
    return Message(
        destination=BUS_NAME,
        path=client.vm_path(name),
        interface=VM_INTERFACE,
        member=member,
        signature=options[0],
        body=options[1],
    )


def outcomes(replies: list[Message]) -> list[str | None]:
    """None for each success, the error name for each failure."""
    return [
        None if reply.message_type is MessageType.METHOD_RETURN else reply.error_name
        for reply in replies
    ]


def test_two_starts_one_wins(client: BusClient) -> None:
    replies = client.call_at_once(*(vm_call(client, "idle", "Start") for _ in range(2)))
    assert sorted(outcomes(replies), key=str) == [None, InvalidState.dbus_name()]
    assert client.vm_properties("idle")["State"] == "running"


def test_delete_and_start_race(client: BusClient) -> None:
    replies = client.call_at_once(
        vm_call(client, "idle", "Delete"), vm_call(client, "idle", "Start")
    )
    # Serialized, in either order: delete first, and the start finds no VM;
    # or start first, and the delete is refused because the VM runs.
    result = outcomes(replies)
    # A start that arrives after the delete unexported the VM's object is
    # answered by the bus library itself: UnknownMethod.
    assert result in (
        [None, NoSuchVM.dbus_name()],
        [None, "org.freedesktop.DBus.Error.UnknownMethod"],
        [InvalidState.dbus_name(), None],
    ), result
    deleted = result[0] is None
    assert ("idle" in client.vm_names()) is not deleted
