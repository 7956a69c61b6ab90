"""Recordings: a VM's run recorded by QEMU (icount record/replay), replayed
under gdb as often as needed, backwards included.

A recording is QEMU's record/replay log and a qcow2 holding the snapshot
QEMU takes as the run begins, in kdlab's recordings pool (a libvirt
directory pool; kdlabd names the files). What libvirt cannot keep about it
(the VM, the owner, how the run ended, the VM's fingerprint, the QEMU build)
is a JSON sidecar, ``ID.json``, written once the run ended: the mark of a
complete recording. A log without one is either being recorded (a VM's boot
mark names it: kdlabd restarted meanwhile) or was cut short by a crash, and
is removed at start-up.

A recording or replaying boot is the VM's own definition with the run's
pieces added for that boot only (:class:`kdlabd.core.models.RunStart`), so
the VM's definition, which its fingerprint is taken from, stays as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from kdlab import wire
from kdlab.errors import (
    HypervisorError,
    InvalidArgument,
    InvalidState,
    KdlabError,
    LimitExceeded,
    NoSuchRecording,
    NotRecordable,
    RecordingMismatch,
)
from kdlab.states import VMState
from kdlabd.core import blocking, checkpoints, sidecars
from kdlabd.core.dumps import panic_reason
from kdlabd.core.host import Host
from kdlabd.core.hypervisor import Hypervisor
from kdlabd.core.limits import GIB, Limits
from kdlabd.core.models import Accel, Run, RunFiles, RunStart, VMRecord
from kdlabd.core.observers import Observers
from kdlabd.core.vms import VMService

log = structlog.get_logger(__name__)

FILE_SECONDS = 10.0
POLL_SECONDS = 1.0
"""How often a recording's length and size are read while it records."""
POOL_RESERVE = 256 << 20
"""A recording ends (truncated) when its pool's filesystem has less free."""
DEFAULT_SNAPSHOT_INTERVAL = 1.0
AUTO_SNAPSHOT_PREFIX = "kdlab-auto-"
SIDECAR_SUFFIX = sidecars.SUFFIX
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class RecordingRecord:
    """One recording: what its properties show."""

    id: str
    vm: str
    vm_uuid: str
    owner_uid: int
    kernel_release: str
    cmdline: str
    qemu: str
    fingerprint: tuple[tuple[str, str], ...]
    created_usec: int
    instructions: int = 0
    seconds: float = 0.0
    ended: str = ""
    truncated: bool = False
    size: int = 0
    state: str = wire.RECORDING_STATE_RECORDING


_SIDECAR_FIELDS = (
    "id",
    "vm",
    "vm_uuid",
    "owner_uid",
    "kernel_release",
    "cmdline",
    "qemu",
    "fingerprint",
    "created_usec",
    "instructions",
    "seconds",
    "ended",
    "truncated",
    "state",
)


def sidecar(record: RecordingRecord) -> bytes:
    """The JSON kdlabd keeps next to a recording (its state says whether
    the run still records)."""
    return sidecars.encode(record, _SIDECAR_FIELDS)


def from_sidecar(text: bytes, size: int) -> RecordingRecord | None:
    """The recording a sidecar describes; None when torn or foreign."""
    fields = sidecars.decode(text, _SIDECAR_FIELDS)
    try:
        if fields is None:
            return None
        fields["fingerprint"] = tuple(
            (str(k), str(v)) for k, v in fields["fingerprint"]
        )
        record = RecordingRecord(**fields)
    except (ValueError, TypeError):
        return None
    if not isinstance(record.owner_uid, int) or not _NAME.fullmatch(record.id):
        return None
    return replace(record, size=size)


DISK_KEY = "disk-contents:"
DISK_DIGEST_SECONDS = 120.0
"""Time limit of hashing a VM's disk overlay (its data only, not the image
under it) when a recording begins and when it is replayed."""


def _disk_digests(fingerprint: checkpoints.Fingerprint) -> dict[str, str]:
    return {
        key.removeprefix(DISK_KEY): value
        for key, value in fingerprint
        if key.startswith(DISK_KEY)
    }


class RecordingObserver(Protocol):
    """Told about every recording added, changed or removed (the bus exports)."""

    def recording_added(self, recording: RecordingRecord) -> None: ...

    def recording_changed(self, recording: RecordingRecord) -> None: ...

    def recording_removed(self, recording: RecordingRecord) -> None: ...


def check_recordable(vm: VMRecord, *, single_cpu: bool) -> None:
    """Refuse, up front and by name, what QEMU's record/replay cannot do."""
    name, spec = vm.name, vm.spec
    if spec.accel is Accel.KVM:
        raise NotRecordable(
            f"VM {name!r} runs under KVM: QEMU records only TCG guests (every "
            "instruction counted). Create a VM with --accel tcg to record it"
        )
    if spec.vcpus > 1 and not single_cpu:
        raise NotRecordable(
            f"VM {name!r} has {spec.vcpus} vCPUs: QEMU records one. Record it "
            "with one (kdlabctl record --single-cpu) or create it with --vcpus 1"
        )
    if spec.shares:
        raise NotRecordable(
            f"VM {name!r} has shares ({', '.join(s.tag for s in spec.shares)}): "
            "their virtiofsd reads and writes the guest's memory outside QEMU's "
            "record/replay. Record a VM without --share"
        )
    old = [d.target for d in spec.disks if d.base is None and d.base_image]
    if old:
        raise NotRecordable(
            f"VM {name!r} has disks defined before kdlab wrote their chain "
            f"({', '.join(old)}): recreate the VM (kdlabctl delete, create) to "
            "record it"
        )


def auto_snapshots(info: str) -> list[str]:
    """The snapshots kdlabd took during replays, from HMP ``info snapshots``."""
    return sorted(set(re.findall(rf"\b({AUTO_SNAPSHOT_PREFIX}\d+)\b", info)))


class RecordingService:
    """The recordings kdlab keeps, the runs that record them and replay them."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        *,
        host: Host,
        vms: VMService,
        limits: Limits | None = None,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._hv = hypervisor
        self._host = host
        self._vms = vms
        self._limits = limits or Limits()
        self._poll_seconds = poll_seconds
        self._recordings: dict[str, RecordingRecord] = {}
        self._observers: Observers[RecordingObserver] = Observers()
        self._runs: dict[str, asyncio.Task[None]] = {}  # VM name: its run's task
        self._reserved: set[str] = set()  # ids of recordings being made

    def subscribe(self, observer: RecordingObserver) -> Callable[[], None]:
        return self._observers.subscribe(observer)

    def list(self) -> list[RecordingRecord]:
        return sorted(self._recordings.values(), key=lambda r: (r.created_usec, r.id))

    def get(self, recording_id: str) -> RecordingRecord:
        try:
            return self._recordings[recording_id]
        except KeyError:
            raise NoSuchRecording(
                f"no recording {recording_id!r} (see: kdlabctl recording list)"
            ) from None

    # --- the view --------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the view from the pool; resume following the runs that
        still record (kdlabd restarted while they ran); remove the rest."""
        volumes = await self._hv.list_recording_volumes()
        recording_now = {
            vm.boot.run.recording: vm
            for vm in self._vms.list()
            if vm.state.active
            and vm.boot.run is not None
            and vm.boot.run.mode == wire.RUN_RECORD
        }
        for volume, (path, _size) in volumes.items():
            if not volume.endswith(".rr"):
                continue
            recording_id = volume.removesuffix(".rr")
            size = sum(s for v, (_p, s) in volumes.items() if v.startswith(volume[:-2]))
            record = await self._read_sidecar(path.with_suffix(SIDECAR_SUFFIX), size)
            if record is None:
                log.warning("recording.partial_removed", recording=recording_id)
                await self._remove_files(recording_id)
                continue
            self._store(record)
            if record.state == wire.RECORDING_STATE_RECORDING:
                # kdlabd restarted while it recorded: follow the run on, or
                # finish the recording of a run that ended meanwhile.
                files = await self._hv.recording_files(recording_id)
                vm = recording_now.get(recording_id)
                self._follow(
                    record.vm if vm is None else vm.name,
                    self._recording(record.vm, record, files),
                )
        log.info("recordings.loaded", count=len(self._recordings))

    # --- recording -------------------------------------------------------------

    async def record(
        self,
        name: str,
        *,
        recording: str = "",
        paused: bool = False,
        single_cpu: bool = False,
    ) -> RecordingRecord:
        """Start the stopped VM *name* recording; the recording ends when it stops."""
        vm = self._vms.get(name)
        if vm.state.active:
            raise InvalidState(f"VM {name!r} is {vm.state}: stop it, then record it")
        check_recordable(vm, single_cpu=single_cpu)
        recording_id = recording or self._new_id(name)
        if not _NAME.fullmatch(recording_id):
            raise InvalidArgument(
                f"bad recording name {recording_id!r}: 1-63 of A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit"
            )
        if recording_id in self._recordings or recording_id in self._reserved:
            raise InvalidArgument(
                f"a recording {recording_id!r} exists: name another (--as) or "
                f"delete it (kdlabctl recording delete {recording_id})"
            )
        await self._room_for(vm.spec.owner_uid)
        spec = vm.spec
        # The id is taken from here: a second Record of the same name while
        # this one awaits must not make (or delete) the same files.
        self._reserved.add(recording_id)
        try:
            files = await self._hv.create_recording_files(recording_id, spec.disks)
            record = RecordingRecord(
                id=recording_id,
                vm=name,
                vm_uuid=vm.uuid,
                owner_uid=spec.owner_uid,
                kernel_release=spec.release,
                cmdline=spec.effective_cmdline,
                qemu=await self._qemu_build(),
                fingerprint=await self._fingerprint(vm),
                created_usec=time.time_ns() // 1000,
            )
            self._store(record)
            run = RunStart(Run(wire.RUN_RECORD, recording_id), files)
            # The sidecar names the recording from its start: a kdlabd that
            # restarts meanwhile follows the run on (load).
            await self._write_sidecar(files, record)
            await self._vms.start(name, paused=paused, run=run)
        except BaseException:
            # Nothing of a recording that did not start stays.
            self._forget(recording_id)
            await self._remove_files(recording_id)
            raise
        finally:
            self._reserved.discard(recording_id)
        self._follow(name, self._recording(name, record, files))
        log.info("recording.started", vm=name, recording=recording_id)
        return record

    async def _recording(
        self, name: str, record: RecordingRecord, files: RunFiles
    ) -> None:
        """Follow a recording run: its length and size, the owner's limit;
        finish the recording when the VM stops."""
        started = time.monotonic()
        truncated = panicked = False
        vm: VMRecord | None = None
        while True:
            with contextlib.suppress(KdlabError):  # a VM deleted meanwhile
                vm = self._vms.get(name)
            running = (
                vm is not None
                and vm.state.active
                and vm.boot.run == Run(wire.RUN_RECORD, record.id)
            )
            panicked = panicked or (vm is not None and panic_reason(vm) is not None)
            size = await self._size(files)
            if running:
                with contextlib.suppress(KdlabError):
                    position = await self._hv.run_position(name)
                    record = replace(record, instructions=position)
            record = replace(
                record, size=size, seconds=round(time.monotonic() - started, 3)
            )
            self._store(record)
            if not running:
                break
            if not truncated and await self._out_of_room(record, size):
                log.warning("recording.limit", vm=name, recording=record.id)
                truncated = True
                with contextlib.suppress(KdlabError):
                    await self._vms.stop(name, force=True)
            await asyncio.sleep(self._poll_seconds)
        ended = (
            wire.RECORDING_ENDED_LIMIT
            if truncated
            else wire.RECORDING_ENDED_PANIC
            if panicked
            else wire.RECORDING_ENDED_STOP
        )
        done = replace(
            record,
            ended=ended,
            truncated=truncated,
            state=wire.RECORDING_STATE_COMPLETE,
        )
        await self._write_sidecar(files, done)
        self._store(done)
        log.info("recording.complete", recording=done.id, ended=ended, size=size)

    # --- replaying -------------------------------------------------------------

    async def replay(
        self,
        name: str,
        recording_id: str,
        *,
        snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL,
    ) -> RecordingRecord:
        """Start the stopped VM replaying *recording_id*, paused before the
        first instruction; snapshots every *snapshot_interval* s of replay."""
        if snapshot_interval < 0:
            raise InvalidArgument("snapshot_interval must be 0 (none) or more")
        vm = self._vms.get(name)
        record = self.get(recording_id)
        if record.vm_uuid != vm.uuid:
            raise NoSuchRecording(
                f"recording {recording_id!r} is of VM {record.vm!r}, not of {name!r}"
            )
        if record.state != wire.RECORDING_STATE_COMPLETE:
            raise InvalidState(
                f"recording {recording_id!r} is still being recorded: stop VM "
                f"{name!r} first"
            )
        if vm.state.active:
            raise InvalidState(f"VM {name!r} is {vm.state}: stop it, then replay")
        await self._check_unchanged(vm, record)
        targets = [d.target for d in vm.spec.disks]
        files = await self._hv.recording_files(recording_id, targets)
        run = RunStart(Run(wire.RUN_REPLAY, recording_id), files)
        await self._vms.start(name, paused=True, run=run)
        self._follow(name, self._replaying(name, run.run, snapshot_interval))
        log.info("replay.started", vm=name, recording=recording_id)
        return record

    async def _check_unchanged(self, vm: VMRecord, record: RecordingRecord) -> None:
        now = await self._fingerprint(vm)
        changed = checkpoints.changes(record.fingerprint, now)
        then_disks, now_disks = _disk_digests(record.fingerprint), _disk_digests(now)
        changed += [
            f"the disk {target} was written since (a boot that did not record)"
            for target in sorted(then_disks)
            if then_disks[target] != now_disks.get(target)
        ]
        qemu = await self._qemu_build()
        if qemu != record.qemu:
            changed.append(f"QEMU (recorded by {record.qemu}, now {qemu})")
        if changed:
            raise RecordingMismatch(
                f"VM {vm.name!r} changed since recording {record.id!r}: "
                f"{'; '.join(changed)}. A replay needs the same kernel, initrd, "
                "command line, devices and QEMU build: record it again"
            )

    async def _replaying(self, name: str, run: Run, interval: float) -> None:
        """While the replay runs: drop the last replay's snapshots, then take
        one every *interval* seconds the guest ran (gdb stopped it otherwise)."""
        with contextlib.suppress(KdlabError):
            info = await self._hv.monitor(name, "info snapshots")
            for tag in auto_snapshots(info):
                await self._hv.monitor(name, f"delvm {tag}")
        n = 0
        ran = 0.0
        while True:
            await asyncio.sleep(min(self._poll_seconds, interval or self._poll_seconds))
            vm = self._vms.get(name)
            if not vm.state.active or vm.boot.run != run:
                return
            if interval <= 0 or vm.state is not VMState.RUNNING:
                continue
            ran += min(self._poll_seconds, interval)
            if ran >= interval:
                ran = 0.0
                n += 1
                with contextlib.suppress(KdlabError):
                    await self._hv.monitor(name, f"savevm {AUTO_SNAPSHOT_PREFIX}{n}")

    # --- deleting --------------------------------------------------------------

    async def delete(self, recording_id: str) -> None:
        record = self.get(recording_id)
        for vm in self._vms.list():
            if vm.state.active and vm.boot.run and vm.boot.run.recording == record.id:
                raise InvalidState(
                    f"VM {vm.name!r} is using recording {record.id!r}: stop it first"
                )
        await self._remove_files(recording_id)
        self._forget(recording_id)

    async def close(self) -> None:
        """kdlabd stops: the runs go on; the next kdlabd follows them (load)."""
        tasks = list(self._runs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- helpers ---------------------------------------------------------------

    async def _write_sidecar(self, files: RunFiles, record: RecordingRecord) -> None:
        path = files.log.with_suffix(SIDECAR_SUFFIX)
        await sidecars.write(self._host, path, sidecar(record))

    async def _fingerprint(self, vm: VMRecord) -> checkpoints.Fingerprint:
        """The VM's fingerprint (as a checkpoint's) and its disks' contents:
        a replay reads the disks as they were when the recording began."""
        facts = await checkpoints.fingerprint(self._host, vm.spec)
        for disk in vm.spec.disks:
            path = disk.path
            try:
                digest = await blocking.run(
                    lambda: self._host.digest(path),  # noqa: B023 (awaited here)
                    seconds=DISK_DIGEST_SECONDS,
                    what=f"reading {disk.path}",
                )
            except (OSError, blocking.Unanswered) as err:
                raise HypervisorError(
                    f"cannot read VM {vm.name!r}'s disk {disk.target}: {err}"
                ) from None
            facts += ((f"{DISK_KEY}{disk.target}", digest),)
        return facts

    async def _qemu_build(self) -> str:
        """The QEMU build (version, binary's SHA-256): a recording replays on
        the one that recorded it only."""
        version, path = await self._hv.emulator()
        try:
            digest = await blocking.run(
                lambda: self._host.digest(path),
                seconds=FILE_SECONDS,
                what=f"reading {path}",
            )
        except (OSError, blocking.Unanswered):
            digest = "unknown"
        return f"{version} ({path} sha256:{digest[:16]})"

    def _follow(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Follow VM *name*'s run with *work* (one at a time per VM)."""
        old = self._runs.pop(name, None)
        if old is not None:
            old.cancel()
        task = asyncio.get_running_loop().create_task(work)
        self._runs[name] = task
        task.add_done_callback(lambda t: _log_failure(name, t))

    def _new_id(self, name: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        recording_id, n = f"{name}-{stamp}", 1
        while recording_id in self._recordings:
            n += 1
            recording_id = f"{name}-{stamp}-{n}"
        return recording_id

    async def _out_of_room(self, record: RecordingRecord, size: int) -> bool:
        """Whether the run must end: the owner's recordings reached
        max_disk_gib, or the pool's filesystem is nearly full."""
        used = sum(
            r.size
            for r in self._recordings.values()
            if r.owner_uid == record.owner_uid and r.id != record.id
        )
        if size > self._limits.disk_gib * GIB - used:
            return True
        with contextlib.suppress(KdlabError):
            return await self._hv.recording_pool_free() < POOL_RESERVE
        return False

    async def _room_for(self, uid: int) -> None:
        used = sum(r.size for r in self._recordings.values() if r.owner_uid == uid)
        if used >= self._limits.disk_gib * GIB:
            raise LimitExceeded(
                f"uid {uid}'s recordings take {used >> 20} MiB, the limit of "
                f"{self._limits.disk_gib} GiB (configuration key max_disk_gib): "
                "delete recordings first (kdlabctl recording delete ID)"
            )

    async def _size(self, files: RunFiles) -> int:
        def sizes() -> int:
            total = 0
            for path in (files.log, files.state, *(p for _t, p in files.disks)):
                with contextlib.suppress(OSError):
                    total += self._host.file_size(path)
            return total

        try:
            return await blocking.run(
                sizes, seconds=FILE_SECONDS, what="reading a recording's size"
            )
        except blocking.Unanswered:
            return 0

    async def _read_sidecar(self, path: Path, size: int) -> RecordingRecord | None:
        text = await sidecars.read(self._host, path)
        return None if text is None else from_sidecar(text, size)

    async def _remove_files(self, recording_id: str) -> None:
        """Delete the recording's volumes: its sidecar first (then it is no
        longer a recording), then the log, the state and the disk overlays."""
        volumes = await self._hv.list_recording_volumes()
        mine = sorted(
            (v for v in volumes if v.startswith(f"{recording_id}.")),
            key=lambda v: not v.endswith(SIDECAR_SUFFIX),
        )
        for volume in mine:
            await self._hv.delete_recording_volume(volume)

    def _store(self, record: RecordingRecord) -> None:
        old = self._recordings.get(record.id)
        if old == record:
            return
        self._recordings[record.id] = record
        for observer in self._observers:
            if old is None:
                observer.recording_added(record)
            else:
                observer.recording_changed(record)

    def _forget(self, recording_id: str) -> None:
        record = self._recordings.pop(recording_id, None)
        if record is not None:
            for observer in self._observers:
                observer.recording_removed(record)


def _log_failure(name: str, task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("recording.run_failed", vm=name, error=repr(task.exception()))
