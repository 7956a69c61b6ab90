"""Third-party clients (systemd's busctl, GLib's gdbus) against kdlabd.

These share no code with kdlabd: they see exactly what any desktop tool would.
Every error provoked here must arrive as its org.kdlab.Kdlab1.Error name,
documented for the method in the contract, and without Python traceback text.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from kdlab.errors import (
    HypervisorError,
    ImageExists,
    InvalidArgument,
    InvalidState,
    KdlabError,
    NoSuchImage,
    NoSuchVM,
)
from kdlab.wire import BUS_NAME, MANAGER_PATH
from tests.bus import contract
from tests.bus.conftest import Target
from tests.bus.contract import MANAGER, VM
from tests.support.bus import PrivateBus
from tests.support.clients import assert_no_traceback, gdbus_call, gdbus_error, run_tool
from tests.support.testdriver import VMS

pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]


def vm_path(name: str) -> str:
    return f"{MANAGER_PATH}/vm/{name}"


def busctl(bus: PrivateBus, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool(["busctl", f"--address={bus.address}", *args])


def busctl_json(bus: PrivateBus, *args: str) -> Any:
    result = busctl(bus, "--json=short", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def gdbus(
    bus: PrivateBus, path: str, method: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return gdbus_call(bus.address, path, method, *args)


def busctl_rows(
    bus: PrivateBus, path: str, interface: str
) -> set[tuple[str, str, str, str]]:
    """busctl's introspection table: (member, kind, signature, result) rows."""
    result = busctl(bus, "introspect", BUS_NAME, path, interface)
    assert result.returncode == 0, result.stderr
    rows = set()
    for line in result.stdout.splitlines()[1:]:
        name, kind, signature, value = line.split()[:4]
        if kind != "interface":
            rows.add((name, kind, signature, value if kind != "property" else "-"))
    return rows


def contract_rows(interface: str) -> set[tuple[str, str, str, str]]:
    """The rows busctl shows for the contract's *interface*."""
    shape = contract.shape(contract.contract(interface))

    def joined(types: list[str]) -> str:
        return "".join(types) or "-"

    rows = {
        (f".{name}", "method", joined([t for d, t, _ in args if d == "in"]),
         joined([t for d, t, _ in args if d == "out"]))
        for name, args in shape.methods.items()
    }  # fmt: skip
    rows |= {
        (f".{name}", "property", t, "-")
        for name, (t, _access) in shape.properties.items()
    }
    rows |= {
        (f".{name}", "signal", joined(list(types)), "-")
        for name, types in shape.signals.items()
    }
    return rows


@pytest.mark.parametrize(
    ("interface", "path"), [(MANAGER, MANAGER_PATH), (VM, vm_path("busy"))]
)
def test_busctl_introspect_shows_the_contract(
    bus: PrivateBus, interface: str, path: str
) -> None:
    assert busctl_rows(bus, path, interface) == contract_rows(interface)


def test_busctl_tree_shows_every_vm(bus: PrivateBus) -> None:
    result = busctl(bus, "tree", "--list", BUS_NAME)
    assert result.returncode == 0, result.stderr
    paths = set(result.stdout.split())
    assert {vm_path("idle"), vm_path("linux_2d6_2e9_2drc1")} <= paths
    assert {p for p in paths if p.startswith(f"{MANAGER_PATH}/vm/")} == {
        vm_path(name)
        for name in ("booted", "busy", "frozen", "idle", "linux_2d6_2e9_2drc1")
    }


def test_busctl_call_list_vms(bus: PrivateBus) -> None:
    reply = busctl_json(bus, "call", BUS_NAME, MANAGER_PATH, MANAGER, "ListVMs")
    assert reply["type"] == "ao"
    assert len(reply["data"][0]) == len(VMS)


@pytest.mark.parametrize("name", ["busy", "frozen", "idle", "booted"])
def test_busctl_get_property_state(bus: PrivateBus, name: str) -> None:
    reply = busctl_json(bus, "get-property", BUS_NAME, vm_path(name), VM, "State")
    assert reply == {"type": "s", "data": VMS[name].state}


def test_gdbus_get_vm(bus: PrivateBus) -> None:
    result = gdbus(bus, MANAGER_PATH, f"{MANAGER}.GetVM", "linux-6.9-rc1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"(objectpath '{vm_path('linux_2d6_2e9_2drc1')}',)"


def test_gdbus_start_and_busctl_sees_it(bus: PrivateBus) -> None:
    result = gdbus(bus, vm_path("idle"), f"{VM}.Start", "{}")
    assert (result.returncode, result.stdout.strip()) == (0, "()"), result.stderr
    reply = busctl_json(bus, "get-property", BUS_NAME, vm_path("idle"), VM, "State")
    assert reply["data"] == "running"


@pytest.mark.parametrize(
    ("on", "call", "expected"),
    [
        ("manager", ("GetVM", "nope"), NoSuchVM),
        ("manager", ("CreateVM", "bad name!", "{}"), InvalidArgument),
        ("manager", ("CreateVM", "new", "{}"), InvalidArgument),  # no kernel
        # A path is not a descriptor: kdlabd never opens files for callers.
        (
            "manager",
            ("CreateVM", "new", "{'kernel': <'/etc/shadow'>}"),
            InvalidArgument,
        ),
        # gdbus makes a bare number an int32; memory_mib is a uint32.
        ("manager", ("CreateVM", "new", "{'memory_mib': <512>}"), InvalidArgument),
        ("manager", ("GetImage", "nope"), NoSuchImage),
        ("manager", ("CreateImage", "base", "1048576", "{}"), ImageExists),
        ("manager", ("CreateImage", "tiny", "4096", "{}"), InvalidArgument),
        # Refused before any build could start (and this kdlabd has no builder).
        ("manager", ("BuildImage", "bad name!", "{}"), InvalidArgument),
        ("busy", ("Start", "{}"), InvalidState),
        ("idle", ("Start", "{'bogus': <true>}"), InvalidArgument),
        ("idle", ("Start", "{'paused': <true>}"), HypervisorError),  # test driver
        ("idle", ("Stop", "{}"), InvalidState),
        ("busy", ("Stop", "{'force': <'yes'>}"), InvalidArgument),
        ("busy", ("Delete",), InvalidState),
        ("idle", ("OpenConsoleLog",), InvalidState),
        ("idle", ("OpenGdb",), InvalidState),  # not running
        ("frozen", ("OpenGdb",), InvalidState),  # no gdbstub
        ("busy", ("OpenGdb",), HypervisorError),  # no QEMU, so no stub to reach
        ("idle", ("OpenConsole",), InvalidState),
        ("busy", ("OpenConsole",), HypervisorError),  # test driver: no consoles
        ("image", ("Resize", "1048576", "{}"), InvalidArgument),  # smaller
    ],
    ids=lambda value: "-".join(value[:2]) if isinstance(value, tuple) else None,
)
def test_gdbus_error_reply(
    bus: PrivateBus,
    target: Target,
    on: str,
    call: tuple[str, ...],
    expected: type[KdlabError],
) -> None:
    interface, path = target(on)
    method, *args = call
    error = gdbus_error(gdbus(bus, path, f"{interface}.{method}", *args))
    contract.assert_error_reply(error, expected, interface, method)


def test_busctl_error_reply_has_no_traceback(bus: PrivateBus) -> None:
    result = busctl(bus, "call", BUS_NAME, vm_path("busy"), VM, "Delete")
    assert result.returncode != 0
    assert "stop it first" in result.stderr
    assert_no_traceback(result.stderr)
