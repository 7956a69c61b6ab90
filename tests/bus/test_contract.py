"""The interface XML files are the API contract: kdlabd must serve exactly them.

The files are checked on their own (shape, documentation of every member,
argument, option key and error), then against the live introspection of a
running kdlabd and its ObjectManager view.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import kdlabd
from kdlab import wire
from kdlab.errors import ERRORS
from kdlab.wire import (
    API_REVISION,
    BUILD_OPTIONS,
    CREATE_OPTIONS,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    RESTORE_CHECKPOINT_OPTIONS,
    SAVE_CHECKPOINT_OPTIONS,
    START_OPTIONS,
    STOP_OPTIONS,
    VM_INTERFACE,
)
from tests.bus import contract
from tests.bus.conftest import Ctl
from tests.bus.contract import (
    DUMP,
    IMAGE,
    INTERFACES,
    JOB,
    MANAGER,
    PROCESS,
    RECORDING,
    VM,
)
from tests.bus.guestagent import running_command
from tests.support.bus import OBJECT_MANAGER, PROPERTIES, BusClient
from tests.support.testdriver import DUMPS, FLEET, RECORDINGS, Lab

pytestmark = pytest.mark.bus

INTROSPECT_DOCTYPE = (
    "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN",
    "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd",
)
KDLAB_ERRORS = {cls.dbus_name() for cls in ERRORS}
# Written out here, not computed with kdlab.wire: the escaping is part of the contract.
VM_PATHS = {
    "booted": "/org/kdlab/Kdlab1/vm/booted",
    "busy": "/org/kdlab/Kdlab1/vm/busy",
    "frozen": "/org/kdlab/Kdlab1/vm/frozen",
    "idle": "/org/kdlab/Kdlab1/vm/idle",
    "linux-6.9-rc1": "/org/kdlab/Kdlab1/vm/linux_2d6_2e9_2drc1",
}
DUMP_PATHS = {
    "busy-20231114-224820": "/org/kdlab/Kdlab1/dump/busy_2d20231114_2d224820",
    "linux-6.9-rc1-20231114-224820": (
        "/org/kdlab/Kdlab1/dump/linux_2d6_2e9_2drc1_2d20231114_2d224820"
    ),
}


def test_interface_names_are_the_daemons() -> None:
    assert (MANAGER, VM) == (MANAGER_INTERFACE, VM_INTERFACE)


@pytest.mark.parametrize("interface", INTERFACES)
def test_file_holds_one_documented_interface(interface: str) -> None:
    tree = contract.contract_tree(interface)
    assert (tree.docinfo.public_id, tree.docinfo.system_url) == INTROSPECT_DOCTYPE
    assert tree.getroot().tag == "node"
    assert [i.get("name") for i in tree.getroot().iter("interface")] == [interface]
    assert (
        contract.doc(contract.contract(interface)).strip().startswith(f"{interface}:")
    )


@pytest.mark.parametrize("interface", INTERFACES)
def test_every_member_and_argument_is_documented(interface: str) -> None:
    for element in contract.members(interface):
        name = element.get("name")
        text = contract.doc(element)
        assert text.strip().startswith(f"{name}:"), (
            f"{interface}.{name} has no doc comment"
        )
        assert len(text.split(":", 1)[1].strip()) >= 15, (
            f"{interface}.{name}: doc too short"
        )
        for arg in element.iter("arg"):
            assert f"@{arg.get('name')}:" in text, (
                f"{interface}.{name}: @{arg.get('name')}"
            )
        if element.tag == "method":
            errors = contract.documented_errors(interface, name)
            assert errors <= KDLAB_ERRORS, (
                f"{interface}.{name}: unknown {errors - KDLAB_ERRORS}"
            )
            assert "org.kdlab.Kdlab1.Error.Internal" in errors


@pytest.mark.parametrize(
    ("interface", "method", "accepted"),
    [
        (MANAGER, "CreateVM", CREATE_OPTIONS),
        (MANAGER, "BuildImage", BUILD_OPTIONS),
        (MANAGER, "CreateImage", {}),
        (MANAGER, "ImportImage", {}),
        (VM, "Start", START_OPTIONS),
        (VM, "Stop", STOP_OPTIONS),
        (VM, "SaveCheckpoint", SAVE_CHECKPOINT_OPTIONS),
        (VM, "RestoreCheckpoint", RESTORE_CHECKPOINT_OPTIONS),
        (VM, "Record", wire.RECORD_OPTIONS),
        (VM, "Replay", wire.REPLAY_OPTIONS),
        (IMAGE, "Resize", {}),
    ],
)
def test_every_option_key_is_documented_with_its_type(
    interface: str, method: str, accepted: dict[str, str]
) -> None:
    assert contract.documented_options(interface, method) == accepted


def _assert_same_shape(live: contract.Shape, documented: contract.Shape) -> None:
    # Field by field, so that a failure shows the part that differs.
    assert live.methods == documented.methods
    assert live.properties == documented.properties
    assert live.signals == documented.signals


@pytest.mark.parametrize("interface", INTERFACES)
def test_live_introspection_matches_contract(
    client: BusClient, kdlabd: Lab, image_and_job: tuple[str, str], interface: str
) -> None:
    image, job = image_and_job
    command, agent = (
        running_command(client, kdlabd) if interface == PROCESS else ("", None)
    )
    path = {
        MANAGER: MANAGER_PATH,
        VM: VM_PATHS["idle"],
        IMAGE: image,
        JOB: job,
        DUMP: DUMP_PATHS["busy-20231114-224820"],
        RECORDING: wire.recording_path(RECORDINGS[0].id),
        PROCESS: command,
    }[interface]
    live = contract.interface_element(
        contract.parse(client.introspect(path)), interface
    )
    if agent is not None:
        agent.close()
    _assert_same_shape(
        contract.shape(live), contract.shape(contract.contract(interface))
    )


@pytest.mark.usefixtures("kdlabd")
def test_manager_is_an_object_manager(client: BusClient) -> None:
    tree = contract.parse(client.introspect(MANAGER_PATH))
    manager = contract.shape(contract.interface_element(tree, OBJECT_MANAGER))
    assert manager.methods == {"GetManagedObjects": (("out", "a{oa{sa{sv}}}", None),)}
    assert manager.signals == {
        "InterfacesAdded": ("o", "a{sa{sv}}"),
        "InterfacesRemoved": ("o", "as"),
    }
    children = {node.get("name") for node in tree.getroot().findall("node")}
    assert children == {"vm", "dump", "recording"}


@pytest.mark.usefixtures("kdlabd")
def test_managed_objects_are_every_vm_and_dump_with_every_property(
    client: BusClient,
) -> None:
    objects = client.managed_objects()
    # Foreign domains are not VMs; the dumps are those found in the pool.
    recordings = {wire.recording_path(r.id): r for r in RECORDINGS}
    assert set(objects) == set(VM_PATHS.values()) | set(DUMP_PATHS.values()) | set(
        recordings
    )
    expected = [(VM_PATHS[vm.name], VM, vm.properties()) for vm in FLEET]
    expected += [(DUMP_PATHS[d.id], DUMP, d.properties()) for d in DUMPS]
    expected += [(p, RECORDING, r.properties()) for p, r in recordings.items()]
    for path, interface, properties in expected:
        interfaces = objects[path]
        assert {i for i in interfaces if not i.startswith("org.freedesktop.DBus.")} == {
            interface
        }
        documented = set(contract.shape(contract.contract(interface)).properties)
        assert set(interfaces[interface]) == documented
        assert interfaces[interface] == properties


def test_managed_objects_follow_every_change(
    client: BusClient, ctl: Ctl, image_and_job: tuple[str, str]
) -> None:
    """kdlabd keeps the objects' part of GetManagedObjects (and ListVMs's
    answer) marshalled: each change, removal and addition must show in them
    as in the object's own properties."""
    image, job = image_and_job
    booted = VM_PATHS["booted"]
    assert client.current_objects()[booted][VM]["State"] == "stopped"

    def state_is(state: str) -> Callable[[], bool]:
        def check() -> bool:
            (value,) = client.ok(booted, PROPERTIES, "Get", "ss", [VM, "State"])
            return bool(value.value == state)

        return check

    assert ctl("start", "booted").returncode == 0
    client.wait_until(state_is("running"))
    assert client.current_objects()[booted][VM]["State"] == "running"
    assert ctl("stop", "--force", "booted").returncode == 0
    client.wait_until(state_is("stopped"))
    assert client.current_objects()[booted][VM]["State"] == "stopped"

    assert ctl("delete", "idle").returncode == 0
    assert VM_PATHS["idle"] not in client.current_objects()
    assert ctl("image", "delete", "base").returncode == 0
    assert image not in client.current_objects()
    # The same name again, at the same path, is another object.
    size = 1 << 20
    assert client.ok(
        MANAGER_PATH, MANAGER, "CreateImage", "sta{sv}", ["base", size, {}]
    ) == [image]
    assert client.current_objects()[image][IMAGE]["Capacity"] == size
    assert client.current_objects()[job][JOB]["State"] == "failed"


@pytest.mark.usefixtures("kdlabd")
def test_vm_paths_are_escaped_and_listed_by_name(client: BusClient) -> None:
    (paths,) = client.ok(MANAGER_PATH, MANAGER, "ListVMs")
    assert paths == [VM_PATHS[name] for name in sorted(VM_PATHS)]
    for name, path in VM_PATHS.items():
        assert client.vm_path(name) == path


@pytest.mark.usefixtures("kdlabd")
def test_manager_properties(client: BusClient) -> None:
    (props,) = client.ok(MANAGER_PATH, PROPERTIES, "GetAll", "s", [MANAGER])
    assert {key: variant.value for key, variant in props.items()} == {
        "APIRevision": API_REVISION,
        "Version": kdlabd.__version__,
        "Accel": "tcg",  # the test driver reports no KVM
    }


def test_fleet_covers_every_interesting_case() -> None:
    """The standard fleet exercises every state, stub kind and an escaped name."""
    assert {vm.state for vm in FLEET} == {"defined", "stopped", "running", "paused"}
    assert {vm.gdb_stub.split(":")[0] for vm in FLEET} == {"unix", "tcp", "off"}
    assert set(VM_PATHS) == {vm.name for vm in FLEET}
