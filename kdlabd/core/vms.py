"""VM use cases: create, start, stop, delete, and the live view of every VM.

libvirt is the database: :meth:`VMService.load` rebuilds the view from the
hypervisor, and domain events keep it current. Operations on one VM are
serialized; creating a name is reserved up front so that concurrent callers
creating the same name get exactly one success.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from kdlab.errors import (
    HypervisorError,
    InvalidArgument,
    InvalidState,
    NoSuchImage,
    NoSuchVM,
    VMExists,
)
from kdlab.states import VMState
from kdlabd.core import blocking, descriptors, kernel, validate
from kdlabd.core.cmdline import effective_cmdline
from kdlabd.core.consoles import ConsoleHub
from kdlabd.core.diagnosis import BootFacts, Diagnosis, diagnose, read_console_log
from kdlabd.core.hypervisor import Hypervisor
from kdlabd.core.journal import crash_point
from kdlabd.core.limits import Limits
from kdlabd.core.models import (
    Accel,
    Backing,
    DebugSettings,
    Disk,
    ImageRecord,
    VMRecord,
    VMSpec,
)
from kdlabd.core.tasks import Background

ImageForDisk = Callable[[str], ImageRecord]
"""Finds an image a new VM's disk may be based on (see ImageService.for_disk)."""

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_MEMORY_MIB = 512
DEFAULT_VCPUS = 1
DEFAULT_STOP_TIMEOUT = 30.0
DIAGNOSIS_INTERVAL = 2.0
# Time limits of blocking calls (they run in threads; see kdlabd.core.blocking).
# A caller's descriptor may be a file on a stalled network or FUSE filesystem.
GDB_CONNECT_SECONDS = 5.0
CONSOLE_LOG_SECONDS = 5.0
# The longest root= kdlab may add, for checking a command line's length early.
_PLANNED_ROOT = (Disk(Path(), "vda", "image"),)


class VMObserver(Protocol):
    """Told about every change of the VM view (the bus layer exports objects)."""

    def vm_added(self, record: VMRecord) -> None: ...

    def vm_changed(self, record: VMRecord) -> None: ...

    def vm_removed(self, name: str) -> None: ...


@dataclass(frozen=True)
class Layout:
    """Where kdlabd keeps per-VM files on the host."""

    state_dir: Path
    runtime_dir: Path
    cache: Path | None = None

    def vm_dir(self, name: str) -> Path:
        return self.state_dir / "vms" / name

    def console_log(self, name: str) -> Path:
        return self.vm_dir(name) / "console.log"

    def scratch_dir(self) -> Path:
        """Where image builds work; emptied of a build when it ends."""
        return self.state_dir / "scratch"

    def journal_dir(self) -> Path:
        """Intent files of operations under way (see kdlabd.core.journal)."""
        return self.state_dir / "pending"

    def cache_dir(self) -> Path:
        """What builds keep for next time (debootstrap results)."""
        return self.cache or self.state_dir / "cache"

    def gdb_dir(self) -> Path:
        return self.runtime_dir / "gdb"

    def gdb_socket(self, name: str) -> Path:
        return self.gdb_dir() / f"{name}.sock"


@dataclass(frozen=True)
class CreateRequest:
    """A validated-on-use request to create a VM; descriptors stay the caller's."""

    name: str
    owner_uid: int
    kernel_fd: int | None
    initrd_fd: int | None = None
    cmdline: str = ""
    memory_mib: int = DEFAULT_MEMORY_MIB
    vcpus: int = DEFAULT_VCPUS
    debug: DebugSettings = field(default_factory=DebugSettings)
    vmlinux: str = ""
    kernel_path: str = ""
    tree: str = ""
    image: str = ""
    disk_size: int = 0
    extra_disks: tuple[int, ...] = ()


class BootClock:
    """How long a boot's CPUs have run, from the VM's state changes.

    Time spent paused (waiting for gdb after ``start --paused``, stopped at
    a breakpoint) does not count, so a diagnosis that needs the guest to
    have had time to print something is not fooled by a debugger. Times are
    given by the caller (the event loop's clock), which keeps this testable.
    """

    def __init__(self, *, started_paused: bool) -> None:
        self._ran = 0.0
        self._since: float | None = None
        # A boot started paused has not run until its CPUs first run; one
        # started otherwise runs from the start, even if it stops too soon
        # for anyone to see it running.
        self._has_run = not started_paused

    @property
    def has_run(self) -> bool:
        """Whether the guest's CPUs have run at all in this boot."""
        return self._has_run

    def observe(self, running: bool, now: float) -> None:
        """The CPUs run (or not) from *now* on."""
        if running and self._since is None:
            self._since = now
            self._has_run = True
        elif not running and self._since is not None:
            self._ran += now - self._since
            self._since = None

    def seconds(self, now: float) -> float:
        """Seconds of running until *now*."""
        return self._ran + (now - self._since if self._since is not None else 0.0)


def kernel_volume(name: str) -> str:
    return f"{name}.kernel"


def initrd_volume(name: str) -> str:
    return f"{name}.initrd"


_VOLUME_SUFFIX = re.compile(r"\.(kernel|initrd|vd[a-z]\.qcow2)$")


def volume_owner(volume: str) -> str | None:
    """The VM a volume of the VM pool belongs to, by its name; None if not kdlab's."""
    match = _VOLUME_SUFFIX.search(volume)
    return volume[: match.start()] if match else None


def disk_target(index: int) -> str:
    """vda, vdb, ...: virtio disks in order."""
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[index]


class VMService:
    """The VMs kdlab manages, and what can be done with them."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        layout: Layout,
        accel: Accel,
        observer: VMObserver,
        *,
        images: ImageForDisk | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._hv = hypervisor
        self._layout = layout
        self._accel = accel
        self._observer = observer
        self._images = images
        self._limits = limits or Limits()
        self._vms: dict[str, VMRecord] = {}
        # VMs being created, by name: their names, owners and images are taken.
        self._creating: dict[str, CreateRequest] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._transitions: dict[str, VMState] = {}
        self._waiting: set[str] = set()
        self._consoles = ConsoleHub(hypervisor, self._limits)
        self._diagnoses: dict[str, Diagnosis] = {}
        self._clocks: dict[str, BootClock] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._background = Background("vms.refresh_failed")

    @property
    def accel(self) -> Accel:
        return self._accel

    async def load(self) -> None:
        """Rebuild the view from the hypervisor (start-up and reconnection)."""
        records = {r.name: r for r in await self._hv.list_vms()}
        for name in list(self._vms):
            if name not in records:
                self._forget(name)
        # A running VM's diagnosis is part of the object it is exported with.
        for record in records.values():
            if record.state.active and record.name not in self._vms:
                self._clock(record)
                found = await self._diagnosis_of(record)
                if found is not None:
                    self._diagnoses[record.name] = found
            self._store(record)
        log.info("vms.loaded", count=len(self._vms))

    async def close(self) -> None:
        """Shutting down: end console sessions and watchers; VMs keep running."""
        for watcher in list(self._watchers.values()):
            watcher.cancel()
        await self._consoles.close_all()

    async def reconcile(self) -> list[str]:
        """Remove what crashed creates left: volumes and directories of no VM.

        Runs at start-up, after :meth:`load` and before any call is served, so
        no create is under way. A VM's files are named after it, which tells
        whose they are; nothing that belongs to an existing VM (running or
        not) is touched. Returns what was removed.
        """
        removed = []
        for volume in await self._hv.list_vm_volumes():
            owner = volume_owner(volume)
            if owner is not None and owner not in self._vms:
                await self._hv.delete_vm_volume(volume)
                removed.append(volume)
        vms_dir = self._layout.state_dir / "vms"
        if vms_dir.is_dir():
            for entry in vms_dir.iterdir():
                if entry.name not in self._vms:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(str(entry))
        if removed:
            log.warning("reconcile.removed_orphans", removed=removed)
        return removed

    def list(self) -> list[VMRecord]:
        return sorted(self._vms.values(), key=lambda r: r.name)

    def get(self, name: str) -> VMRecord:
        try:
            return self._vms[name]
        except KeyError:
            raise NoSuchVM(f"no VM named {name!r} (see: kdlabctl list)") from None

    def domain_changed(self, name: str) -> None:
        """Hypervisor event callback: re-read the VM in the background."""
        self._background.start(self.refresh(name))

    def hypervisor_reconnected(self) -> None:
        """Hypervisor callback: the connection came back; rebuild the whole view."""
        self._background.start(self.load())

    async def refresh(self, name: str) -> None:
        """Re-read one VM from the hypervisor and publish what changed."""
        if name in self._creating:
            return
        record = await self._hv.get_vm(name)
        if record is None:
            self._forget(name)
        else:
            self._store(record)

    async def create(self, request: CreateRequest) -> VMRecord:
        """Stage the boot files and define the domain; roll back on any failure."""
        name = validate.name(request.name)
        spec = self._new_spec(request)
        if request.kernel_fd is None:
            raise InvalidArgument(
                "a kernel is required: pass an open descriptor of a bzImage"
            )
        kernel_size, header = await _kernel_header(request.kernel_fd)
        spec = spec.replace(release=validate.release(kernel.bzimage_release(header)))
        initrd_size = 0
        if (initrd_fd := request.initrd_fd) is not None:
            initrd_size = await blocking.from_caller(
                lambda: validate.readable_file(
                    initrd_fd, "initrd", validate.INITRD_MAX_BYTES
                ),
                "initrd",
            )
        with self._reserve(request):
            base = self._image_for(request)
            if await self._hv.get_vm(name) is not None:
                raise VMExists(f"a VM named {name!r} already exists")
            async with contextlib.AsyncExitStack() as undo:
                kernel_path = await self._hv.upload_boot_file(
                    kernel_volume(name), request.kernel_fd, kernel_size
                )
                undo.push_async_callback(
                    _undo, self._hv.delete_vm_volume, kernel_volume(name)
                )
                crash_point("create.kernel-uploaded")
                initrd = None
                if request.initrd_fd is not None:
                    initrd = await self._hv.upload_boot_file(
                        initrd_volume(name), request.initrd_fd, initrd_size
                    )
                    undo.push_async_callback(
                        _undo, self._hv.delete_vm_volume, initrd_volume(name)
                    )
                disks = await self._create_disks(request, base, undo)
                crash_point("create.disks-created")
                vm_dir = self._layout.vm_dir(name)
                vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                undo.callback(shutil.rmtree, vm_dir, ignore_errors=True)
                record = await self._hv.define_vm(
                    spec.replace(kernel=kernel_path, initrd=initrd, disks=disks)
                )
                undo.pop_all()
                crash_point("create.defined")
        self._store(record)
        log.info("vm.created", vm=name, owner_uid=request.owner_uid, uuid=record.uuid)
        return self.get(name)

    def _image_for(self, request: CreateRequest) -> ImageRecord | None:
        """The image the new VM's disk is based on, from the image service.

        Called once the VM is reserved: from then on the image counts as used
        (see :meth:`uses_image`), so it cannot be deleted or resized under the
        overlay being made.
        """
        if not request.image:
            return None
        if self._images is None:
            raise NoSuchImage(f"no image named {request.image!r}: kdlabd has none")
        return self._images(request.image)

    async def _create_disks(
        self,
        request: CreateRequest,
        image: ImageRecord | None,
        undo: contextlib.AsyncExitStack,
    ) -> tuple[Disk, ...]:
        """The VM's own disks: an overlay on its image (vda), then blank ones."""
        sizes: list[tuple[int, ImageRecord | None]] = []
        if image is not None:
            sizes.append((max(image.capacity, request.disk_size), image))
        sizes += [(size, None) for size in request.extra_disks]
        disks = []
        for index, (size, base) in enumerate(sizes):
            target = disk_target(index)
            volume = f"{request.name}.{target}.qcow2"
            path = await self._hv.create_vm_disk(volume, size, base)
            undo.push_async_callback(_undo, self._hv.delete_vm_volume, volume)
            disks.append(
                Disk(path, target, base.name, Backing(base.path, base.format))
                if base is not None
                else Disk(path, target)
            )
        return tuple(disks)

    async def _replace_kernel(self, record: VMRecord, fd: int) -> None:
        """Stage a new snapshot of the kernel: rebuilding the tree later is safe."""
        size, header = await _kernel_header(fd)
        release = validate.release(kernel.bzimage_release(header))
        await self._hv.upload_boot_file(kernel_volume(record.name), fd, size)
        if release != record.spec.release:
            self._store(
                await self._hv.redefine_vm(record.spec.replace(release=release))
            )
        log.info("vm.kernel_replaced", vm=record.name, release=release)

    def uses_image(self, image: str) -> tuple[str, ...]:
        """Names of the VMs whose disks are based on *image*, or being created on it."""
        creating = sorted(n for n, r in self._creating.items() if r.image == image)
        return tuple(
            r.name
            for r in self.list()
            if any(d.base_image == image for d in r.spec.disks)
        ) + tuple(creating)

    async def start(
        self, name: str, *, paused: bool = False, kernel_fd: int | None = None
    ) -> VMRecord:
        """Boot the VM; *kernel_fd* replaces its kernel first (a fresh build)."""
        async with self._lock(name):
            record = self.get(name)
            if record.state.active:
                raise InvalidState(f"VM {name!r} is already {record.state}")
            if kernel_fd is not None:
                await self._replace_kernel(record, kernel_fd)
            # A new boot: nothing of the last one (its watcher, its diagnosis,
            # its running time) may carry over into this one's diagnosis.
            self._stop_watching(name)
            self._rotate_console_log(name)
            self._diagnoses.pop(name, None)
            self._clocks[name] = BootClock(started_paused=paused)
            if paused:
                self._waiting.add(name)
            async with self._transition(name, VMState.STARTING):
                try:
                    await self._hv.start_vm(name, paused=paused)
                except BaseException:
                    self._waiting.discard(name)
                    raise
            log.info("vm.started", vm=name, paused=paused)
            return self.get(name)

    async def stop(
        self, name: str, *, force: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT
    ) -> VMRecord:
        """Power off: ACPI first, the plug after *timeout* seconds (or at once)."""
        async with self._lock(name):
            record = self.get(name)
            if not record.state.active:
                raise InvalidState(f"VM {name!r} is not running (it is {record.state})")
            force = force or timeout <= 0
            async with self._transition(name, VMState.STOPPING):
                if not force:
                    await self._hv.shutdown_vm(name)
                    force = not await self._wait_inactive(name, timeout)
                    if force:
                        log.warning("vm.shutdown_timeout", vm=name, timeout=timeout)
                if force:
                    await self._hv.destroy_vm(name)
            log.info("vm.stopped", vm=name, forced=force)
            return self.get(name)

    async def delete(self, name: str) -> None:
        async with self._lock(name):
            record = self.get(name)
            if record.state.active:
                raise InvalidState(
                    f"VM {name!r} is {record.state}: stop it first "
                    f"(kdlabctl stop {name})"
                )
            await self._hv.undefine_vm(name)
            await self._hv.delete_vm_volume(kernel_volume(name))
            await self._hv.delete_vm_volume(initrd_volume(name))
            for disk in record.spec.disks:
                await self._hv.delete_vm_volume(disk.path.name)
            shutil.rmtree(self._layout.vm_dir(name), ignore_errors=True)
            self._forget(name)
            log.info("vm.deleted", vm=name)

    async def open_gdb(self, name: str) -> int:
        """A stream socket connected to the VM's gdbstub, for the caller to keep.

        The stub lives on this host (a unix socket only root and QEMU can
        reach, or a loopback TCP port); kdlabd connects and hands over the
        connection. QEMU serves one debugger at a time.
        """
        record = self.get(name)
        debug = record.spec.debug
        if not debug.gdb:
            raise InvalidState(
                f"VM {name!r} has no gdbstub (it was created with --no-gdb)"
            )
        if not record.state.active:
            raise InvalidState(
                f"VM {name!r} is {record.state}: start it first (kdlabctl start "
                f"--paused {name} stops it before the first instruction)"
            )
        descriptors.require("a gdb connection")
        if debug.gdb_tcp_port is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address: str | tuple[str, int] = ("127.0.0.1", debug.gdb_tcp_port)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = str(record.spec.gdb_socket)
        try:
            sock.settimeout(GDB_CONNECT_SECONDS)
            # A unix socket whose listener does not accept blocks in connect().
            await blocking.run(
                lambda: sock.connect(address),
                seconds=GDB_CONNECT_SECONDS + 1,
                what=f"connecting to the gdbstub of {name}",
            )
            sock.setblocking(True)
        except (OSError, blocking.Unanswered) as err:
            sock.close()
            why = err.strerror if isinstance(err, OSError) else "no answer"
            raise HypervisorError(
                f"cannot reach the gdbstub of VM {name!r} at {address}: {why}"
            ) from None
        return sock.detach()

    async def open_console(self, name: str, uid: int) -> int:
        """A socket on the VM's serial console, shared with any other viewers.

        *uid* is the viewer's: viewers are counted per user.
        """
        record = self.get(name)
        if not record.state.active:
            raise InvalidState(
                f"VM {name!r} is {record.state}: start it first (kdlabctl start "
                f"{name}); the last boot's output is in kdlabctl logs {name}"
            )
        return await self._consoles.attach(name, uid)

    async def open_console_log(self, name: str) -> int:
        """A read-only descriptor of the console log of the current or last boot."""
        self.get(name)
        path = self._layout.console_log(name)
        try:
            return await blocking.run(
                lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC),
                seconds=CONSOLE_LOG_SECONDS,
                what=f"opening {path}",
            )
        except FileNotFoundError:
            raise InvalidState(
                f"VM {name!r} has not been booted yet: there is no console log "
                f"(kdlabctl start {name})"
            ) from None
        except blocking.Unanswered:
            raise HypervisorError(
                f"the console log of VM {name!r} (written by virtlogd) did not open "
                f"within {CONSOLE_LOG_SECONDS:g} s: its filesystem does not answer"
            ) from None

    def _new_spec(self, request: CreateRequest) -> VMSpec:
        debug = request.debug
        if debug.gdb_tcp_port is not None:
            validate.tcp_port(debug.gdb_tcp_port)
        spec = VMSpec(
            name=request.name,
            owner_uid=request.owner_uid,
            kernel=Path(),
            initrd=None,
            cmdline=validate.cmdline(request.cmdline),
            memory_mib=self._limits.memory(validate.memory_mib(request.memory_mib)),
            vcpus=self._limits.cpus(validate.vcpus(request.vcpus)),
            accel=self._accel,
            console_log=self._layout.console_log(request.name),
            gdb_socket=self._layout.gdb_socket(request.name),
            debug=debug,
            created_usec=time.time_ns() // 1000,
            vmlinux=validate.hint_path(request.vmlinux, "vmlinux path"),
            disks=self._check_disks(request),
            kernel_path=validate.hint_path(request.kernel_path, "kernel path"),
            tree=validate.hint_path(request.tree, "kernel tree path"),
        )
        # kdlab's additions (root=, console=, nokaslr) count against the limit.
        validate.cmdline(effective_cmdline(spec.replace(disks=_PLANNED_ROOT)))
        return spec

    def _check_disks(self, request: CreateRequest) -> tuple[Disk, ...]:
        """Validate the disk options; the disks themselves are made later."""
        if request.image:
            validate.name(request.image, "image name")
        elif request.disk_size:
            raise InvalidArgument("a disk size needs an image (--image)")
        if request.disk_size:
            self._limits.disk(validate.disk_size(request.disk_size), "disk size")
        if len(request.extra_disks) > validate.MAX_EXTRA_DISKS:
            raise InvalidArgument(
                f"at most {validate.MAX_EXTRA_DISKS} extra disks (vdb to vdz)"
            )
        self._limits.extra(len(request.extra_disks))
        for size in request.extra_disks:
            self._limits.disk(
                validate.disk_size(size, "extra disk size"), "extra disk size"
            )
        return ()

    @contextlib.contextmanager
    def _reserve(self, request: CreateRequest) -> Iterator[None]:
        """Hold the new VM's name, and count it against its owner's VMs."""
        name, uid = request.name, request.owner_uid
        if name in self._vms or name in self._creating:
            raise VMExists(f"a VM named {name!r} already exists")
        owned = sum(r.spec.owner_uid == uid for r in self._vms.values())
        owned += sum(r.owner_uid == uid for r in self._creating.values())
        self._limits.room_for_vm(uid, owned)
        self._creating[name] = request
        try:
            yield
        finally:
            del self._creating[name]

    def _lock(self, name: str) -> asyncio.Lock:
        self.get(name)
        return self._locks.setdefault(name, asyncio.Lock())

    @contextlib.asynccontextmanager
    async def _transition(self, name: str, state: VMState) -> AsyncIterator[None]:
        """Show *state* while an operation is under way, whatever libvirt says.

        Afterwards, failed or not, the VM shows what the hypervisor reports.
        """
        self._transitions[name] = state
        self._store(self.get(name))
        try:
            yield
        finally:
            del self._transitions[name]
            await self.refresh(name)

    async def _wait_inactive(self, name: str, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        changed = self._changed.setdefault(name, asyncio.Event())
        while (remaining := deadline - loop.time()) > 0:
            changed.clear()
            record = await self._hv.get_vm(name)
            if record is None or not record.state.active:
                return True
            # Events wake us at once; the timeout re-checks in case one was lost.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(1.0, remaining))
        return False

    def _watch_boot(self, name: str) -> None:
        """Diagnose the VM's boot while it runs, and once more when it ends."""
        loop = asyncio.get_running_loop()

        async def watch() -> None:
            try:
                while name in self._vms:
                    record = self._vms[name]
                    await self._diagnose(record)
                    if not record.state.active:
                        return
                    await asyncio.sleep(DIAGNOSIS_INTERVAL)
            finally:
                if self._watchers.get(name) is task:
                    del self._watchers[name]

        task = loop.create_task(watch())
        self._watchers[name] = task

    def _stop_watching(self, name: str) -> None:
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher.cancel()

    async def _diagnose(self, record: VMRecord) -> None:
        """Re-diagnose the VM's boot; publish the diagnosis if it changed."""
        name = record.name
        boot = self._clocks.get(name)
        found = await self._diagnosis_of(record)
        # The log was read in a thread: a new boot may have begun meanwhile.
        if self._clocks.get(name) is not boot or name not in self._vms:
            return
        if found != self._diagnoses.get(name):
            if found is None:
                del self._diagnoses[name]
            else:
                self._diagnoses[name] = found
                log.info("vm.diagnosed", vm=name, code=found.code.value)
            self._store(self._vms[name])

    async def _diagnosis_of(self, record: VMRecord) -> Diagnosis | None:
        """The diagnosis of the VM's current (or last) boot; None before it ran."""
        clock = self._clocks.get(record.name)
        if clock is None or not clock.has_run:
            return None
        spec = record.spec
        facts = BootFacts(
            cmdline=effective_cmdline(spec),
            disks=tuple(disk.target for disk in spec.disks),
            has_initrd=spec.initrd is not None,
            gdbstub=spec.debug.gdb,
            seconds_since_start=clock.seconds(asyncio.get_running_loop().time()),
            running=_cpus_run(record.state),
            paused=record.state is VMState.PAUSED,
            name=spec.name,
        )
        try:
            text = await blocking.run(
                lambda: read_console_log(spec.console_log),
                seconds=CONSOLE_LOG_SECONDS,
                what=f"reading {spec.console_log}",
            )
        except FileNotFoundError:
            text = ""
        except blocking.Unanswered:
            return self._diagnoses.get(spec.name)  # no news: keep what was found
        return diagnose(text, facts)

    def _clock(self, record: VMRecord) -> BootClock:
        """The running time of the VM's boot, told of the VM's state now.

        A boot kdlabd did not start (found running at start-up, or started
        with virsh) has run, for how long is not known: from now on.
        """
        clock = self._clocks.get(record.name)
        if clock is None:
            clock = self._clocks[record.name] = BootClock(started_paused=False)
        clock.observe(_cpus_run(record.state), asyncio.get_running_loop().time())
        return clock

    def _rotate_console_log(self, name: str) -> None:
        """Keep the previous boot's console log as ``console.log.1``."""
        current = self._layout.console_log(name)
        with contextlib.suppress(FileNotFoundError):
            current.rename(current.with_name(current.name + ".1"))

    def _displayed(self, record: VMRecord) -> VMRecord:
        transition = self._transitions.get(record.name)
        state = record.state
        # STARTING shows until the domain is active, STOPPING until it is not.
        if transition is not None and state.active == (transition is VMState.STOPPING):
            state = transition
        elif state is VMState.STOPPED and not self._has_booted(record.name):
            state = VMState.DEFINED
        # Started paused, the VM waits for a debugger until it first runs.
        if state not in (VMState.STARTING, VMState.PAUSED):
            self._waiting.discard(record.name)
        waiting = state is VMState.PAUSED and record.name in self._waiting
        return VMRecord(
            record.spec,
            record.uuid,
            state,
            waiting_for_debugger=waiting,
            diagnosis=self._diagnoses.get(record.name),
        )

    def _has_booted(self, name: str) -> bool:
        log_file = self._layout.console_log(name)
        return log_file.exists() or log_file.with_name(log_file.name + ".1").exists()

    def _store(self, record: VMRecord) -> None:
        shown = self._displayed(record)
        old = self._vms.get(shown.name)
        if old == shown:
            return
        self._vms[shown.name] = shown
        if shown.state.active or shown.name in self._clocks:
            self._clock(record)
        if not shown.state.active and shown.state is not VMState.STARTING:
            self._consoles.close(shown.name)
        if shown.state.active and shown.name not in self._watchers:
            self._watch_boot(shown.name)
        if shown.name in self._changed:
            self._changed[shown.name].set()
        if old is None:
            self._observer.vm_added(shown)
        else:
            self._observer.vm_changed(shown)

    def _forget(self, name: str) -> None:
        if self._vms.pop(name, None) is not None:
            self._consoles.close(name)
            self._diagnoses.pop(name, None)
            self._clocks.pop(name, None)
            self._stop_watching(name)
            self._locks.pop(name, None)
            self._observer.vm_removed(name)


def _cpus_run(state: VMState) -> bool:
    """Whether the guest's CPUs run in *state* (a guest shutting down runs)."""
    return state in (VMState.RUNNING, VMState.STOPPING)


async def _kernel_header(fd: int) -> tuple[int, bytes]:
    """The size and boot header of the bzImage the caller passed as *fd*."""

    def look() -> tuple[int, bytes]:
        size = validate.readable_file(fd, "kernel", validate.KERNEL_MAX_BYTES)
        header = os.pread(fd, kernel.HEADER_BYTES, 0)
        validate.kernel_image(header)
        return size, header

    return await blocking.from_caller(look, "kernel")


async def _undo(step: Callable[[str], Awaitable[None]], arg: str) -> None:
    """Run one rollback step; a failure is logged, never raised over the cause."""
    try:
        await step(arg)
    except Exception:
        log.exception(
            "rollback.failed", step=getattr(step, "__name__", repr(step)), arg=arg
        )
