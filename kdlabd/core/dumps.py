"""Post-mortem dumps: a memory dump of a VM's guest, written when its kernel
panics or on request, kept like an image and owned by the VM's owner.

The file is written by libvirt (``virDomainCoreDumpWithFormat``, memory only)
into kdlab's dumps pool, a libvirt directory pool; kdlabd names it, never a
caller. What libvirt cannot keep about a volume (the VM, the reason, the
panic's headline, the vmlinux hints) is a JSON sidecar, ``ID.json``, that
kdlabd writes next to the dump once libvirt has finished it: the sidecar is
the mark of a complete dump. A dump file without one (kdlabd or libvirtd died
while it was written) is removed at start-up (:meth:`DumpService.reconcile`),
so a partial dump never shows; the pool stays the one place dumps live.

Panics are seen two ways: the hypervisor reports the guest's pvpanic device
(:attr:`VMRecord.panicked`: QEMU keeps the guest stopped), and, for kernels
without a pvpanic driver, the VM's boot diagnosis finds a panic on the
console (then kdlabd pauses the VM itself). Both lead to
:meth:`DumpService.panicked`, which writes one dump per boot: a panic seen
both ways, or seen again after a restart of kdlabd, is one panic. An Oops the
kernel survives is not dumped (the guest keeps running, and gdb can look at
it live); an Oops that ends in a panic (panic_on_oops, or an Oops in
interrupt context) is dumped with reason "oops".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import structlog

from kdlab import wire
from kdlab.errors import (
    HypervisorError,
    InvalidState,
    KdlabError,
    LimitExceeded,
    NoSuchDump,
)
from kdlab.kernel import vmcore
from kdlab.kernel.diagnosis import Code, Diagnosis
from kdlab.states import VMState
from kdlabd.core import blocking, descriptors, sidecars
from kdlabd.core.host import Host
from kdlabd.core.hypervisor import Hypervisor
from kdlabd.core.jobs import Job, JobManager, finish_on_cancel
from kdlabd.core.journal import hold_point
from kdlabd.core.limits import GIB, Limits
from kdlabd.core.models import VMRecord
from kdlabd.core.observers import Observers
from kdlabd.core.tasks import Background

log = structlog.get_logger(__name__)

MIB = 1 << 20
FILE_SECONDS = 10.0
"""Time limit of reading or writing kdlabd's own files in the dumps pool."""
HEADLINE_SECONDS = 10.0
"""How long a panic's dump waits for the console's diagnosis to name the panic."""
SIDECAR_SUFFIX = sidecars.SUFFIX
_SUFFIXES = {wire.DUMP_FORMAT_ELF: ".core", wire.DUMP_FORMAT_KDUMP_ZLIB: ".kdump"}
_AUTOMATIC = (wire.DUMP_REASON_PANIC, wire.DUMP_REASON_OOPS)
_PUBLIC_HEADLINES = {
    wire.DUMP_REASON_PANIC: "The kernel panicked.",
    wire.DUMP_REASON_OOPS: "The kernel oopsed, then panicked.",
}
PANIC_LINE = "Kernel panic - not syncing"
"""How the kernel's panic line starts on the console."""
THEN_PANICKED = "the kernel then panicked"
"""What an Oops's diagnosis says when a panic followed it (see crashes.py)."""
NO_VMCOREINFO = (
    "the dump carries no VMCOREINFO: the guest kernel did not tell QEMU where it "
    "is. Build it with CONFIG_FW_CFG_SYSFS=y (kdlabctl kernel configure "
    "--minimal does), or load the qemu_fw_cfg module from the initramfs"
)


@dataclass(frozen=True)
class DumpRecord:
    """One dump: what its properties show. *headline* quotes the guest's console
    and is shown only to those who may read it (:attr:`public_headline` is not)."""

    id: str
    vm: str
    vm_uuid: str
    owner_uid: int
    kernel_release: str
    vmlinux_hint: str
    reason: str
    headline: str
    created_usec: int
    format: str
    volume: str
    build_id: str = ""
    vmcoreinfo: bool = False
    size: int = 0
    state: str = wire.DUMP_STATE_WRITING

    @property
    def automatic(self) -> bool:
        return self.reason in _AUTOMATIC

    @property
    def public_headline(self) -> str:
        return _PUBLIC_HEADLINES.get(self.reason, f"Requested by uid {self.owner_uid}.")

    @property
    def problem(self) -> str:
        complete = self.state == wire.DUMP_STATE_COMPLETE
        return NO_VMCOREINFO if complete and not self.vmcoreinfo else ""


_SIDECAR_FIELDS = (
    "id",
    "vm",
    "vm_uuid",
    "owner_uid",
    "kernel_release",
    "vmlinux_hint",
    "reason",
    "headline",
    "created_usec",
    "format",
    "volume",
    "build_id",
    "vmcoreinfo",
)


def sidecar(record: DumpRecord) -> bytes:
    """The JSON kdlabd keeps next to a complete dump."""
    return sidecars.encode(record, _SIDECAR_FIELDS)


def from_sidecar(text: bytes, size: int) -> DumpRecord | None:
    """The complete dump a sidecar describes; None when it is torn or not kdlab's."""
    fields = sidecars.decode(text, _SIDECAR_FIELDS)
    try:
        record = None if fields is None else DumpRecord(**fields)
    except TypeError:
        return None
    if record is None:
        return None
    if not isinstance(record.owner_uid, int) or not isinstance(record.id, str):
        return None
    return replace(record, size=size, state=wire.DUMP_STATE_COMPLETE)


class DumpObserver(Protocol):
    """Told about every dump added, changed or removed (the bus exports objects)."""

    def dump_added(self, dump: DumpRecord) -> None: ...

    def dump_changed(self, dump: DumpRecord) -> None: ...

    def dump_removed(self, dump: DumpRecord) -> None: ...


StopVM = Callable[[str], Awaitable[object]]
"""Powers a VM off at once (VMService.stop with force)."""


def panic_reason(record: VMRecord) -> str | None:
    """ "panic" or "oops" when the VM's kernel has panicked; None otherwise."""
    diagnosis = record.diagnosis
    # A panic the diagnosis explains further (init died, no root) is a panic
    # too: its evidence holds the kernel's panic line.
    from_console = diagnosis is not None and (
        diagnosis.code is Code.KERNEL_PANIC
        or any(PANIC_LINE in line for line in diagnosis.evidence)
    )
    oopsed = diagnosis is not None and diagnosis.code in (
        Code.KERNEL_OOPS,
        Code.KERNEL_BUG,
    )
    if oopsed and diagnosis is not None and THEN_PANICKED in diagnosis.problem:
        return wire.DUMP_REASON_OOPS
    if record.panicked:
        return wire.DUMP_REASON_OOPS if oopsed else wire.DUMP_REASON_PANIC
    return wire.DUMP_REASON_PANIC if from_console else None


def full_headline(diagnosis: Diagnosis | None) -> str:
    """The console's panic or Oops line, as the diagnosis found it."""
    if diagnosis is None:
        return ""
    for line in diagnosis.evidence:
        if PANIC_LINE in line:  # after printk's timestamp, if any
            return line[line.index(PANIC_LINE) :]
    return diagnosis.evidence[0] if diagnosis.evidence else diagnosis.problem


class DumpService:
    """The dumps kdlab keeps, the panics it dumps, and the dumps asked for."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        *,
        host: Host,
        jobs: JobManager,
        stop_vm: StopVM,
        limits: Limits | None = None,
        headline_seconds: float = HEADLINE_SECONDS,
    ) -> None:
        self._hv = hypervisor
        self._headline_seconds = headline_seconds
        self._host = host
        self._jobs = jobs
        self._stop_vm = stop_vm
        self._limits = limits or Limits()
        self._dumps: dict[str, DumpRecord] = {}
        self._observers: Observers[DumpObserver] = Observers()
        self._writing: set[str] = set()  # VM names with a dump under way
        self._handled: set[str] = set()  # VM names whose boot's panic is handled
        # The console's panic line of each VM's boot, once its diagnosis has it
        # (pvpanic may tell of the panic before the console is diagnosed).
        self._headlines: dict[str, str] = {}
        # Every id this kdlabd gave or found: never reused, even once deleted
        # (ids of one second get -2, -3...; a restart takes over a second).
        self._issued: set[str] = set()
        self._background = Background("dumps.panic_failed")

    def subscribe(self, observer: DumpObserver) -> Callable[[], None]:
        """Tell *observer* of every dump added, changed or removed from now on;
        returns the function that ends the subscription."""
        return self._observers.subscribe(observer)

    # --- the view --------------------------------------------------------------

    async def load(self) -> None:
        """Rebuild the view from the pool: complete dumps only (see reconcile)."""
        found: dict[str, DumpRecord] = {}
        for volume, (path, size) in (await self._hv.list_dump_volumes()).items():
            if volume.endswith(SIDECAR_SUFFIX):
                continue
            record = await self._read_sidecar(path, size)
            if record is not None and record.volume == volume:
                found[record.id] = record
        for dump_id, record in list(self._dumps.items()):
            if dump_id not in found and record.state == wire.DUMP_STATE_COMPLETE:
                self._forget(dump_id)
        for record in found.values():
            self._store(record)
        log.info("dumps.loaded", count=len(found))

    async def reconcile(self) -> list[str]:
        """At start-up: remove dump files without a sidecar (written when kdlabd
        or libvirtd died) and sidecars without a dump (one deleted by hand)."""
        removed = []
        volumes = await self._hv.list_dump_volumes()
        kept = {r.volume for r in self._dumps.values()}
        for volume, (path, _size) in volumes.items():
            if volume.endswith(SIDECAR_SUFFIX):
                dump = path.with_suffix("")
                if not any(v.startswith(dump.name + ".") for v in kept):
                    await self._remove_file(path)
                    removed.append(volume)
            elif volume not in kept:
                await self._hv.delete_dump_volume(volume)
                removed.append(volume)
        if removed:
            log.warning("reconcile.removed_partial_dumps", removed=removed)
        return removed

    def list(self) -> list[DumpRecord]:
        return sorted(self._dumps.values(), key=lambda d: (d.created_usec, d.id))

    def get(self, dump_id: str) -> DumpRecord:
        try:
            return self._dumps[dump_id]
        except KeyError:
            raise NoSuchDump(f"no dump {dump_id!r} (see: kdlabctl dump list)") from None

    def latest(self, vm: VMRecord) -> DumpRecord | None:
        """The newest dump of *vm* (this VM, not an older one of its name)."""
        mine = [d for d in self.list() if d.vm_uuid == vm.uuid]
        return mine[-1] if mine else None

    # --- operations ------------------------------------------------------------

    async def open(self, dump_id: str) -> int:
        """A read-only, seekable descriptor of the complete dump *dump_id*."""
        record = self._complete(dump_id, "read")
        descriptors.require(self._host.free_descriptors(), "a dump")
        path = await self._hv.dump_volume_path(record.volume)
        try:
            return await blocking.run(
                lambda: self._host.open_read_only(path),
                seconds=FILE_SECONDS,
                what=f"opening {path}",
            )
        except FileNotFoundError:
            raise NoSuchDump(f"dump {dump_id!r} is gone from the dumps pool") from None
        except blocking.Unanswered:
            raise HypervisorError(
                f"the dump {dump_id!r} did not open within {FILE_SECONDS:g} s: the "
                "dumps pool's filesystem does not answer"
            ) from None

    async def delete(self, dump_id: str) -> None:
        record = self._complete(dump_id, "delete")
        await self._remove(record)

    async def take(
        self,
        vm: VMRecord,
        *,
        compress: bool = False,
        reason: str = wire.DUMP_REASON_REQUESTED,
        headline: str = "",
    ) -> tuple[DumpRecord, Job]:
        """Start writing a dump of *vm* (running or paused) as a job.

        Checked first: the VM's state, one dump at a time per VM, room in
        the pool and under the owner's limit; automatic dumps first drop the
        oldest automatic ones of the VM beyond max_dumps_per_vm.
        """
        name = vm.name
        if not vm.state.active or vm.state is VMState.STOPPING:
            raise InvalidState(
                f"VM {name!r} is {vm.state}: only a running or paused VM can be dumped"
            )
        if name in self._writing:
            raise InvalidState(f"a dump of VM {name!r} is already being written")
        automatic = reason in _AUTOMATIC
        if not automatic:
            self._limits.room_for_job(
                vm.spec.owner_uid, self._jobs.running_of(vm.spec.owner_uid)
            )
        self._writing.add(name)
        try:
            if automatic:
                await self._drop_oldest(vm)
            expected = await self._room_for(vm)
            record = self._new_record(
                vm, compress=compress, reason=reason, headline=headline
            )
        except BaseException:
            self._writing.discard(name)
            raise
        self._store(record)
        log.info(
            "dump.started",
            dump=record.id,
            vm=name,
            reason=reason,
            expected_mib=expected // MIB,
        )

        async def work(job: Job) -> None:
            try:
                await self._write(record, vm, job)
            except BaseException:
                await finish_on_cancel(self._discard(record))
                raise
            finally:
                self._writing.discard(name)

        job = self._jobs.start(wire.JOB_KIND_DUMP, record.id, vm.spec.owner_uid, work)
        return record, job

    async def _write(self, record: DumpRecord, vm: VMRecord, job: Job) -> None:
        total = vm.spec.memory_mib * MIB

        def progress(done: int, of: int) -> None:
            # Called on the loop once libvirt's dump is under way.
            of = of or total
            job.report(0.95 * done / of, f"writing: {done >> 20} of {of >> 20} MiB")

        job.report(0.0, f"writing the dump of {vm.name}")
        await hold_point("dump.writing")
        path = await finish_on_cancel(
            self._hv.dump_vm(
                vm.name,
                record.volume,
                compressed=record.format == wire.DUMP_FORMAT_KDUMP_ZLIB,
                memory_mib=vm.spec.memory_mib,
                progress=progress,
            )
        )
        job.report(0.96, "reading its VMCOREINFO")
        size, info = await blocking.run(
            lambda: (
                self._host.file_size(path),
                vmcore.vmcoreinfo(
                    lambda offset, size: self._host.read_range(path, offset, size)
                ),
            ),
            seconds=FILE_SECONDS,
            what=f"reading {path}",
        )
        done = replace(
            record,
            headline=record.headline or await self._panic_headline(record),
            size=size,
            vmcoreinfo=info is not None,
            build_id=vmcore.build_id(info or ""),
            kernel_release=vmcore.release(info or "") or record.kernel_release,
            state=wire.DUMP_STATE_COMPLETE,
        )
        # The sidecar marks the dump complete: written last, atomically.
        await sidecars.write(self._host, _sidecar_path(path), sidecar(done))
        self._store(done)
        job.report(1.0, f"dump {done.id} written ({size >> 20} MiB)")
        log.info("dump.complete", dump=done.id, size=size, vmcoreinfo=done.vmcoreinfo)

    # --- panics ----------------------------------------------------------------

    def vm_added(self, record: VMRecord) -> None:
        self.vm_changed(record)

    def vm_changed(self, record: VMRecord) -> None:
        """A VM's view changed: a new boot forgets the last panic; a panic of
        this boot is handled once."""
        if not record.state.active or record.state is VMState.STARTING:
            self._handled.discard(record.name)
            self._headlines.pop(record.name, None)
            return
        run = record.boot.run
        if run is not None and run.mode == wire.RUN_REPLAY:
            return  # the recording's panic again: its dump exists (or was not)
        headline = full_headline(record.diagnosis)
        if headline:
            self._headlines[record.name] = headline
        reason = panic_reason(record)
        if reason is None or record.name in self._handled:
            return
        self._handled.add(record.name)
        self._background.start(self.panicked(record, reason))

    def vm_removed(self, name: str) -> None:
        self._handled.discard(name)
        self._headlines.pop(name, None)

    async def panicked(self, vm: VMRecord, reason: str) -> None:
        """Act on the panic of *vm*'s kernel as its OnPanic says."""
        name, on_panic = vm.name, vm.spec.on_panic
        if await self._hv.panic_handled(name):
            return  # dumped before kdlabd restarted
        log.warning("vm.panicked", vm=name, reason=reason, on_panic=on_panic)
        if on_panic == wire.ON_PANIC_IGNORE:
            return
        if not vm.panicked:  # seen on the console: stop the CPUs where they are
            with contextlib.suppress(KdlabError):
                await self._hv.suspend_vm(name)
        stop = on_panic == wire.ON_PANIC_DUMP_AND_STOP
        try:
            _record, job = await self.take(
                vm, reason=reason, headline=full_headline(vm.diagnosis)
            )
            await self._jobs.wait(job.id)
            await self._hv.mark_panic_handled(name)
        except asyncio.CancelledError:
            # kdlabd stops: the VM stays as the panic left it, and the next
            # kdlabd finds the panic not handled and dumps it.
            stop = False
            raise
        finally:
            if stop:
                await self._stop_vm(name)

    async def close(self) -> None:
        """kdlabd stops: panics being handled are left to the next start
        (before the hypervisor's connection closes under them)."""
        await self._background.close()

    # --- helpers ---------------------------------------------------------------

    async def _panic_headline(self, record: DumpRecord) -> str:
        """The panic line of an automatic dump's VM, which pvpanic may have
        reported before the console's diagnosis found it: waited for a while."""
        if not record.automatic:
            return ""
        deadline = time.monotonic() + self._headline_seconds
        while record.vm not in self._headlines and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return self._headlines.get(record.vm, "")

    def _complete(self, dump_id: str, what: str) -> DumpRecord:
        record = self.get(dump_id)
        if record.state != wire.DUMP_STATE_COMPLETE:
            raise InvalidState(
                f"dump {dump_id!r} is still being written: wait for its job, then "
                f"{what} it"
            )
        return record

    def _new_record(
        self, vm: VMRecord, *, compress: bool, reason: str, headline: str
    ) -> DumpRecord:
        now = time.time_ns() // 1000
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now / 1e6))
        dump_id, n = f"{vm.name}-{stamp}", 1
        while dump_id in self._dumps or dump_id in self._issued:
            n += 1
            dump_id = f"{vm.name}-{stamp}-{n}"
        self._issued.add(dump_id)
        fmt = wire.DUMP_FORMAT_KDUMP_ZLIB if compress else wire.DUMP_FORMAT_ELF
        spec = vm.spec
        return DumpRecord(
            id=dump_id,
            vm=vm.name,
            vm_uuid=vm.uuid,
            owner_uid=spec.owner_uid,
            kernel_release=spec.release,
            vmlinux_hint=spec.vmlinux or spec.kernel_path or spec.tree,
            reason=reason,
            headline=headline,
            created_usec=now,
            format=fmt,
            volume=dump_id + _SUFFIXES[fmt],
        )

    async def _room_for(self, vm: VMRecord) -> int:
        """The bytes a dump of *vm* needs, refused when the pool or the owner's
        limit has not that much room."""
        expected = vm.spec.memory_mib * MIB + MIB  # memory, and the headers
        uid = vm.spec.owner_uid
        used = sum(d.size for d in self._dumps.values() if d.owner_uid == uid)
        limit = self._limits.dump_gib_per_user * GIB
        if used + expected > limit:
            raise LimitExceeded(
                f"uid {uid}'s dumps take {used >> 20} MiB; a dump of VM {vm.name!r} "
                f"needs about {expected >> 20} MiB more, over the limit of "
                f"{self._limits.dump_gib_per_user} GiB (configuration key "
                "max_dump_gib_per_user): delete dumps first (kdlabctl dump delete ID)"
            )
        free = await self._hv.dump_pool_free()
        if expected > free:
            raise LimitExceeded(
                f"the dumps pool has {free >> 20} MiB free; a dump of VM {vm.name!r} "
                f"({vm.spec.memory_mib} MiB of memory) needs about "
                f"{expected >> 20} MiB: delete dumps (kdlabctl dump delete ID) or "
                "free space on the pool's filesystem"
            )
        return expected

    async def _drop_oldest(self, vm: VMRecord) -> None:
        """Make room for one more automatic dump of *vm*: max_dumps_per_vm."""
        automatic = [
            d
            for d in self.list()
            if d.vm_uuid == vm.uuid
            and d.automatic
            and d.state == wire.DUMP_STATE_COMPLETE
        ]
        excess = len(automatic) + 1 - self._limits.dumps_per_vm
        for old in automatic[: max(0, excess)]:
            log.info("dump.dropped", dump=old.id, vm=vm.name)
            await self._remove(old)

    async def _remove(self, record: DumpRecord) -> None:
        """Delete a dump: its sidecar first (so it is no longer complete), then
        the volume; the object goes."""
        path = await self._hv.dump_volume_path(record.volume)
        await self._remove_file(_sidecar_path(path))
        await self._hv.delete_dump_volume(record.volume)
        self._forget(record.id)

    async def _discard(self, record: DumpRecord) -> None:
        """A dump that failed or was cancelled: nothing of it stays."""
        try:
            await self._hv.delete_dump_volume(record.volume)
        except KdlabError as err:  # removed at the next start-up (reconcile)
            log.error("dump.discard_failed", dump=record.id, error=str(err))
        self._forget(record.id)

    async def _remove_file(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            await blocking.run(
                lambda: self._host.remove_file(path),
                seconds=FILE_SECONDS,
                what=f"removing {path}",
            )

    async def _read_sidecar(self, dump: Path, size: int) -> DumpRecord | None:
        text = await sidecars.read(self._host, _sidecar_path(dump))
        return None if text is None else from_sidecar(text, size)

    def _store(self, record: DumpRecord) -> None:
        old = self._dumps.get(record.id)
        if old == record:
            return
        self._dumps[record.id] = record
        self._issued.add(record.id)
        for observer in self._observers:
            if old is None:
                observer.dump_added(record)
            else:
                observer.dump_changed(record)

    def _forget(self, dump_id: str) -> None:
        record = self._dumps.pop(dump_id, None)
        if record is not None:
            for observer in self._observers:
                observer.dump_removed(record)


def _sidecar_path(dump: Path) -> Path:
    return dump.with_suffix(SIDECAR_SUFFIX)
