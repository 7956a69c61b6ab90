"""kdlabd restarts: libvirt is the database, so a new kdlabd exports the same VMs.

With the test driver the domains live inside kdlabd's libvirt connection, so
a restart re-reads the driver file: the view after the restart must equal the
view before, built from libvirt and kdlabd's files alone.
"""

from __future__ import annotations

import pytest

from kdlab.errors import EXIT_UNAVAILABLE
from kdlab.wire import DUMP_INTERFACE, VM_INTERFACE
from tests.bus.conftest import Ctl
from tests.bus.contract import MANAGER
from tests.support.bus import OBJECT_MANAGER, BusClient
from tests.support.testdriver import Lab

pytestmark = pytest.mark.bus


def test_restart_exports_every_vm_again(
    client: BusClient, kdlabd: Lab, ctl: Ctl
) -> None:
    before = client.managed_objects()
    # No sender in the rules: the new kdlabd exports its objects before it owns
    # the name (owning it means ready), so its unique name is not known yet.
    client.add_match(type="signal", interface=OBJECT_MANAGER, member="InterfacesAdded")
    client.add_match(type="signal", interface=MANAGER, member="VMNew")

    kdlabd.stop_cleanly()
    assert ctl("list").returncode == EXIT_UNAVAILABLE
    kdlabd.start()

    assert client.managed_objects() == before

    def added(interface: str) -> dict[str, dict[str, object]]:
        return {
            msg.body[0]: {key: var.value for key, var in msg.body[1][interface].items()}
            for msg in client.signals
            if msg.member == "InterfacesAdded" and interface in msg.body[1]
        }

    def exported(interface: str) -> dict[str, dict[str, object]]:
        return {path: i[interface] for path, i in before.items() if interface in i}

    vms, dumps = exported(VM_INTERFACE), exported(DUMP_INTERFACE)
    assert dumps, "the test driver's dumps pool holds dumps"
    client.wait_until(lambda: len(added(VM_INTERFACE)) == len(vms))
    assert added(VM_INTERFACE) == vms
    assert added(DUMP_INTERFACE) == dumps
    announced = {tuple(msg.body) for msg in client.signals if msg.member == "VMNew"}
    assert announced == {(vm["Name"], path) for path, vm in vms.items()}
