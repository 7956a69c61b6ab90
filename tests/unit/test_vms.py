"""kdlabd.core.vms.VMService against the in-memory fake hypervisor.

Each test runs its own event loop with ``asyncio.run`` (no pytest plugin).
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kdlab.errors import (
    HypervisorError,
    InvalidArgument,
    InvalidState,
    NoSuchVM,
    VMExists,
)
from kdlab.kernel.diagnosis import BootFacts, diagnose
from kdlab.states import StopCause, VMState
from kdlabd.core.limits import Limits
from kdlabd.core.models import Accel, DebugSettings, VMRecord
from kdlabd.core.vms import (
    Boot,
    BootClock,
    CreateRequest,
    Layout,
    VMEntry,
    VMService,
    client_view,
)
from kdlabd.host.local import LocalHost
from tests.unit.fake_hypervisor import POOL, FakeHypervisor
from tests.unit.test_domain_xml import make_spec

T = TypeVar("T")

OWNER = 1000


def run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


async def settle() -> None:
    """Let announced events and the background refreshes they start finish.

    Some steps hop to a worker thread (a caller's descriptor is read there):
    the loop also waits a little in real time, not only a few turns.
    """
    for _ in range(10):
        for _ in range(20):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)


@dataclass
class Recorder:
    """A VMObserver that remembers what it was told."""

    events: list[tuple[str, str, str | None]] = field(default_factory=list)

    def vm_added(self, record: VMRecord) -> None:
        self.events.append(("added", record.name, record.state.value))

    def vm_changed(self, record: VMRecord) -> None:
        self.events.append(("changed", record.name, record.state.value))

    def vm_removed(self, name: str) -> None:
        self.events.append(("removed", name, None))

    def states(self, name: str) -> list[str]:
        return [
            state for _, vm, state in self.events if vm == name and state is not None
        ]


def bzimage(size: int = 8192, release: bytes = b"") -> bytes:
    """A bzImage header; with *release*, the version string its 0x20e points at."""
    data = bytearray(size)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    data[0x206:0x208] = struct.pack("<H", 0x020F)
    data[0x400:0x410] = b"kernel text here"
    if release:
        data[0x20E:0x210] = struct.pack("<H", 0x500 - 0x200)
        version = release + b" (kdlab@test) #1\0"
        data[0x500 : 0x500 + len(version)] = version
    return bytes(data)


@dataclass
class Lab:
    """A VMService wired to a fake hypervisor, a recorder and temporary directories."""

    tmp: Path
    hv: FakeHypervisor
    observer: Recorder
    layout: Layout
    service: VMService
    kernel: Path
    initrd: Path

    async def create(
        self,
        name: str = "vm1",
        *,
        kernel: Path | None = None,
        initrd: Path | None = None,
        no_kernel: bool = False,
        **options: Any,
    ) -> VMRecord:
        """Create *name* the way the bus layer does: with descriptors it then closes."""
        fds = []
        try:
            kernel_fd = None
            if not no_kernel:
                kernel_fd = os.open(kernel or self.kernel, os.O_RDONLY)
                fds.append(kernel_fd)
            initrd_fd = None
            if initrd is not None:
                initrd_fd = os.open(initrd, os.O_RDONLY)
                fds.append(initrd_fd)
            return await self.service.create(
                CreateRequest(
                    name=name,
                    owner_uid=options.pop("owner_uid", OWNER),
                    kernel_fd=kernel_fd,
                    initrd_fd=initrd_fd,
                    **options,
                )
            )
        finally:
            for fd in fds:
                os.close(fd)

    async def booted(self, name: str = "vm1") -> VMRecord:
        await self.create(name)
        return await self.service.start(name)


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path, FakeHypervisor(), LocalHost())


def new_lab(
    tmp_path: Path, hv: FakeHypervisor, host: LocalHost, limits: Limits | None = None
) -> Lab:
    """A VMService on *hv* and *host*, observed, with a kernel and an initrd."""
    observer = Recorder()
    layout = Layout(tmp_path / "state", tmp_path / "run")
    service = VMService(hv, layout, Accel.TCG, host=host, limits=limits)
    service.subscribe(observer)
    hv.watch(service.domain_changed, service.hypervisor_reconnected)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage())
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701" + bytes(500))
    return Lab(tmp_path, hv, observer, layout, service, kernel, initrd)


# What clients see: a function of the VM's entry.

S = VMState


@pytest.mark.parametrize(
    ("reported", "transition", "booted", "shown"),
    [
        (S.STOPPED, None, False, S.DEFINED),
        (S.STOPPED, None, True, S.STOPPED),
        (S.STOPPED, S.STARTING, False, S.STARTING),
        (S.RUNNING, S.STARTING, True, S.RUNNING),
        (S.PAUSED, S.STARTING, True, S.PAUSED),
        (S.RUNNING, S.STOPPING, True, S.STOPPING),
        (S.PAUSED, S.STOPPING, True, S.STOPPING),
        (S.STOPPED, S.STOPPING, True, S.STOPPED),
        (S.CRASHED, None, True, S.CRASHED),
    ],
)
def test_the_state_clients_see(
    reported: VMState, transition: VMState | None, booted: bool, shown: VMState
) -> None:
    spec = make_spec()
    entry = VMEntry("vm1", VMRecord(spec, "u", reported), transition=transition)
    entry.booted = booted
    assert client_view(entry) == VMRecord(spec, "u", shown)


@pytest.mark.parametrize(
    ("reported", "waiting"), [(S.PAUSED, True), (S.RUNNING, False), (S.STOPPED, False)]
)
def test_a_vm_started_paused_waits_for_a_debugger_while_paused(
    reported: VMState, waiting: bool
) -> None:
    boot = Boot(BootClock(started_paused=True), waiting_for_debugger=True)
    entry = VMEntry("vm1", VMRecord(make_spec(), "u", reported), boot=boot)
    assert client_view(entry).waiting_for_debugger is waiting
    boot.waiting_for_debugger = False
    assert not client_view(entry).waiting_for_debugger


def test_the_diagnosis_clients_see_is_the_boots() -> None:
    silent = BootFacts("console=ttyS0", ("vda",), False, True, 60.0, running=True)
    found = diagnose("", silent)
    assert found is not None
    entry = VMEntry("vm1", VMRecord(make_spec(), "u", S.STOPPED), booted=True)
    assert client_view(entry).diagnosis is None
    entry.boot = Boot(BootClock(started_paused=False), diagnosis=found)
    assert client_view(entry).diagnosis == found


# Create.


def test_create_stores_spec(lab: Lab) -> None:
    async def scenario() -> None:
        record = await lab.create(
            "linux-6.9-rc1",
            initrd=lab.initrd,
            owner_uid=4242,
            cmdline="root=/dev/vda rw",
            memory_mib=1024,
            vcpus=2,
            debug=DebugSettings(gdb_tcp_port=2345),
        )
        spec = record.spec
        assert spec.name == "linux-6.9-rc1"
        assert spec.owner_uid == 4242
        assert spec.cmdline == "root=/dev/vda rw"
        assert (spec.memory_mib, spec.vcpus) == (1024, 2)
        assert spec.accel is Accel.TCG
        assert spec.debug == DebugSettings(gdb=True, gdb_tcp_port=2345)
        assert spec.kernel == POOL / "linux-6.9-rc1.kernel"
        assert spec.initrd == POOL / "linux-6.9-rc1.initrd"
        assert spec.console_log == lab.layout.console_log("linux-6.9-rc1")
        assert spec.gdb_socket == lab.layout.gdb_socket("linux-6.9-rc1")
        assert spec.created_usec > 0
        # What the hypervisor got is what the files held.
        assert lab.hv.volumes == {
            "linux-6.9-rc1.kernel": lab.kernel.read_bytes(),
            "linux-6.9-rc1.initrd": lab.initrd.read_bytes(),
        }
        assert lab.hv.domains["linux-6.9-rc1"].spec == spec
        shown = lab.service.get("linux-6.9-rc1")
        assert (shown.spec, shown.uuid) == (spec, record.uuid)
        assert shown.state is VMState.DEFINED
        assert lab.service.list() == [shown]
        vm_dir = lab.layout.vm_dir("linux-6.9-rc1")
        assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700
        await settle()
        assert lab.observer.events == [("added", "linux-6.9-rc1", "defined")]

    run(scenario())


def test_create_returns_what_observers_see(lab: Lab) -> None:
    async def scenario() -> None:
        record = await lab.create()
        assert record == lab.service.get("vm1")
        assert record.state is VMState.DEFINED

    run(scenario())


def test_create_defaults(lab: Lab) -> None:
    async def scenario() -> None:
        spec = (await lab.create()).spec
        assert (spec.memory_mib, spec.vcpus, spec.cmdline) == (512, 1, "")
        assert spec.initrd is None
        assert spec.debug == DebugSettings(gdb=True, gdb_tcp_port=None)

    run(scenario())


def test_accel_is_the_services(lab: Lab) -> None:
    service = VMService(lab.hv, lab.layout, Accel.KVM, host=LocalHost())
    fd = os.open(lab.kernel, os.O_RDONLY)
    try:
        record = run(service.create(CreateRequest("kvm1", OWNER, fd)))
    finally:
        os.close(fd)
    assert record.spec.accel is Accel.KVM


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("bad-name", "invalid VM name"),
        ("no-kernel", "a kernel is required"),
        ("elf-kernel", "vmlinux"),
        ("garbage-kernel", "not an x86 bzImage"),
        ("empty-kernel", "kernel is empty"),
        ("directory-kernel", "regular file"),
        ("empty-initrd", "initrd is empty"),
        ("newline-cmdline", "printable ASCII"),
        ("memory", "memory"),
        ("vcpus", "vCPUs"),
        ("privileged-port", "gdb TCP port"),
        ("release-dotdot", "announces the release"),
        ("release-slash", "announces the release"),
    ],
)
def test_create_refuses_bad_input_before_any_change(
    lab: Lab, case: str, match: str
) -> None:
    elf = _write(lab.tmp / "vmlinux", b"\x7fELF\x02\x01\x01" + bytes(2000))
    dotdot = _write(lab.tmp / "dotdot", bzimage(release=b"../../../tmp/x"))
    slash = _write(lab.tmp / "slash", bzimage(release=b"6.1/x"))
    garbage = _write(lab.tmp / "garbage", os.urandom(64) + bytes(2000))
    empty = _write(lab.tmp / "empty", b"")
    arguments: dict[str, dict[str, Any]] = {
        "bad-name": {"name": "-rf"},
        "no-kernel": {"no_kernel": True},
        "elf-kernel": {"kernel": elf},
        "garbage-kernel": {"kernel": garbage},
        "empty-kernel": {"kernel": empty},
        "directory-kernel": {"kernel": lab.tmp},
        "empty-initrd": {"initrd": empty},
        "newline-cmdline": {"cmdline": "root=/dev/vda\ninit=/bin/sh"},
        "memory": {"memory_mib": 1},
        "vcpus": {"vcpus": 0},
        "privileged-port": {"debug": DebugSettings(gdb_tcp_port=22)},
        "release-dotdot": {"kernel": dotdot},
        "release-slash": {"kernel": slash},
    }

    async def scenario() -> None:
        kwargs = arguments[case]
        name = kwargs.pop("name", "vm1")
        with pytest.raises(InvalidArgument, match=match):
            await lab.create(name, **kwargs)
        await settle()

    run(scenario())
    assert lab.hv.calls == [], "nothing may reach the hypervisor"
    assert not lab.layout.state_dir.exists()
    assert lab.observer.events == []
    assert lab.service.list() == []


@pytest.mark.parametrize("step", ["define_vm", "upload_boot_file:vm1.initrd"])
def test_create_failure_rolls_back(lab: Lab, step: str) -> None:
    lab.hv.fail(step)

    async def scenario() -> None:
        with pytest.raises(HypervisorError, match="injected failure"):
            await lab.create(initrd=lab.initrd)
        await settle()
        assert lab.hv.volumes == {}
        assert not lab.layout.vm_dir("vm1").exists()
        assert lab.hv.domains == {}
        assert lab.observer.events == []
        with pytest.raises(NoSuchVM):
            lab.service.get("vm1")

        lab.hv.failures.clear()
        record = await lab.create(initrd=lab.initrd)
        assert record.name == "vm1"
        assert set(lab.hv.volumes) == {"vm1.kernel", "vm1.initrd"}
        assert lab.service.get("vm1").state is VMState.DEFINED
        await settle()
        assert lab.observer.events == [("added", "vm1", "defined")]

    run(scenario())
    # Every volume uploaded before the failure, and only those, was deleted.
    if step == "define_vm":
        assert lab.hv.called("delete_vm_volume") == ["vm1.initrd", "vm1.kernel"]
    else:
        assert lab.hv.called("delete_vm_volume") == ["vm1.kernel"]
        assert lab.hv.called("define_vm") == ["vm1"], "define only on the second try"


def test_create_failing_rollback_keeps_the_original_error(lab: Lab) -> None:
    lab.hv.fail("define_vm", HypervisorError("libvirt: the original problem"))
    lab.hv.fail("delete_vm_volume", HypervisorError("libvirt: pool is gone"))

    async def scenario() -> None:
        with pytest.raises(HypervisorError, match="the original problem"):
            await lab.create()

    run(scenario())
    assert lab.hv.called("delete_vm_volume") == ["vm1.kernel"]
    assert not lab.layout.vm_dir("vm1").exists()


def test_create_duplicate_name(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create()
        first = lab.service.get("vm1")
        lab.hv.calls.clear()
        with pytest.raises(VMExists, match="'vm1' already exists"):
            await lab.create()
        assert lab.service.list() == [first]

    run(scenario())
    assert lab.hv.called("upload_boot_file") == []
    assert lab.hv.called("define_vm") == []


def test_create_name_taken_in_the_hypervisor_only(lab: Lab) -> None:
    """A domain the view has not loaded yet still owns its name."""

    async def scenario() -> None:
        await lab.create("other")
        lab.hv.add_domain(lab.hv.domains["other"].spec.replace(name="vm1"))
        lab.hv.calls.clear()
        with pytest.raises(VMExists):
            await lab.create("vm1")

    run(scenario())
    assert lab.hv.called("upload_boot_file") == []


def test_concurrent_creates_of_one_name(lab: Lab) -> None:
    async def scenario() -> list[VMRecord | BaseException]:
        return await asyncio.gather(
            *(lab.create() for _ in range(32)), return_exceptions=True
        )

    results = run(scenario())
    successes = [r for r in results if isinstance(r, VMRecord)]
    failures = [r for r in results if not isinstance(r, VMRecord)]
    assert len(successes) == 1
    assert len(failures) == 31
    assert all(isinstance(f, VMExists) for f in failures), failures
    assert lab.hv.called("upload_boot_file") == ["vm1.kernel"]
    assert lab.hv.called("define_vm") == ["vm1"]
    assert [e for e in lab.observer.events if e[0] == "added"] == [
        ("added", "vm1", "defined")
    ]


def test_concurrent_creates_of_different_names(lab: Lab) -> None:
    names = [f"vm{i}" for i in range(16)]

    async def scenario() -> None:
        await asyncio.gather(*(lab.create(name) for name in names))

    run(scenario())
    assert [r.name for r in lab.service.list()] == sorted(names)


# Start and stop.


def test_state_defined_before_first_boot_then_stopped(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create()
        assert lab.service.get("vm1").state is VMState.DEFINED
        await settle()
        assert lab.service.get("vm1").state is VMState.DEFINED
        running = await lab.service.start("vm1")
        assert running.state is VMState.RUNNING
        assert lab.layout.console_log("vm1").exists()
        stopped = await lab.service.stop("vm1", force=True)
        assert stopped.state is VMState.STOPPED
        await settle()
        assert lab.service.get("vm1").state is VMState.STOPPED

    run(scenario())


def test_start_paused(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create()
        assert (await lab.service.start("vm1", paused=True)).state is VMState.PAUSED

    run(scenario())


def test_start_refuses_a_new_kernel_announcing_an_unsafe_release(lab: Lab) -> None:
    """A rebuilt tree's kernel must pass the same check as at create."""
    unsafe = _write(lab.tmp / "unsafe", bzimage(release=b"6.1.0-x/../../../etc"))

    async def scenario() -> None:
        await lab.create()
        await settle()  # the refreshes the create's events started
        lab.hv.calls.clear()
        fd = os.open(unsafe, os.O_RDONLY)
        try:
            with pytest.raises(InvalidArgument, match="announces the release"):
                await lab.service.start("vm1", kernel_fd=fd)
        finally:
            os.close(fd)

    run(scenario())
    assert lab.hv.calls == [], "nothing uploaded, nothing started"
    assert lab.service.get("vm1").spec.release == ""


def test_create_keeps_a_safe_release(lab: Lab) -> None:
    kernel = _write(lab.tmp / "released", bzimage(release=b"6.9.0-rc1+"))
    record = run(lab.create(kernel=kernel))
    assert record.spec.release == "6.9.0-rc1+"


def test_start_shows_starting_while_it_runs(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create()
        release = lab.hv.hold("start_vm")
        task = asyncio.create_task(lab.service.start("vm1"))
        await settle()
        assert lab.hv.called("start_vm") == ["vm1"]
        assert lab.service.get("vm1").state is VMState.STARTING
        assert lab.observer.events[-1] == ("changed", "vm1", "starting")
        release.set()
        assert (await task).state is VMState.RUNNING
        await settle()

    run(scenario())
    assert lab.observer.states("vm1") == ["defined", "starting", "running"]


def test_start_running_vm_is_invalid_state(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        with pytest.raises(InvalidState, match="already running"):
            await lab.service.start("vm1")

    run(scenario())
    assert lab.hv.called("start_vm") == ["vm1"]


def test_start_keeps_previous_console_log(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        log = lab.layout.console_log("vm1")
        log.write_bytes(b"first boot\n")
        await lab.service.stop("vm1", force=True)
        await lab.service.start("vm1")
        assert log.with_name("console.log.1").read_bytes() == b"first boot\n"
        assert log.read_bytes() != b"first boot\n"

    run(scenario())


def test_failed_start_does_not_stay_starting(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create()
        await settle()  # the define event is long handled when a user starts a VM
        lab.hv.fail("start_vm")
        with pytest.raises(HypervisorError):
            await lab.service.start("vm1")
        await settle()
        assert lab.service.get("vm1").state is VMState.DEFINED
        assert lab.observer.states("vm1")[-1] == "defined"

    run(scenario())


def test_stop_graceful(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        stopped = await lab.service.stop("vm1", timeout=5)
        assert stopped.state is VMState.STOPPED
        await settle()

    run(scenario())
    assert lab.hv.called("shutdown_vm") == ["vm1"]
    assert lab.hv.called("destroy_vm") == []
    assert lab.observer.states("vm1")[-3:] == ["running", "stopping", "stopped"]


def test_stop_shows_stopping_while_it_runs(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        lab.hv.guest_powers_off = False
        task = asyncio.create_task(lab.service.stop("vm1", timeout=30))
        await settle()
        assert lab.service.get("vm1").state is VMState.STOPPING
        assert lab.observer.events[-1] == ("changed", "vm1", "stopping")
        lab.hv.set_state("vm1", VMState.STOPPED)  # the guest powers off after all
        assert (await task).state is VMState.STOPPED

    run(scenario())
    assert lab.hv.called("destroy_vm") == []


def test_stop_falls_back_to_destroy_after_timeout(lab: Lab) -> None:
    lab.hv.guest_powers_off = False

    async def scenario() -> float:
        await lab.booted()
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopped = await lab.service.stop("vm1", timeout=0.05)
        assert stopped.state is VMState.STOPPED
        return loop.time() - began

    elapsed = run(scenario())
    assert lab.hv.called("shutdown_vm") == ["vm1"]
    assert lab.hv.called("destroy_vm") == ["vm1"]
    assert elapsed >= 0.05, "destroyed before the guest's time was up"
    shutdown_at = [c.method for c in lab.hv.calls].index("shutdown_vm")
    destroy_at = [c.method for c in lab.hv.calls].index("destroy_vm")
    assert shutdown_at < destroy_at


def test_stop_force_destroys_at_once(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        assert (await lab.service.stop("vm1", force=True)).state is VMState.STOPPED

    run(scenario())
    assert lab.hv.called("shutdown_vm") == []
    assert lab.hv.called("destroy_vm") == ["vm1"]


def test_stop_with_zero_timeout_stops(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        assert (await lab.service.stop("vm1", timeout=0)).state is VMState.STOPPED

    run(scenario())


def test_failed_stop_does_not_stay_stopping(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        await settle()
        lab.hv.fail("shutdown_vm")
        with pytest.raises(HypervisorError):
            await lab.service.stop("vm1")
        await settle()
        assert lab.service.get("vm1").state is VMState.RUNNING

    run(scenario())


@pytest.mark.parametrize("state", [None, "stopped"])
def test_stop_inactive_vm_is_invalid_state(lab: Lab, state: str | None) -> None:
    async def scenario() -> None:
        if state is None:
            await lab.create()
        else:
            await lab.booted()
            await lab.service.stop("vm1", force=True)
        lab.hv.calls.clear()
        with pytest.raises(InvalidState, match="not running"):
            await lab.service.stop("vm1")

    run(scenario())
    assert lab.hv.called("shutdown_vm") == lab.hv.called("destroy_vm") == []


def test_guest_powering_itself_off_is_seen(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        lab.hv.set_state("vm1", VMState.STOPPED)
        await settle()
        assert lab.service.get("vm1").state is VMState.STOPPED

    run(scenario())
    assert lab.observer.events[-1] == ("changed", "vm1", "stopped")


# Delete.


def test_delete_running_vm_is_invalid_state(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        with pytest.raises(InvalidState, match="stop it first"):
            await lab.service.delete("vm1")
        await settle()

    run(scenario())
    assert lab.hv.called("undefine_vm") == []
    assert lab.hv.called("delete_vm_volume") == []
    assert set(lab.hv.volumes) == {"vm1.kernel"}
    assert "vm1" in lab.hv.domains
    assert lab.layout.console_log("vm1").exists()
    assert lab.service.get("vm1").state is VMState.RUNNING
    assert all(kind != "removed" for kind, _, _ in lab.observer.events)


def test_delete_removes_everything(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create(initrd=lab.initrd)
        await lab.service.start("vm1")
        await lab.service.stop("vm1", force=True)
        await lab.service.delete("vm1")
        await settle()
        with pytest.raises(NoSuchVM):
            lab.service.get("vm1")
        assert lab.service.list() == []
        # The name is free again, and the new VM has not been booted.
        await lab.create()
        assert lab.service.get("vm1").state is VMState.DEFINED

    run(scenario())
    assert lab.hv.called("undefine_vm") == ["vm1"]
    assert sorted(lab.hv.called("delete_vm_volume")) == ["vm1.initrd", "vm1.kernel"]
    assert ("removed", "vm1", None) in lab.observer.events
    assert lab.observer.events.count(("removed", "vm1", None)) == 1


def test_delete_removes_files(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create(initrd=lab.initrd)
        await lab.service.delete("vm1")

    run(scenario())
    assert lab.hv.volumes == {}
    assert lab.hv.domains == {}
    assert not lab.layout.vm_dir("vm1").exists()


def leftovers(service: VMService) -> dict[str, object]:
    """Every collection of the service, its console hub and its background
    tasks that still holds something (its subscribers aside)."""
    found: dict[str, object] = {}
    for part in (service, service._consoles, service._background):
        for key, value in vars(part).items():
            if isinstance(value, dict | set | list) and value and key != "_observers":
                found[f"{type(part).__name__}.{key}"] = value
    return found


def test_a_deleted_vm_leaves_nothing_behind(lab: Lab) -> None:
    """Whatever a VM went through (boots, a graceful and a forced stop, a start
    paused, a console viewer, a failed start, a refused duplicate), deleting it
    leaves no trace in the service: nothing grows with VMs that are gone."""

    async def scenario() -> None:
        for _ in range(2):
            await lab.create(initrd=lab.initrd)
            with pytest.raises(VMExists):
                await lab.create()
            await lab.service.start("vm1")
            os.close(await lab.service.open_console("vm1", OWNER))
            await lab.service.stop("vm1", timeout=5)
            lab.hv.fail("start_vm")
            with pytest.raises(HypervisorError):
                await lab.service.start("vm1")
            lab.hv.failures.clear()
            await lab.service.start("vm1", paused=True)
            await lab.service.stop("vm1", force=True)
            await settle()
            await lab.service.delete("vm1")
            await settle()
            assert leftovers(lab.service) == {}
        lab.hv.fail("define_vm")
        with pytest.raises(HypervisorError):
            await lab.create("failed")
        await settle()
        assert leftovers(lab.service) == {}

    run(scenario())


# Unknown names.


@pytest.mark.parametrize("operation", ["get", "start", "stop", "delete", "console"])
def test_unknown_vm(lab: Lab, operation: str) -> None:
    async def scenario() -> None:
        calls: dict[str, Any] = {
            "get": lambda: lab.service.get("nope"),
            "start": lambda: lab.service.start("nope"),
            "stop": lambda: lab.service.stop("nope"),
            "delete": lambda: lab.service.delete("nope"),
            "console": lambda: lab.service.open_console_log("nope"),
        }

        async def call() -> object:
            result = calls[operation]()
            return await result if asyncio.iscoroutine(result) else result

        with pytest.raises(NoSuchVM, match="'nope'"):
            await call()

    run(scenario())
    assert lab.hv.calls == []


# The view: load, events, reconnection.


def test_load_reconciles(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create("keep")
        await lab.create("gone")
        await settle()
        template = lab.hv.domains["keep"].spec
        del lab.hv.domains["gone"]  # removed while kdlabd was not looking
        lab.hv.add_domain(template.replace(name="new"), VMState.RUNNING)
        lab.observer.events.clear()
        await lab.service.load()

    run(scenario())
    assert [r.name for r in lab.service.list()] == ["keep", "new"]
    assert sorted(lab.observer.events) == [
        ("added", "new", "running"),
        ("removed", "gone", None),
    ]


def test_load_from_scratch(lab: Lab) -> None:
    """A restarted kdlabd finds running VMs and never stops them."""

    async def scenario() -> None:
        await lab.booted("a")
        await lab.create("b")
        observer = Recorder()
        fresh = VMService(lab.hv, lab.layout, Accel.TCG, host=LocalHost())
        fresh.subscribe(observer)
        await fresh.load()
        assert {r.name: r.state for r in fresh.list()} == {
            "a": VMState.RUNNING,
            "b": VMState.DEFINED,
        }
        assert sorted(observer.events) == [
            ("added", "a", "running"),
            ("added", "b", "defined"),
        ]

    run(scenario())
    assert lab.hv.called("destroy_vm") == lab.hv.called("shutdown_vm") == []


def test_every_subscriber_is_told_until_it_unsubscribes(lab: Lab) -> None:
    second = Recorder()
    unsubscribe = lab.service.subscribe(second)

    async def scenario() -> None:
        await lab.create("a")
        unsubscribe()
        unsubscribe()  # twice is harmless
        await lab.create("b")
        await lab.service.delete("a")
        await settle()

    run(scenario())
    assert second.events == [("added", "a", "defined")]
    assert lab.observer.events == [
        ("added", "a", "defined"),
        ("added", "b", "defined"),
        ("removed", "a", None),
    ]


def test_reconnection_rebuilds_the_view(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create("a")
        await settle()
        del lab.hv.domains["a"]
        lab.hv.reconnect()
        await settle()

    run(scenario())
    assert lab.service.list() == []
    assert lab.observer.events[-1] == ("removed", "a", None)


# Console log.


def test_console_log_before_first_boot(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create()

    run(scenario())
    with pytest.raises(InvalidState, match="has not been booted yet"):
        run(lab.service.open_console_log("vm1"))


def test_console_log_after_boot_is_read_only(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()

    run(scenario())
    fd = run(lab.service.open_console_log("vm1"))
    try:
        assert os.read(fd, 100) == b"Linux version 6.1.0 (fake)\n"
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.write(fd, b"x")
    finally:
        os.close(fd)


# Diagnosis of a boot: made from that boot, counting only the time it ran.


class LoopClock:
    """The running loop's clock, which a test moves forward: the boot watchers'
    sleeps end and a VM seems to have been up that much longer."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        real = loop.time
        self.offset = 0.0
        loop.time = lambda: real() + self.offset  # type: ignore[method-assign]

    async def advance(self, seconds: float) -> None:
        """Let pending events land, move on *seconds*, then let the watchers
        diagnose (they read the log in a thread)."""
        await asyncio.sleep(0.05)
        self.offset += seconds
        await asyncio.sleep(0.2)


def code(lab: Lab, name: str = "vm1") -> str | None:
    found = lab.service.get(name).diagnosis
    return None if found is None else found.code.value


def test_a_vm_started_paused_is_not_diagnosed(lab: Lab) -> None:
    """Its CPUs wait for gdb: nothing ran, so nothing can have gone wrong, however
    long it waits."""

    async def scenario() -> None:
        clock = LoopClock()
        await lab.create()
        started = await lab.service.start("vm1", paused=True)
        assert started.diagnosis is None
        await clock.advance(0)
        assert code(lab) is None
        await clock.advance(60)
        assert code(lab) is None
        assert lab.service.get("vm1").waiting_for_debugger

    run(scenario())


def test_time_spent_paused_does_not_count_as_running(lab: Lab) -> None:
    async def scenario() -> None:
        clock = LoopClock()
        await lab.create()
        await lab.service.start("vm1", paused=True)
        await clock.advance(60)
        lab.hv.set_state("vm1", VMState.RUNNING)  # gdb: continue
        await clock.advance(3)
        assert code(lab) is None, "3 s of running, not 63"
        lab.hv.set_state("vm1", VMState.PAUSED)  # a breakpoint
        await clock.advance(60)
        assert code(lab) is None
        lab.hv.set_state("vm1", VMState.RUNNING)
        await clock.advance(10)
        found = lab.service.get("vm1").diagnosis
        assert found is not None
        assert found.code.value == "no-console-output"
        assert "after 13 s of running" in found.problem

    run(scenario())


def test_a_vm_stopped_before_it_ran_is_not_diagnosed(lab: Lab) -> None:
    async def scenario() -> None:
        clock = LoopClock()
        await lab.create()
        await lab.service.start("vm1", paused=True)
        await lab.service.stop("vm1", force=True)
        await clock.advance(2)
        assert code(lab) is None

    run(scenario())


def test_a_boot_is_diagnosed_from_its_own_start(lab: Lab) -> None:
    """A boot's watcher and running time end with it: a VM started again at once
    is not judged by the time the previous boot ran."""

    async def scenario() -> None:
        clock = LoopClock()
        await lab.booted()
        await clock.advance(30)
        assert code(lab) is None  # the fake kernel printed its banner
        await lab.service.stop("vm1", force=True)
        await lab.service.start("vm1")
        lab.layout.console_log("vm1").write_bytes(b"")  # silent so far
        await clock.advance(2)
        assert code(lab) is None, "2 s into the new boot"

    run(scenario())


def test_a_stopped_boot_keeps_its_diagnosis_until_the_next_start(lab: Lab) -> None:
    async def scenario() -> None:
        clock = LoopClock()
        await lab.booted()
        lab.layout.console_log("vm1").write_bytes(
            b"Kernel panic - not syncing: Attempted to kill init!\n"
        )
        await lab.service.stop("vm1", force=True)
        await clock.advance(2)
        assert code(lab) == "kernel-panic"
        started = await lab.service.start("vm1", paused=True)
        assert started.diagnosis is None
        await clock.advance(2)
        assert code(lab) is None

    run(scenario())


def test_each_start_marks_a_new_boot_and_a_stop_marks_it_requested(lab: Lab) -> None:
    """Booted names the boot (kept by the hypervisor, so a restarted kdlabd
    shows the same); LastStop tells a Stop call from the guest's own power-off."""

    async def scenario() -> None:
        first = await lab.booted()
        assert first.boot.started_usec > 0
        assert first.last_stop is StopCause.NONE
        stopped = await lab.service.stop("vm1", timeout=5)
        assert stopped.last_stop is StopCause.REQUESTED
        assert stopped.boot == first.boot
        second = await lab.service.start("vm1")
        assert second.boot.started_usec > first.boot.started_usec
        assert second.last_stop is StopCause.NONE
        lab.hv.set_state("vm1", VMState.STOPPED, StopCause.GUEST)
        await settle()
        assert lab.service.get("vm1").last_stop is StopCause.GUEST
        # A restarted kdlabd reads both back from the hypervisor.
        again = VMService(lab.hv, lab.layout, Accel.TCG, host=LocalHost())
        await again.load()
        assert again.get("vm1").boot == second.boot
        assert again.get("vm1").last_stop is StopCause.GUEST

    run(scenario())


def test_a_failed_start_keeps_the_last_boots_mark(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.booted()
        await lab.service.stop("vm1", timeout=5)
        before = lab.service.get("vm1")
        lab.hv.fail("start_vm", HypervisorError("no QEMU"))
        with pytest.raises(HypervisorError):
            await lab.service.start("vm1")
        after = lab.service.get("vm1")
        assert (after.boot, after.last_stop) == (before.boot, StopCause.REQUESTED)

    run(scenario())
