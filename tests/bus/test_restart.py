"""kdlabd restarts: libvirt is the database, so a new kdlabd exports the same VMs.

With the test driver the domains live inside kdlabd's libvirt connection, so
a restart re-reads the driver file: the view after the restart must equal the
view before, built from libvirt and kdlabd's files alone.
"""

from __future__ import annotations

import pytest

from kdlab.errors import EXIT_UNAVAILABLE
from kdlab.wire import VM_INTERFACE
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

    def vms_added() -> dict[str, dict[str, object]]:
        return {
            msg.body[0]: {
                key: var.value for key, var in msg.body[1][VM_INTERFACE].items()
            }
            for msg in client.signals
            if msg.member == "InterfacesAdded" and VM_INTERFACE in msg.body[1]
        }

    client.wait_until(lambda: len(vms_added()) == len(before))
    assert vms_added() == {
        path: interfaces[VM_INTERFACE] for path, interfaces in before.items()
    }
    announced = {tuple(msg.body) for msg in client.signals if msg.member == "VMNew"}
    assert announced == {(i[VM_INTERFACE]["Name"], path) for path, i in before.items()}
