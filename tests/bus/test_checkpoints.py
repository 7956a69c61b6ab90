"""Checkpoints on the bus: SaveCheckpoint, RestoreCheckpoint, DeleteCheckpoint,
Start's checkpoint option and the Checkpoints property, on libvirt's test
driver (which keeps snapshots, but runs no QEMU and plugs in no disks: the vm
tier shows the state itself coming back)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Variant

from kdlab.errors import (
    CheckpointMismatch,
    HypervisorError,
    InvalidState,
    NoSuchCheckpoint,
)
from kdlab.wire import JOB_INTERFACE, VM_INTERFACE
from tests.bus import contract
from tests.bus.conftest import Ctl
from tests.support.bus import PROPERTIES, BusClient, PrivateBus
from tests.support.testdriver import FLEET, FakeVM, Lab

pytestmark = pytest.mark.bus

# A running VM with a disk: the test driver cannot plug a state disk in.
SAVED = FakeVM("saved", "running", 1000, "", "console=ttyS0 nokaslr", disk=True)


@pytest.fixture
def lab(bus: PrivateBus, workdir: Path) -> Iterator[Lab]:
    lab = Lab(bus, workdir, (*FLEET, SAVED))
    lab.populate()
    # The staged kernel a real create would have uploaded: what it is is part
    # of each checkpoint.
    for vm in lab.vms:
        (lab.layout.state_dir / "boot" / f"{vm.name}.kernel").write_bytes(b"bzImage 1")
    lab.start()
    yield lab
    lab.stop_cleanly()


def job_end(client: BusClient, job: str) -> dict[str, Any]:
    def ended() -> bool:
        (state,) = client.ok(job, PROPERTIES, "Get", "ss", [JOB_INTERFACE, "State"])
        return bool(state.value != "running")

    client.wait_until(ended, timeout=30)
    (props,) = client.ok(job, PROPERTIES, "GetAll", "s", [JOB_INTERFACE])
    return {key: variant.value for key, variant in props.items()}


def call(client: BusClient, vm: str, member: str, *args: Any) -> list[Any]:
    signature = {"SaveCheckpoint": "sa{sv}", "RestoreCheckpoint": "sa{sv}"}
    sig = signature.get(member, "s" if args else "")
    return client.ok(client.vm_path(vm), VM_INTERFACE, member, sig, list(args))


def error(client: BusClient, vm: str, member: str, sig: str, *args: Any) -> Any:
    return client.error(client.vm_path(vm), VM_INTERFACE, member, sig, list(args))


def tags(client: BusClient, vm: str) -> list[str]:
    return [c[0] for c in client.vm_properties(vm)["Checkpoints"]]


@pytest.mark.usefixtures("lab")
def test_save_restore_delete_and_the_property_follows(client: BusClient) -> None:
    path = client.vm_path("saved")
    client.add_match(type="signal", path=path, member="PropertiesChanged")
    (job,) = call(client, "saved", "SaveCheckpoint", "ready", {})
    end = job_end(client, job)
    assert end["State"] == "succeeded", end
    assert end["Kind"] == "checkpoint-save"
    client.wait_for_signal(
        lambda m: m.member == "PropertiesChanged" and "Checkpoints" in m.body[1]
    )
    ((tag, created, memory, boot, kernel),) = client.vm_properties("saved")[
        "Checkpoints"
    ]
    assert (tag, memory) == ("ready", 256 << 20)
    assert created > 1_700_000_000_000_000
    assert boot == client.vm_properties("saved")["Booted"]
    assert len(kernel) == 64

    (job,) = call(client, "saved", "RestoreCheckpoint", "ready", {})
    assert job_end(client, job)["State"] == "succeeded"
    assert client.vm_properties("saved")["State"] == "running"
    paused = {"paused": Variant("b", True)}
    (job,) = call(client, "saved", "RestoreCheckpoint", "ready", paused)
    assert job_end(client, job)["State"] == "succeeded"
    client.wait_until(lambda: client.vm_properties("saved")["State"] == "paused")

    call(client, "saved", "DeleteCheckpoint", "ready")
    client.wait_until(lambda: tags(client, "saved") == [])


def test_refusals_are_named_errors_and_change_nothing(
    lab: Lab, client: BusClient
) -> None:
    restore = ("RestoreCheckpoint", "sa{sv}", "nope", {})
    err = error(client, "saved", *restore)
    contract.assert_error_reply(err, NoSuchCheckpoint, VM_INTERFACE, restore[0])
    err = error(client, "idle", "SaveCheckpoint", "sa{sv}", "ready", {})
    contract.assert_error_reply(err, InvalidState, VM_INTERFACE, "SaveCheckpoint")
    err = error(client, "saved", "DeleteCheckpoint", "s", "nope")
    contract.assert_error_reply(err, NoSuchCheckpoint, VM_INTERFACE, "DeleteCheckpoint")

    (job,) = call(client, "saved", "SaveCheckpoint", "ready", {})
    assert job_end(client, job)["State"] == "succeeded"
    # The kernel staged for the VM is not the one the checkpoint was taken with.
    (lab.layout.state_dir / "boot" / "saved.kernel").write_bytes(b"bzImage 2")
    err = error(client, "saved", "RestoreCheckpoint", "sa{sv}", "ready", {})
    contract.assert_error_reply(
        err, CheckpointMismatch, VM_INTERFACE, "RestoreCheckpoint"
    )
    assert "kernel was rebuilt" in err[1]


@pytest.mark.usefixtures("lab")
def test_a_failed_save_leaves_no_checkpoint_and_no_disk(client: BusClient) -> None:
    """The test driver cannot plug the state disk into the diskless VM "busy"."""
    before = client.vm_properties("busy")
    (job,) = call(client, "busy", "SaveCheckpoint", "ready", {})
    end = job_end(client, job)
    assert end["State"] == "failed"
    assert end["Error"] == HypervisorError.dbus_name()
    assert client.vm_properties("busy") == before


@pytest.mark.usefixtures("lab")
def test_start_into_a_checkpoint_and_delete_the_vm_with_it(
    client: BusClient, ctl: Ctl
) -> None:
    (job,) = call(client, "saved", "SaveCheckpoint", "ready", {})
    assert job_end(client, job)["State"] == "succeeded"
    assert ctl("stop", "--force", "saved").returncode == 0
    err = error(client, "saved", "RestoreCheckpoint", "sa{sv}", "ready", {})
    assert "--from ready" in err[1]
    result = ctl("start", "saved", "--from", "ready")
    assert result.returncode == 0, result.stderr
    assert client.vm_properties("saved")["State"] == "running"
    listed = ctl("checkpoint", "list", "saved", "--json")
    assert [c["tag"] for c in json.loads(listed.stdout)] == ["ready"]
    result = ctl("delete", "--force", "saved")
    assert result.returncode == 0, result.stderr
    assert "saved" not in client.vm_names()


@pytest.mark.usefixtures("lab")
def test_kdlabctl_checkpoint_commands(client: BusClient, ctl: Ctl) -> None:
    result = ctl("checkpoint", "save", "saved", "ready")
    assert result.returncode == 0, result.stderr
    assert "saved checkpoint ready" in result.stdout
    result = ctl("checkpoint", "restore", "saved", "ready", "--paused")
    assert result.returncode == 0, result.stderr
    assert client.vm_properties("saved")["State"] == "paused"
    assert "Checkpoints: ready" in ctl("show", "saved").stdout
    result = ctl("checkpoint", "list", "saved")
    assert result.stdout.splitlines()[0].split() == [
        "TAG",
        "CREATED",
        "MEMORY",
        "BOOTED",
    ]
    assert "256M" in result.stdout
    result = ctl("checkpoint", "restore", "saved", "nope")
    assert result.returncode == NoSuchCheckpoint.exit_code
    assert "no checkpoint 'nope'" in result.stderr
    assert ctl("checkpoint", "delete", "saved", "ready").returncode == 0
    assert tags(client, "saved") == []
