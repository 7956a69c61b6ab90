"""Post-mortem dumps: one per panic, limits, leftovers of a crash, VMCOREINFO.

Core logic on the fake hypervisor (a real directory as the dumps pool, the
real LocalHost); the vm tier (tests/vm/test_dumps.py) is the evidence that
libvirt and QEMU write them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from kdlab import wire
from kdlab.errors import InvalidState, LimitExceeded
from kdlab.kernel import vmcore
from kdlab.kernel.diagnosis import BootFacts, Code, diagnose
from kdlab.states import VMState
from kdlabd.core.dumps import DumpRecord, DumpService, panic_reason
from kdlabd.core.jobs import JobManager
from kdlabd.core.limits import Limits
from kdlabd.core.models import VMRecord
from kdlabd.core.vms import VMEntry, client_view
from kdlabd.host.local import LocalHost
from tests.support.vmcores import elf_core, flattened, kdump_core
from tests.unit.fake_hypervisor import FakeHypervisor
from tests.unit.test_domain_xml import make_spec

T = TypeVar("T")

INFO = "OSRELEASE=6.1.0-kdlab\nBUILD-ID=0123abcd\nPAGESIZE=4096\n"
# As the serial console shows it: with printk's timestamps.
PANIC_LOG = (
    "[    0.000000] Linux version 6.1.0\n"
    "[    3.933308] Run /init as init process\n"
    "[    4.054550] Kernel panic - not syncing: Attempted to kill init! "
    "exitcode=0x00000100\n"
)


def reader(data: bytes) -> vmcore.Read:
    return lambda offset, size: data[offset : offset + size]


def test_vmcoreinfo_of_an_elf_core() -> None:
    info = vmcore.vmcoreinfo(reader(elf_core(INFO)))
    assert info is not None
    assert vmcore.build_id(info) == "0123abcd"
    assert vmcore.release(info) == "6.1.0-kdlab"


def test_vmcoreinfo_of_a_kdump_core() -> None:
    info = vmcore.vmcoreinfo(reader(kdump_core(INFO)))
    assert info is not None
    assert vmcore.build_id(info) == "0123abcd"


def test_vmcoreinfo_of_a_flattened_kdump_core() -> None:
    """QEMU 7.2 writes kdump-zlib dumps flattened (libvirt gives it a pipe's
    way of writing: records of offset and size)."""
    data = flattened(kdump_core(INFO))
    assert vmcore.dump_format(data[:4096]) == "kdump"
    info = vmcore.vmcoreinfo(reader(data))
    assert info is not None
    assert vmcore.release(info) == "6.1.0-kdlab"
    assert vmcore.vmcoreinfo(reader(data[:6000])) is None  # cut short


def test_a_core_without_vmcoreinfo_says_so() -> None:
    assert vmcore.vmcoreinfo(reader(elf_core(None))) is None
    assert vmcore.vmcoreinfo(reader(b"garbage" * 100)) is None


class Lab:
    def __init__(self, tmp_path: Path, limits: Limits | None = None) -> None:
        self.hv = FakeHypervisor(dump_dir=tmp_path / "dumps")
        self.hv.dump_dir.mkdir()
        self.hv.dump_content = elf_core(INFO)
        self.jobs = JobManager()
        self.stopped: list[str] = []
        self.limits = limits or Limits()
        self.dumps = self.service()

    def service(self) -> DumpService:
        async def stop(name: str) -> None:
            self.stopped.append(name)
            await self.hv.destroy_vm(name)

        return DumpService(
            self.hv,
            host=LocalHost(),
            jobs=self.jobs,
            stop_vm=stop,
            limits=self.limits,
            headline_seconds=0.2,
        )

    def vm(self, name: str = "vm1", **changes: object) -> VMRecord:
        if name not in self.hv.domains:
            self.hv.add_domain(make_spec(name, **changes), VMState.RUNNING)
        domain = self.hv.domains[name]
        return VMRecord(
            domain.spec, domain.uuid, domain.state, panicked=domain.panicked
        )

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0.01)
            if all(j.state.value != "running" for j in self.jobs.list()):
                return


def run(make: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(make())  # type: ignore[arg-type]


def running_boot(name: str) -> BootFacts:
    """A VM running for 5 s, as the diagnosis sees it."""
    return BootFacts(
        cmdline="",
        disks=(),
        has_initrd=False,
        gdbstub=True,
        seconds_since_start=5.0,
        running=True,
        paused=False,
        name=name,
    )


def panicked_record(lab: Lab, *, console: bool, pvpanic: bool) -> VMRecord:
    vm = lab.vm()
    if pvpanic:
        lab.hv.panic(vm.name)
        vm = lab.vm()
    diagnosis = diagnose(PANIC_LOG, running_boot(vm.name)) if console else None
    return VMRecord(
        vm.spec, vm.uuid, vm.state, diagnosis=diagnosis, panicked=vm.panicked
    )


def test_a_panic_seen_twice_is_one_dump(tmp_path: Path) -> None:
    """pvpanic and the console both report the panic: exactly one dump, owned
    by the VM's owner, complete, with VMCOREINFO; then the VM is stopped."""
    lab = Lab(tmp_path)

    async def scenario() -> list[DumpRecord]:
        seen_on_console = panicked_record(lab, console=True, pvpanic=False)
        lab.dumps.vm_changed(seen_on_console)
        lab.dumps.vm_changed(panicked_record(lab, console=True, pvpanic=True))
        lab.dumps.vm_changed(seen_on_console)
        await asyncio.sleep(0.05)
        await lab.settle()
        await asyncio.sleep(0.05)
        return lab.dumps.list()

    dumps = run(scenario)
    assert len(dumps) == 1
    dump = dumps[0]
    assert (dump.owner_uid, dump.reason, dump.state) == (1000, "panic", "complete")
    assert dump.vmcoreinfo
    assert dump.build_id == "0123abcd"
    assert not dump.problem
    assert dump.headline.startswith("Kernel panic - not syncing: Attempted to kill")
    assert "Attempted" not in dump.public_headline
    assert lab.hv.called("dump_vm") == ["vm1"]
    assert lab.stopped == ["vm1"]
    sidecar = json.loads((lab.hv.dump_dir / f"{dump.id}.json").read_text())
    assert sidecar["vm"] == "vm1"
    assert sidecar["owner_uid"] == 1000


def test_dump_and_keep_leaves_the_vm_and_a_restart_does_not_dump_again(
    tmp_path: Path,
) -> None:
    lab = Lab(tmp_path)
    lab.vm(on_panic=wire.ON_PANIC_DUMP_AND_KEEP)

    async def scenario() -> int:
        lab.dumps.vm_changed(panicked_record(lab, console=False, pvpanic=True))
        await asyncio.sleep(0.05)
        await lab.settle()
        await asyncio.sleep(0.05)
        restarted = lab.service()  # kdlabd restarted: the VM is still panicked
        await restarted.load()
        restarted.vm_added(lab.vm())
        await asyncio.sleep(0.05)
        return len(restarted.list())

    assert run(scenario) == 1
    assert lab.stopped == []
    assert lab.hv.called("dump_vm") == ["vm1"]


def test_an_oops_the_kernel_survives_is_not_dumped(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    facts = running_boot("vm1")
    oops = diagnose(
        "BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
        "Oops: 0002 [#1] PREEMPT SMP NOPTI\n",
        facts,
    )
    vm = lab.vm()
    assert panic_reason(VMRecord(vm.spec, vm.uuid, vm.state, diagnosis=oops)) is None


def test_automatic_dumps_beyond_the_limit_drop_the_oldest(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Limits(dumps_per_vm=2))

    async def scenario() -> tuple[list[str], list[str]]:
        ids = []
        for reason in ("panic", "requested", "panic", "panic"):
            record, job = await lab.dumps.take(lab.vm(), reason=reason)
            await lab.jobs.wait(job.id)
            ids.append(record.id)
        return ids, [d.id for d in lab.dumps.list()]

    made, kept = run(scenario)
    assert len(set(made)) == 4, "ids are unique"
    assert kept == made[1:], "the oldest automatic dump went; the requested stays"
    assert sorted(p.name for p in lab.hv.dump_dir.iterdir()) == sorted(
        [f"{i}.core" for i in kept] + [f"{i}.json" for i in kept]
    )


def test_a_dump_that_does_not_fit_is_refused_before_it_starts(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.hv.dump_free = 100 << 20  # the VM has 512 MiB

    async def scenario() -> None:
        await lab.dumps.take(lab.vm())

    with pytest.raises(LimitExceeded, match="dumps pool has 100 MiB free"):
        run(scenario)
    assert lab.hv.called("dump_vm") == []
    assert list(lab.hv.dump_dir.iterdir()) == []


def test_a_users_dumps_are_limited(tmp_path: Path) -> None:
    lab = Lab(tmp_path, Limits(dump_gib_per_user=1))

    async def scenario() -> None:
        lab.hv.dump_content = elf_core(INFO) + bytes(700 << 20)
        _record, job = await lab.dumps.take(lab.vm())
        await lab.jobs.wait(job.id)
        # The first dump took 700 MiB (as the pool reports it after a restart).
        assert lab.dumps.get(_record.id).size > 700 << 20
        await lab.dumps.take(lab.vm())

    with pytest.raises(LimitExceeded, match="max_dump_gib_per_user"):
        run(scenario)


def test_a_stopped_vm_cannot_be_dumped(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.vm()
    lab.hv.domains["vm1"].state = VMState.STOPPED

    async def scenario() -> None:
        await lab.dumps.take(lab.vm())

    with pytest.raises(InvalidState, match="running or paused"):
        run(scenario)


def test_a_dump_cut_short_leaves_nothing_after_a_restart(tmp_path: Path) -> None:
    """kdlabd killed while libvirt writes: the file has no sidecar, and the
    next start-up removes it (and a sidecar whose dump is gone)."""
    lab = Lab(tmp_path)
    (lab.hv.dump_dir / "vm1-20250101-000000.core").write_bytes(b"\x7fELF partial")
    (lab.hv.dump_dir / "gone-20250101-000000.json").write_text("{}")

    async def scenario() -> tuple[list[str], list[DumpRecord]]:
        service = lab.service()
        await service.load()
        return await service.reconcile(), service.list()

    removed, listed = run(scenario)
    assert sorted(removed) == ["gone-20250101-000000.json", "vm1-20250101-000000.core"]
    assert listed == []
    assert list(lab.hv.dump_dir.iterdir()) == []


def test_a_failed_dump_leaves_no_volume(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.hv.fail("dump_vm")

    async def scenario() -> str:
        _record, job = await lab.dumps.take(lab.vm())
        return (await lab.jobs.wait(job.id)).state.value

    assert run(scenario) == "failed"
    assert lab.dumps.list() == []
    assert list(lab.hv.dump_dir.iterdir()) == []


def test_a_panic_seen_only_on_the_console_is_a_panic(tmp_path: Path) -> None:
    """Without pvpanic, init's end is seen on the console alone (diagnosed
    init-died, not kernel-panic): the kernel panicked all the same."""
    record = panicked_record(Lab(tmp_path), console=True, pvpanic=False)
    assert record.diagnosis is not None
    assert record.diagnosis.code is not Code.KERNEL_PANIC
    assert panic_reason(record) == wire.DUMP_REASON_PANIC


def test_what_clients_see_of_a_vm_says_it_panicked(tmp_path: Path) -> None:
    """DumpService hears of pvpanic through VMService's view of the VM."""
    lab = Lab(tmp_path)
    vm = lab.vm()
    lab.hv.panic(vm.name)
    shown = client_view(VMEntry(vm.name, record=lab.vm()))
    assert shown.panicked
    assert panic_reason(shown) == wire.DUMP_REASON_PANIC


def test_a_panic_pvpanic_told_first_gets_the_consoles_line(tmp_path: Path) -> None:
    """pvpanic reports the panic before the console's diagnosis names it: the
    dump still gets the console's panic line as its headline."""
    lab = Lab(tmp_path)

    async def scenario() -> list[DumpRecord]:
        lab.dumps.vm_changed(panicked_record(lab, console=False, pvpanic=True))
        await asyncio.sleep(0)
        lab.dumps.vm_changed(panicked_record(lab, console=True, pvpanic=True))
        await asyncio.sleep(0.05)
        await lab.settle()
        return lab.dumps.list()

    (dump,) = run(scenario)
    assert dump.headline.startswith("Kernel panic - not syncing: Attempted to kill")


def test_a_panic_handled_while_kdlabd_stops_is_left_for_the_next_start(
    tmp_path: Path,
) -> None:
    """kdlabd stops while a panic's dump is written: the handling ends at
    once, without stopping the VM or marking the panic handled."""
    lab = Lab(tmp_path)

    async def scenario() -> None:
        lab.hv.hold("dump_vm")
        lab.dumps.vm_changed(panicked_record(lab, console=False, pvpanic=True))
        while not lab.hv.called("dump_vm"):
            await asyncio.sleep(0.01)
        await asyncio.wait_for(lab.dumps.close(), 1)

    run(scenario)
    assert lab.stopped == []
    assert not lab.hv.domains["vm1"].panic_handled
