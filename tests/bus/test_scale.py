"""kdlabd with a thousand VMs: it starts, answers and lists them all.

Exporting a thousand objects sends thousands of signals at start-up, more than
the socket to the bus holds at once; dbus-next 0.2.3 took the full socket for
a dead connection, and kdlabd never took its name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.wire import MANAGER_INTERFACE, MANAGER_PATH, VM_INTERFACE
from tests.support.bus import BusClient, PrivateBus
from tests.support.testdriver import Lab, defined_fleet

pytestmark = pytest.mark.bus

COUNT = 1000


@pytest.fixture
def thousand(bus: PrivateBus, workdir: Path) -> Iterator[Lab]:
    with Lab(bus, workdir, defined_fleet(COUNT)).serving() as lab:
        yield lab


def test_a_thousand_vms_are_served(thousand: Lab, client: BusClient) -> None:
    (paths,) = client.ok(MANAGER_PATH, MANAGER_INTERFACE, "ListVMs")
    assert len(paths) == COUNT
    objects = client.managed_objects()
    assert {props[VM_INTERFACE]["Name"] for props in objects.values()} == {
        vm.name for vm in thousand.vms
    }
    for vm in thousand.vms[:: COUNT // 10]:
        assert client.vm_properties(vm.name) == vm.properties()
