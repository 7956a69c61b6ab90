"""Replies kept marshalled (kdlabd/bus/dbus_next_patches.py, patches 6 and 10).

kdlabd sends GetManagedObjects and ListVMs from bytes it keeps: they must be
the very bytes dbus-next would marshal from the objects as they are now.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import cast

import pytest
from dbus_next import Message, MessageType
from dbus_next._private.marshaller import Marshaller
from dbus_next.service import ServiceInterface

from kdlab.states import VMState
from kdlab.wire import job_path, vm_path
from kdlabd.bus.auth import Authorizer, Caller
from kdlabd.bus.dbus_next_patches import (
    MANAGED_OBJECTS,
    Marshalled,
    _ManagedObjects,
    _MarshalledReply,
    _property_variants,
    marshal,
)
from kdlabd.bus.job import JobInterface
from kdlabd.bus.manager import ManagerInterface
from kdlabd.bus.vm import VMInterface
from kdlabd.core.dumps import DumpService
from kdlabd.core.images import ImageService
from kdlabd.core.jobs import Job, JobManager
from kdlabd.core.models import VMRecord
from kdlabd.core.vms import VMService
from tests.unit.test_domain_xml import make_spec

Objects = list[tuple[str, list[ServiceInterface]]]


def vm(name: str) -> VMInterface:
    record = VMRecord(make_spec(name), f"uuid-of-{name}", VMState.STOPPED)
    return VMInterface(record, cast(VMService, None), cast(Authorizer, None))


def job(number: int, target: str) -> tuple[str, list[ServiceInterface]]:
    record = Job(number, "import", target, 1000, progress=0.25)
    interface = JobInterface(record, JobManager(), cast(Authorizer, None))
    return job_path(number), [interface]


def fleet(count: int) -> Objects:
    """*count* VMs, then *count* jobs whose last property (Target: they come
    sorted by name) ends their entries at every offset modulo 8."""
    vms: Objects = [(vm_path(f"vm{n}"), [vm(f"vm{n}")]) for n in range(count)]
    return vms + [job(n, "t" * n) for n in range(count)]


def by_dbus_next(objects: Objects) -> bytes:
    """The body dbus-next marshals for GetManagedObjects of *objects*."""
    body = {
        path: {i.name: _property_variants(i) for i in interfaces}
        for path, interfaces in objects
    }
    marshaller = Marshaller(MANAGED_OBJECTS, [body])
    marshaller.marshall()
    return bytes(marshaller.buffer)


@pytest.mark.parametrize("objects", [[], fleet(1), fleet(9)])
def test_the_reply_is_the_bytes_dbus_next_marshals(objects: Objects) -> None:
    assert _ManagedObjects().reply(objects) == Marshalled(
        MANAGED_OBJECTS, by_dbus_next(objects)
    )


def test_a_kept_part_is_made_again_once_forgotten() -> None:
    objects = fleet(3)
    kept = _ManagedObjects()
    before = kept.reply(objects)
    path, (interface,) = objects[0]
    assert isinstance(interface, VMInterface)
    interface.update(VMRecord(make_spec("vm0"), "uuid-of-vm0", VMState.RUNNING))
    # Kept: what kdlabd's bus does on the change's PropertiesChanged is forget it.
    assert kept.reply(objects) == before
    kept.forget(path)
    assert kept.reply(objects).data == by_dbus_next(objects) != before.data


def call(serial: int, sender: str | None) -> Message:
    return Message(
        destination="org.kdlab.Kdlab1",
        path="/org/kdlab/Kdlab1",
        interface="org.kdlab.Kdlab1.Manager",
        member="ListVMs",
        sender=sender,
        serial=serial,
    )


@pytest.mark.parametrize("sender", [":1.42", None])
def test_a_marshalled_reply_is_the_message_dbus_next_sends(sender: str | None) -> None:
    paths = [vm_path(name) for name in ("a", "b-c", "linux-6.9")]
    ordinary = Message.new_method_return(call(5, sender), "ao", [paths])
    kept = Message.new_method_return(call(5, sender), "ao", [marshal("ao", [paths])])
    ordinary.serial = kept.serial = 9
    sent = _MarshalledReply(kept, kept.body[0])
    assert sent._marshall() == ordinary._marshall()


def test_a_marshalled_body_of_another_signature_is_refused() -> None:
    reply = Message.new_method_return(call(5, ":1.1"), "as", [marshal("ao", [[]])])
    with pytest.raises(ValueError, match="signature 'as'"):
        _MarshalledReply(reply, reply.body[0])
    signal = Message.new_signal("/a", "org.kdlab.Kdlab1.Manager", "X")
    assert signal.message_type is MessageType.SIGNAL
    with pytest.raises(ValueError, match="SIGNAL"):
        _MarshalledReply(signal, marshal("ao", [[]]))


class Fleet:
    """What ManagerInterface asks of VMService for ListVMs."""

    def __init__(self, *names: str) -> None:
        self.records = {
            name: VMRecord(make_spec(name), name, VMState.STOPPED) for name in names
        }

    def list(self) -> list[VMRecord]:
        return sorted(self.records.values(), key=lambda record: record.name)


def test_list_vms_is_kept_until_a_vm_comes_or_goes() -> None:
    vms = Fleet("b", "a")
    manager = ManagerInterface(
        cast(VMService, vms),
        cast(ImageService, None),
        cast(JobManager, None),
        cast(Authorizer, None),
        cast(DumpService, None),
    )
    list_vms = inspect.unwrap(ManagerInterface.ListVMs.__dict__["__DBUS_METHOD"].fn)
    caller = Caller(":1.1", 0, frozenset())

    def listed() -> Marshalled:
        return cast(Marshalled, asyncio.run(list_vms(manager, caller)))

    assert listed() == marshal("ao", [[vm_path("a"), vm_path("b")]])
    vms.records["c"] = VMRecord(make_spec("c"), "c", VMState.STOPPED)
    manager.vm_added("c", vm_path("c"))
    assert listed() == marshal("ao", [[vm_path(n) for n in ("a", "b", "c")]])
    del vms.records["a"]
    manager.vm_removed("a", vm_path("a"))
    assert listed() == marshal("ao", [[vm_path("b"), vm_path("c")]])
