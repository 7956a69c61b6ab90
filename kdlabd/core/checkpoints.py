"""Checkpoints: a running VM's whole state saved under a tag, and restored.

A checkpoint is a libvirt internal snapshot with memory (the state lives in
the VM's qcow2 disks, the metadata in libvirt: libvirt stays kdlab's only
database). kdlab's own facts about it (when, how much memory, the boot it
came from, and what the VM was: kernel, command line, devices) travel in
the snapshot's description, as JSON (:func:`describe`, :func:`parse`).

A VM without a disk gets a small blank qcow2 disk of its own when its first
checkpoint is saved (QEMU keeps a snapshot's memory in a qcow2 image); the
guest sees it as an empty virtio disk. A restore of a running VM loads the
state inside the same QEMU process, so gdb and consoles stay attached; a
stopped VM starts straight into a checkpoint (``Start`` with ``checkpoint``).
A checkpoint of a VM whose kernel, command line or devices changed since is
refused, with what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from kdlab import wire
from kdlab.errors import (
    CheckpointMismatch,
    HypervisorError,
    InvalidArgument,
    InvalidState,
    KdlabError,
    NoSuchCheckpoint,
)
from kdlab.states import VMState
from kdlabd.core import blocking, validate
from kdlabd.core.host import Host
from kdlabd.core.hypervisor import Hypervisor
from kdlabd.core.jobs import Job, JobManager, finish_on_cancel
from kdlabd.core.journal import crash_point
from kdlabd.core.limits import Limits
from kdlabd.core.models import Checkpoint, Disk, VMRecord, VMSpec
from kdlabd.core.vms import VMService, disk_target, disk_volume

log = structlog.get_logger(__name__)

MIB = 1 << 20
STATE_DISK_BYTES = MIB
"""The blank disk a diskless VM gets to hold its checkpoints (QEMU stores the
memory beyond the disk's end, so the file grows with each checkpoint)."""
DIGEST_SECONDS = 30.0
"""Time limit of hashing a staged kernel or initrd (kdlabd's own files)."""
FORMAT = "kdlab-checkpoint/1"

# What a fingerprint holds, in the words a refusal uses.
ASPECTS = {
    "kernel": "kernel",
    "initrd": "initrd",
    "cmdline": "command line",
    "memory": "memory",
    "vcpus": "CPUs",
    "disks": "disks",
    "gdb": "gdbstub",
}
Fingerprint = tuple[tuple[str, str], ...]


def describe(checkpoint: Checkpoint) -> str:
    """The snapshot description that carries *checkpoint*'s facts."""
    return json.dumps(
        {
            "format": FORMAT,
            "created_usec": checkpoint.created_usec,
            "memory_bytes": checkpoint.memory_bytes,
            "boot": checkpoint.boot,
            "fingerprint": dict(checkpoint.fingerprint),
        },
        sort_keys=True,
    )


def parse(tag: str, description: str, created_sec: int) -> Checkpoint:
    """The checkpoint *tag* from its snapshot's description and creation time.

    A snapshot kdlab did not make (``virsh snapshot-create``) is listed with
    what libvirt knows, and no fingerprint: a restore refuses it.
    """
    try:
        facts = json.loads(description)
        if not isinstance(facts, dict) or facts.get("format") != FORMAT:
            raise ValueError
        fingerprint = tuple(sorted(facts["fingerprint"].items()))
        return Checkpoint(
            tag,
            int(facts["created_usec"]),
            int(facts["memory_bytes"]),
            int(facts["boot"]),
            tuple((str(k), str(v)) for k, v in fingerprint),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return Checkpoint(tag, created_sec * 1_000_000, 0, 0)


async def fingerprint(host: Host, spec: VMSpec) -> Fingerprint:
    """What the VM of *spec* is: its kernel and initrd (their bytes), the
    command line it boots with and its devices."""

    async def digest(path: Path | None) -> str:
        if path is None:
            return ""
        try:
            return await blocking.run(
                lambda: host.digest(path),
                seconds=DIGEST_SECONDS,
                what=f"reading {path}",
            )
        except (OSError, blocking.Unanswered) as err:
            raise HypervisorError(
                f"cannot read the staged file {path} of VM {spec.name!r}: {err}"
            ) from None

    disks = " ".join(f"{d.target}:{d.base_image or '-'}" for d in spec.disks)
    gdb = spec.debug
    facts = {
        "kernel": await digest(spec.kernel),
        "initrd": await digest(spec.initrd),
        "cmdline": spec.effective_cmdline,
        "memory": f"{spec.memory_mib} MiB",
        "vcpus": str(spec.vcpus),
        "disks": disks,
        "gdb": "off"
        if not gdb.gdb
        else f"tcp:{gdb.gdb_tcp_port}"
        if gdb.gdb_tcp_port is not None
        else "unix",
    }
    return tuple(sorted(facts.items()))


def changes(then: Fingerprint, now: Fingerprint) -> list[str]:
    """What differs between two fingerprints, in words, in a stable order."""
    old, new = dict(then), dict(now)
    found = []
    for key, words in ASPECTS.items():
        if old.get(key) == new.get(key):
            continue
        if key in ("kernel", "initrd"):
            found.append(f"the {words} was rebuilt or replaced")
        else:
            found.append(f"{words} was {old.get(key)!r}, is {new.get(key)!r}")
    return found


def find(record: VMRecord, tag: str) -> Checkpoint:
    """The checkpoint *tag* of the VM; NoSuchCheckpoint with the tags it has."""
    for checkpoint in record.checkpoints:
        if checkpoint.tag == tag:
            return checkpoint
    have = ", ".join(c.tag for c in record.checkpoints) or "none"
    raise NoSuchCheckpoint(
        f"VM {record.name!r} has no checkpoint {tag!r} (it has: {have}; see "
        f"kdlabctl checkpoint list {record.name})"
    )


class CheckpointService:
    """Saves, restores and deletes the checkpoints of kdlab's VMs."""

    def __init__(
        self,
        vms: VMService,
        hypervisor: Hypervisor,
        host: Host,
        jobs: JobManager,
        limits: Limits | None = None,
    ) -> None:
        self._vms = vms
        self._hv = hypervisor
        self._host = host
        self._jobs = jobs
        self._limits = limits or Limits()

    async def save(self, name: str, tag: str, owner_uid: int) -> Job:
        """Save the running or paused VM's state as *tag*: a job.

        Everything that can be refused is checked before the job starts.
        """
        self._check_save(self._vms.get(name), tag)

        async def work(job: Job) -> None:
            async with self._vms.operation(name):
                record = self._check_save(self._vms.get(name), tag)
                if not record.spec.disks:
                    job.report(0.05, "adding a disk to hold the state")
                    record = await self._add_state_disk(record)
                job.report(0.1, f"saving {record.spec.memory_mib} MiB of memory")
                checkpoint = Checkpoint(
                    tag,
                    time.time_ns() // 1000,
                    record.spec.memory_mib * MIB,
                    record.boot.started_usec,
                    await fingerprint(self._host, record.spec),
                )
                await self._save(name, tag, describe(checkpoint))
                await self._vms.refresh(name)
            log.info("checkpoint.saved", vm=name, tag=tag)
            job.report(1.0, f"saved checkpoint {tag}")

        return self._jobs.start("checkpoint-save", name, owner_uid, work)

    async def restore(
        self, name: str, tag: str, owner_uid: int, *, paused: bool
    ) -> Job:
        """Load *tag* into the running or paused VM: a job.

        A refusal (no such checkpoint, wrong state, a changed VM) is the
        call's error, before the job starts.
        """
        record = self._vms.get(name)
        await self.check_unchanged(record, self._check_restore(record, tag))

        async def work(job: Job) -> None:
            async with self._vms.operation(name):
                record = self._vms.get(name)
                checkpoint = self._check_restore(record, tag)
                job.report(0.1, "checking the VM against the checkpoint")
                await self.check_unchanged(record, checkpoint)
                job.report(0.2, f"loading {checkpoint.memory_bytes // MIB} MiB")
                # A restore cannot be taken back: a cancel waits for its end.
                await finish_on_cancel(
                    self._hv.restore_checkpoint(name, tag, paused=paused)
                )
                await self._vms.refresh(name)
            log.info("checkpoint.restored", vm=name, tag=tag, paused=paused)
            job.report(1.0, f"restored checkpoint {tag}")

        return self._jobs.start("checkpoint-restore", name, owner_uid, work)

    async def delete(self, name: str, tag: str) -> None:
        """Delete the checkpoint *tag* of the VM, in any state."""
        async with self._vms.operation(name):
            find(self._vms.get(name), tag)
            await self._hv.delete_checkpoint(name, tag)
            await self._vms.refresh(name)
        log.info("checkpoint.deleted", vm=name, tag=tag)

    def starter(self, tag: str) -> Callable[[VMRecord], Awaitable[None]]:
        """What a start into checkpoint *tag* checks, once the kernel is staged."""

        async def check(record: VMRecord) -> None:
            await self.check_unchanged(record, find(record, tag))

        return check

    async def check_unchanged(self, record: VMRecord, checkpoint: Checkpoint) -> None:
        """CheckpointMismatch, naming what changed, unless the VM is as it was."""
        if not checkpoint.fingerprint:
            raise CheckpointMismatch(
                f"checkpoint {checkpoint.tag!r} of VM {record.name!r} was not made by "
                "kdlab: it does not say what the VM was; delete it (kdlabctl "
                f"checkpoint delete {record.name} {checkpoint.tag})"
            )
        changed = changes(
            checkpoint.fingerprint, await fingerprint(self._host, record.spec)
        )
        if changed:
            raise CheckpointMismatch(
                f"VM {record.name!r} changed since checkpoint {checkpoint.tag!r}: "
                + "; ".join(changed)
                + f". Boot it afresh (kdlabctl start {record.name}) and save a "
                "new checkpoint"
            )

    def _check_save(self, record: VMRecord, tag: str) -> VMRecord:
        validate.name(tag, "checkpoint tag")
        _not_recording(record)
        if record.state not in (VMState.RUNNING, VMState.PAUSED):
            raise InvalidState(
                f"VM {record.name!r} is {record.state}: only a running or paused VM "
                f"has a state to save (kdlabctl start {record.name})"
            )
        if record.spec.shares:
            raise InvalidState(
                f"VM {record.name!r} has shares: QEMU cannot save the state of a "
                "virtiofs device (it lives in the owner's virtiofsd). Checkpoints "
                "are for VMs created without --share"
            )
        if any(c.tag == tag for c in record.checkpoints):
            raise InvalidArgument(
                f"VM {record.name!r} already has a checkpoint {tag!r}: choose "
                f"another tag, or delete it first (kdlabctl checkpoint delete "
                f"{record.name} {tag})"
            )
        uid = record.spec.owner_uid
        used = sum(
            c.memory_bytes
            for vm in self._vms.list()
            if vm.spec.owner_uid == uid
            for c in vm.checkpoints
        )
        self._limits.room_for_checkpoint(uid, used, record.spec.memory_mib * MIB)
        return record

    @staticmethod
    def _check_restore(record: VMRecord, tag: str) -> Checkpoint:
        checkpoint = find(record, tag)
        _not_recording(record)
        if record.state not in (VMState.RUNNING, VMState.PAUSED):
            raise InvalidState(
                f"VM {record.name!r} is {record.state}: start it into the "
                f"checkpoint instead (kdlabctl start {record.name} --from {tag})"
            )
        return checkpoint

    async def _save(self, name: str, tag: str, description: str) -> None:
        """Have the hypervisor save the checkpoint; a job cancelled meanwhile
        waits for the save's end and deletes what it made."""
        try:
            await finish_on_cancel(self._hv.save_checkpoint(name, tag, description))
        except asyncio.CancelledError:
            with contextlib.suppress(KdlabError):
                await self._hv.delete_checkpoint(name, tag)
            log.info("checkpoint.save_cancelled", vm=name, tag=tag)
            raise

    async def _add_state_disk(self, record: VMRecord) -> VMRecord:
        """Give the diskless running VM a blank qcow2 disk to hold its state.

        Made before it is plugged in: a crash in between leaves a volume
        that no VM's definition names, which start-up removes.
        """
        name = record.name
        target = disk_target(0)
        volume = disk_volume(name, target)
        path = await self._hv.create_vm_disk(volume, STATE_DISK_BYTES, None)
        crash_point("checkpoint.state-disk-made")
        try:
            await self._hv.attach_disk(name, Disk(path, target))
        except BaseException:
            await self._hv.delete_vm_volume(volume)
            raise
        await self._vms.refresh(name)
        log.info("checkpoint.state_disk_added", vm=name, volume=volume)
        return self._vms.get(name)


def _not_recording(record: VMRecord) -> None:
    """A recorded or replayed run has QEMU's own snapshots: a checkpoint saved
    or loaded into it would break the recording or the replay."""
    run = record.boot.run
    if run is not None and record.state.active:
        verb = "records" if run.mode == wire.RUN_RECORD else "replays"
        raise InvalidState(
            f"VM {record.name!r} {verb} recording {run.recording!r}: checkpoints "
            f"are for plain boots (stop it, then kdlabctl start {record.name})"
        )
