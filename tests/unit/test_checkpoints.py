"""kdlabd.core.checkpoints: the rules of saving and restoring a VM's state,
against the in-memory fake hypervisor (the vm tier shows the real thing)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdlab import wire
from kdlab.errors import (
    CheckpointMismatch,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    NoSuchCheckpoint,
    UnsupportedDisk,
)
from kdlab.states import JobState, VMState
from kdlabd.core import checkpoints
from kdlabd.core.checkpoints import CheckpointService
from kdlabd.core.jobs import Job, JobManager
from kdlabd.core.limits import Limits
from kdlabd.core.models import Accel, Checkpoint, Run, RunFiles, RunStart
from kdlabd.core.vms import VMService
from kdlabd.host.local import LocalHost
from tests.unit.fake_hypervisor import FakeHypervisor
from tests.unit.test_vms import OWNER, Lab, bzimage, new_lab, run, settle


class FakePoolHost(LocalHost):
    """The real host, but the staged kernels are the fake hypervisor's volumes."""

    def __init__(self, hv: FakeHypervisor) -> None:
        super().__init__()
        self._hv = hv

    def digest(self, path: Path) -> str:
        if path.name not in self._hv.volumes:  # a real file (QEMU's binary)
            return super().digest(path)
        return hashlib.sha256(self._hv.volumes[path.name]).hexdigest()


@dataclass
class CheckpointLab(Lab):
    jobs: JobManager = None  # type: ignore[assignment]
    checkpoints: CheckpointService = None  # type: ignore[assignment]

    async def done(self, job: Job) -> Job:
        await self.jobs.wait(job.id)
        await settle()
        if job.state is JobState.FAILED:
            raise AssertionError(job.message)
        return job

    async def save(self, tag: str = "ready", name: str = "vm1") -> Job:
        return await self.done(await self.checkpoints.save(name, tag, OWNER))

    async def restore(
        self, tag: str = "ready", name: str = "vm1", *, paused: bool = False
    ) -> Job:
        return await self.done(
            await self.checkpoints.restore(name, tag, OWNER, paused=paused)
        )

    async def new_kernel(self, name: str = "vm1") -> None:
        """Stop the VM and start it on a rebuilt kernel."""
        await self.service.stop(name, force=True)
        rebuilt = self.tmp / "rebuilt"
        rebuilt.write_bytes(bzimage(size=9000))
        fd = os.open(rebuilt, os.O_RDONLY)
        try:
            await self.service.start(name, kernel_fd=fd)
        finally:
            os.close(fd)


def make_lab(tmp_path: Path, limits: Limits | None = None) -> CheckpointLab:
    hv = FakeHypervisor()
    host = FakePoolHost(hv)
    base = new_lab(tmp_path, hv, host, limits)
    jobs = JobManager()
    return CheckpointLab(
        **vars(base),
        jobs=jobs,
        checkpoints=CheckpointService(base.service, hv, host, jobs, limits),
    )


@pytest.fixture
def lab(tmp_path: Path) -> CheckpointLab:
    return make_lab(tmp_path)


def test_a_save_gives_a_diskless_vm_a_state_disk_and_lists_the_checkpoint(
    lab: CheckpointLab,
) -> None:
    async def scenario() -> None:
        await lab.booted()
        job = await lab.save()
        assert job.state is JobState.SUCCEEDED
        record = lab.service.get("vm1")
        assert [d.target for d in record.spec.disks] == ["vda"]
        assert lab.hv.called("attach_disk") == ["vm1"]
        (found,) = record.checkpoints
        assert found.tag == "ready"
        assert found.memory_bytes == record.spec.memory_mib << 20
        assert found.boot == record.boot.started_usec > 0
        facts = dict(found.fingerprint)
        assert facts["kernel"] == hashlib.sha256(lab.kernel.read_bytes()).hexdigest()
        assert facts["cmdline"] == record.spec.effective_cmdline
        # A second save keeps the disk it has.
        await lab.save("later")
        assert lab.hv.called("attach_disk") == ["vm1"]
        assert [c.tag for c in lab.service.get("vm1").checkpoints] == [
            "ready",
            "later",
        ]

    run(scenario())


def test_restore_loads_into_the_running_vm_and_may_leave_it_paused(
    lab: CheckpointLab,
) -> None:
    async def scenario() -> None:
        await lab.booted()
        await lab.save()
        await lab.restore()
        assert lab.hv.domains["vm1"].loaded == ["ready"]
        assert lab.service.get("vm1").state is VMState.RUNNING
        await lab.restore(paused=True)
        assert lab.service.get("vm1").state is VMState.PAUSED

    run(scenario())


def test_a_checkpoint_of_another_kernel_is_refused_with_what_changed(
    lab: CheckpointLab,
) -> None:
    async def scenario() -> None:
        await lab.booted()
        await lab.save()
        await lab.new_kernel()
        with pytest.raises(CheckpointMismatch, match="kernel was rebuilt"):
            await lab.restore()
        assert lab.hv.domains["vm1"].loaded == []
        await lab.service.stop("vm1", force=True)
        with pytest.raises(CheckpointMismatch, match="kernel was rebuilt"):
            await lab.service.start(
                "vm1", checkpoint="ready", check=lab.checkpoints.starter("ready")
            )
        assert lab.service.get("vm1").state is VMState.STOPPED

    run(scenario())


def test_start_from_a_checkpoint(lab: CheckpointLab) -> None:
    async def scenario() -> None:
        await lab.booted()
        await lab.save()
        await lab.service.stop("vm1", force=True)
        record = await lab.service.start(
            "vm1", checkpoint="ready", check=lab.checkpoints.starter("ready")
        )
        assert record.state is VMState.RUNNING
        assert lab.hv.domains["vm1"].loaded == ["ready"]
        # A new boot, though libvirt's revert brought back the checkpoint's mark.
        assert record.boot.started_usec > record.checkpoints[0].boot

    run(scenario())


def test_wrong_states_and_unknown_tags_are_refused_before_a_job(
    lab: CheckpointLab,
) -> None:
    async def scenario() -> None:
        await lab.create()
        with pytest.raises(InvalidState, match="running or paused"):
            await lab.checkpoints.save("vm1", "ready", OWNER)
        await lab.service.start("vm1")
        with pytest.raises(NoSuchCheckpoint, match="has: none"):
            await lab.checkpoints.restore("vm1", "ready", OWNER, paused=False)
        await lab.save()
        with pytest.raises(InvalidArgument, match="already has a checkpoint"):
            await lab.checkpoints.save("vm1", "ready", OWNER)
        with pytest.raises(InvalidArgument, match="invalid checkpoint tag"):
            await lab.checkpoints.save("vm1", "../x", OWNER)
        await lab.service.stop("vm1", force=True)
        with pytest.raises(InvalidState, match="--from ready"):
            await lab.checkpoints.restore("vm1", "ready", OWNER, paused=False)
        with pytest.raises(NoSuchCheckpoint):
            await lab.checkpoints.delete("vm1", "nope")
        assert lab.jobs.list() == [lab.jobs.list()[0]]  # only the one save

    run(scenario())


def test_a_vm_with_shares_takes_no_checkpoint(lab: CheckpointLab) -> None:
    """QEMU cannot save a virtiofs device: its state is in the owner's
    virtiofsd. Refused by name before a job, not as libvirt's failure."""

    async def scenario() -> None:
        await lab.create(shares=(("src", "/home/dev/src"),))
        served = await lab.service.serve_shares("vm1", OWNER)
        try:
            await lab.service.start("vm1")
        finally:
            for fd in served.values():
                os.close(fd)
        with pytest.raises(InvalidState, match="has shares"):
            await lab.checkpoints.save("vm1", "ready", OWNER)
        assert lab.jobs.list() == []

    run(scenario())


def test_a_recorded_or_replayed_run_takes_no_checkpoint(lab: CheckpointLab) -> None:
    """QEMU's record/replay keeps snapshots of its own: a checkpoint saved or
    loaded into such a run would break it."""

    async def scenario() -> None:
        await lab.create()
        await lab.service.start("vm1")
        await lab.save()
        await lab.service.stop("vm1", force=True)
        for mode, verb in ((wire.RUN_RECORD, "records"), (wire.RUN_REPLAY, "replays")):
            files = RunFiles(lab.tmp / "r.rr", lab.tmp / "r.state")
            run_start = RunStart(Run(mode, "r"), files)
            await lab.service.start("vm1", run=run_start)
            with pytest.raises(InvalidState, match=f"{verb} recording 'r'"):
                await lab.checkpoints.save("vm1", "other", OWNER)
            with pytest.raises(InvalidState, match=f"{verb} recording 'r'"):
                await lab.checkpoints.restore("vm1", "ready", OWNER, paused=False)
            await lab.service.stop("vm1", force=True)
        await lab.service.start("vm1")
        await lab.save("plain-again")

    run(scenario())


def test_a_raw_disk_fails_the_save_with_its_name_and_leaves_no_checkpoint(
    lab: CheckpointLab,
) -> None:
    async def scenario() -> None:
        await lab.create(extra_disks=(1 << 20,))
        await lab.service.start("vm1")
        lab.hv.domains["vm1"].raw_disk = True
        job = await lab.checkpoints.save("vm1", "ready", OWNER)
        await lab.jobs.wait(job.id)
        assert job.state is JobState.FAILED
        assert job.error == UnsupportedDisk.dbus_name()
        assert lab.service.get("vm1").checkpoints == ()

    run(scenario())


def test_checkpoints_count_against_the_owners_disk_limit(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, Limits(disk_gib=1))

    async def scenario() -> None:
        await lab.booted()  # 512 MiB of memory
        await lab.save("one")
        await lab.save("two")
        with pytest.raises(LimitExceeded, match="max_disk_gib"):
            await lab.checkpoints.save("vm1", "three", OWNER)
        await lab.checkpoints.delete("vm1", "one")
        await lab.save("three")

    run(scenario())


def test_start_up_removes_a_state_disk_a_crashed_save_did_not_plug_in(
    lab: CheckpointLab,
) -> None:
    async def scenario() -> None:
        await lab.booted()
        # kdlabd died after making the volume, before attaching it.
        await lab.hv.create_vm_disk("vm1.vda.qcow2", 1 << 20, None)
        fresh = VMService(lab.hv, lab.layout, Accel.TCG, host=FakePoolHost(lab.hv))
        await fresh.load()
        assert "vm1.vda.qcow2" in await fresh.reconcile()
        assert "vm1.vda.qcow2" not in lab.hv.volumes
        assert "vm1.kernel" in lab.hv.volumes

    run(scenario())


def test_descriptions_round_trip_and_foreign_snapshots_have_no_fingerprint() -> None:
    made = Checkpoint("t", 1_700_000_000_000_000, 1 << 28, 7, (("kernel", "ab"),))
    assert checkpoints.parse("t", checkpoints.describe(made), 5) == made
    foreign = checkpoints.parse("t", "made with virsh", 5)
    assert foreign == Checkpoint("t", 5_000_000, 0, 0)
    assert checkpoints.changes((("cmdline", "a"),), (("cmdline", "b"),)) == [
        "command line was 'a', is 'b'"
    ]


def test_a_cancelled_save_waits_for_libvirt_and_leaves_no_checkpoint(
    lab: CheckpointLab,
) -> None:
    async def scenario() -> None:
        await lab.booted()
        held = lab.hv.hold("save_checkpoint")
        job = await lab.checkpoints.save("vm1", "ready", OWNER)
        while "save_checkpoint" not in [c.method for c in lab.hv.calls]:
            await asyncio.sleep(0.01)
        lab.jobs.cancel(job.id)
        await asyncio.sleep(0.05)
        assert job.state is JobState.RUNNING, "it waits for the save to end"
        held.set()
        await lab.jobs.wait(job.id)
        await settle()
        assert job.state is JobState.CANCELLED
        assert lab.service.get("vm1").checkpoints == ()
        assert lab.hv.called("delete_checkpoint") == ["vm1"]

    run(scenario())
