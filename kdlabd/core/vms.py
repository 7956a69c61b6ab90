"""VM use cases: create, start, stop, delete, and the live view of every VM.

libvirt is the database: :meth:`VMService.load` rebuilds the view from the
hypervisor, and domain events keep it current. Operations on one VM are
serialized; creating a name is reserved up front so that concurrent callers
creating the same name get exactly one success.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from kdlab import wire
from kdlab.errors import (
    HypervisorError,
    InvalidArgument,
    InvalidState,
    NoSuchImage,
    NoSuchVM,
    NotAuthorized,
    VMExists,
)
from kdlab.kernel import bzimage as kernel
from kdlab.kernel.diagnosis import HEAD_SIZE, TAIL_SIZE, BootFacts, Diagnosis, diagnose
from kdlab.states import StopCause, VMState
from kdlabd.core import blocking, descriptors, validate
from kdlabd.core import cmdline as kernel_cmdline
from kdlabd.core.consoles import ConsoleHub
from kdlabd.core.host import Address, CallerFiles, Host, Listener
from kdlabd.core.hypervisor import Hypervisor
from kdlabd.core.journal import crash_point
from kdlabd.core.limits import Limits
from kdlabd.core.models import (
    Accel,
    Backing,
    BootMark,
    DebugSettings,
    Disk,
    ImageRecord,
    RunStart,
    Share,
    VMRecord,
    VMSpec,
)
from kdlabd.core.observers import Observers
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
SHARE_SOCKET_SECONDS = 5.0
# QEMU waits for each share's server (the owner's virtiofsd) to answer before
# the guest runs, and libvirt waits for QEMU without a limit: a server that
# holds its socket and never answers would hold a start for ever.
SHARED_START_SECONDS = 60.0
SOCKET_PATH_MAX = 107  # sun_path's 108 bytes, with the terminating NUL


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

    def agent_socket(self, name: str) -> Path:
        """VM *name*'s exec channel (the host side of its virtio-serial port),
        next to its gdbstub where only root and QEMU reach (never a gdb
        socket's name: those end in .sock)."""
        return self.gdb_dir() / f"{name}.agent"

    def shares_dir(self, name: str) -> Path:
        """Where the sockets of the VM *name*'s shares are: only root and QEMU
        may enter it (and its parent)."""
        return self.runtime_dir / "shares" / name

    def share_socket(self, name: str, index: int) -> Path:
        """The socket QEMU connects to for the VM's *index*-th share (in tag
        order). Numbered, not named by tag: a unix socket's path is at most
        107 bytes, and a name and a tag may take 99 of them."""
        return self.shares_dir(name) / f"{index}.sock"


@dataclass(frozen=True)
class CreateRequest:
    """A request to create a VM, as a caller made it; descriptors stay the caller's.

    :meth:`VMService.create` checks all of it before it makes anything.
    """

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
    on_panic: str = wire.ON_PANIC_DUMP_AND_STOP
    initramfs: str = ""
    shares: tuple[tuple[str, str], ...] = ()
    """(tag, the caller's directory) pairs; kdlabd never opens a directory."""


@dataclass(frozen=True)
class NewDisk:
    """A disk a create is to make: the image's overlay, or a blank disk."""

    target: str
    base_image: str = ""
    size: int = 0
    """Bytes; an overlay is at least as large as its image."""


@dataclass(frozen=True)
class BootFiles:
    """The kernel and initrd a create got, checked: what they hold."""

    kernel_fd: int
    kernel_size: int
    release: str
    """What the kernel announces (``uname -r``), or ""."""
    initrd_fd: int | None
    initrd_size: int


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


@dataclass(eq=False)
class Boot:
    """One boot of a VM: what its diagnosis is made of. Each start makes a new one."""

    clock: BootClock
    waiting_for_debugger: bool = False
    """Started paused, and not yet seen anything but starting or paused."""
    diagnosis: Diagnosis | None = None
    watcher: asyncio.Task[None] | None = None
    """Diagnoses the boot while it runs (see :meth:`VMService._watch_boot`)."""


@dataclass(eq=False)
class VMEntry:
    """Everything kdlabd keeps about one VM, in one place: dropped as a whole."""

    name: str
    record: VMRecord | None = None
    """What the hypervisor last reported; None until it reported anything."""
    shown: VMRecord | None = None
    """What clients were last told (see :func:`client_view`); None: nothing yet,
    and the VM does not exist for callers."""
    creating: CreateRequest | None = None
    """A create under way: the name, an owner's VM and the image are taken."""
    transition: VMState | None = None
    """Starting or stopping, shown while that operation is under way."""
    booted: bool = False
    """Whether a console log tells that the VM has ever booted."""
    boot: Boot | None = None
    """The current or last boot; None before kdlabd saw one."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serializes the operations on the VM."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever what clients see changed (a stop waits on it)."""
    served: dict[str, Listener] = field(default_factory=dict)
    """The sockets of the VM's shares its owner was handed (ServeShares) since
    its last start, by tag: what the next start checks are listened on."""


def client_view(entry: VMEntry) -> VMRecord:
    """What clients see of the VM of *entry* (which the hypervisor reported)."""
    record = entry.record
    assert record is not None, "a VM the hypervisor never reported"
    state, transition = record.state, entry.transition
    # STARTING shows until the domain is active, STOPPING until it is not.
    if transition is not None and state.active == (transition is VMState.STOPPING):
        state = transition
    elif state is VMState.STOPPED and not entry.booted:
        state = VMState.DEFINED
    boot = entry.boot
    # Started paused, the VM waits for a debugger until it first runs.
    waiting = state is VMState.PAUSED and boot is not None and boot.waiting_for_debugger
    return VMRecord(
        record.spec,
        record.uuid,
        state,
        waiting_for_debugger=waiting,
        diagnosis=None if boot is None else boot.diagnosis,
        # Which boot it is; that a Stop was asked for shows in last_stop.
        boot=BootMark(
            record.boot.started_usec,
            run=record.boot.run if state.active else None,
        ),
        # How the last boot ended, once the VM shows that it is off.
        last_stop=record.last_stop if state.off else StopCause.NONE,
        # Observers act on a panic pvpanic reported (DumpService).
        panicked=record.panicked,
        checkpoints=record.checkpoints,
    )


def kernel_volume(name: str) -> str:
    return f"{name}.kernel"


def initrd_volume(name: str) -> str:
    return f"{name}.initrd"


def disk_volume(name: str, target: str) -> str:
    return f"{name}.{target}.qcow2"


_VOLUME_SUFFIX = re.compile(r"\.(kernel|initrd|vd[a-z]\.qcow2)$")


def vm_of_volume(volume: str) -> str | None:
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
        *,
        host: Host,
        images: ImageForDisk | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._hv = hypervisor
        self._layout = layout
        self._accel = accel
        self._host = host
        self._images = images
        self._limits = limits or Limits()
        # One entry per VM, by name: the VMs clients see and those being created.
        self._vms: dict[str, VMEntry] = {}
        self._observers: Observers[VMObserver] = Observers()
        self._consoles = ConsoleHub(hypervisor, host, self._limits)
        self._background = Background("vms.refresh_failed")

    def subscribe(self, observer: VMObserver) -> Callable[[], None]:
        """Tell *observer* of every change of the view from now on.

        Returns the function that ends the subscription.
        """
        return self._observers.subscribe(observer)

    @property
    def accel(self) -> Accel:
        return self._accel

    async def load(self) -> None:
        """Rebuild the view from the hypervisor (start-up and reconnection)."""
        records = {r.name: r for r in await self._hv.list_vms()}
        for name in list(self._vms):
            if name not in records:
                self._forget(name)
        for record in records.values():
            if record.state.active and record.name not in self._vms:
                # A running VM's diagnosis is part of the object it is
                # exported with. A boot kdlabd did not start (found running
                # at start-up, or started with virsh) has run, for how long
                # is not known: from now on.
                boot = Boot(BootClock(started_paused=False))
                entry = VMEntry(record.name, record, boot=boot)
                boot.diagnosis = await self._diagnosis_of(entry, record)
                self._vms.setdefault(record.name, entry)
            self._store(record)
        log.info("vms.loaded", count=len(self.list()))

    async def close(self) -> None:
        """Shutting down: end console sessions and watchers; VMs keep running."""
        for entry in self._vms.values():
            _end_watching(entry)
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
            vm = vm_of_volume(volume)
            if vm is not None and (vm not in self._vms or self._orphan_disk(volume)):
                await self._hv.delete_vm_volume(volume)
                removed.append(volume)
        vms_dir = self._layout.state_dir / "vms"
        for entry in self._host.names(vms_dir):
            if entry not in self._vms:
                self._host.remove_tree(vms_dir / entry)
                removed.append(str(vms_dir / entry))
        if removed:
            log.warning("reconcile.removed_orphans", removed=removed)
        return removed

    def _orphan_disk(self, volume: str) -> bool:
        """Whether *volume* is a disk its existing VM does not have: a state
        disk a checkpoint's save made, and died before plugging in."""
        entry = self._vms.get(vm_of_volume(volume) or "")
        if entry is None or entry.record is None or not volume.endswith(".qcow2"):
            return False
        return all(disk.path.name != volume for disk in entry.record.spec.disks)

    def list(self) -> list[VMRecord]:
        shown = (entry.shown for entry in self._vms.values())
        return sorted((r for r in shown if r is not None), key=lambda r: r.name)

    def get(self, name: str) -> VMRecord:
        return _shown(self._entry(name))

    def _entry(self, name: str) -> VMEntry:
        """The entry of the VM *name* as clients see it; NoSuchVM if they do not."""
        entry = self._vms.get(name)
        if entry is None or entry.shown is None:
            raise NoSuchVM(f"no VM named {name!r} (see: kdlabctl list)")
        return entry

    def domain_changed(self, name: str) -> None:
        """Hypervisor event callback: re-read the VM in the background."""
        self._background.start(self.refresh(name))

    def hypervisor_reconnected(self) -> None:
        """Hypervisor callback: the connection came back; rebuild the whole view."""
        self._background.start(self.load())

    async def refresh(self, name: str) -> None:
        """Re-read one VM from the hypervisor and publish what changed."""
        entry = self._vms.get(name)
        if entry is not None and entry.creating is not None:
            return
        record = await self._hv.get_vm(name)
        if record is None:
            self._forget(name)
        else:
            self._store(record)

    async def create(self, request: CreateRequest) -> VMRecord:
        """Check the whole request, make the VM's volumes and define its domain.

        Nothing is made before every part of the request passed; what was made
        is removed again when a later step fails.
        """
        disks = self._check(request)
        files = await _read_boot_files(self._host, request)
        name = request.name
        with self._reserve(request):
            image = self._image_for(request)
            if await self._hv.get_vm(name) is not None:
                raise VMExists(f"a VM named {name!r} already exists")
            async with contextlib.AsyncExitStack() as undo:
                spec = await self._stage(request, files, disks, image, undo)
                record = await self._hv.define_vm(spec)
                undo.pop_all()
                crash_point("create.defined")
        self._store(record)
        log.info("vm.created", vm=name, owner_uid=request.owner_uid, uuid=record.uuid)
        return self.get(name)

    def _check(self, request: CreateRequest) -> tuple[NewDisk, ...]:
        """Refuse a bad request before anything is made; the disks it asks for."""
        validate.name(request.name)
        debug = request.debug
        if debug.gdb_tcp_port is not None:
            validate.tcp_port(debug.gdb_tcp_port)
        validate.cmdline(request.cmdline)
        self._limits.memory(validate.memory_mib(request.memory_mib))
        self._limits.cpus(validate.vcpus(request.vcpus))
        validate.hint_path(request.vmlinux, "vmlinux path")
        disks = self._check_disks(request)
        validate.hint_path(request.kernel_path, "kernel path")
        validate.hint_path(request.tree, "kernel tree path")
        validate.on_panic(request.on_panic)
        validate.initramfs(request.initramfs)
        if request.initramfs and request.initrd_fd is None:
            raise InvalidArgument("initramfs names the initrd passed: pass one")
        # kdlab's additions (root=, console=, nokaslr) count against the limit.
        tags = [tag for tag, _ in validate.shares(dict(request.shares))]
        if tags:
            longest = self._layout.share_socket(request.name, len(tags) - 1)
            if len(bytes(longest)) > SOCKET_PATH_MAX:
                raise InvalidArgument(
                    f"the socket of a share would be {longest}, longer than a "
                    "unix socket's path may be: use a shorter VM name"
                )
        # kdlab's additions (root=, console=, nokaslr, kdlab.shares=) count
        # against the limit.
        validate.cmdline(
            kernel_cmdline.effective(request.cmdline, disks, gdb=debug.gdb, shares=tags)
        )
        return disks

    def _check_disks(self, request: CreateRequest) -> tuple[NewDisk, ...]:
        """Check the disk options: the image's overlay (vda), then blank disks."""
        disks = []
        if request.image:
            validate.name(request.image, "image name")
            disks.append(NewDisk(disk_target(0), request.image, request.disk_size))
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
            disks.append(NewDisk(disk_target(len(disks)), size=size))
        return tuple(disks)

    async def _stage(
        self,
        request: CreateRequest,
        files: BootFiles,
        disks: tuple[NewDisk, ...],
        image: ImageRecord | None,
        undo: contextlib.AsyncExitStack,
    ) -> VMSpec:
        """Make the checked request's volumes and directory, each pushed on
        *undo*; the spec of the VM they make."""
        name = request.name
        kernel_file = await self._hv.upload_boot_file(
            kernel_volume(name), files.kernel_fd, files.kernel_size
        )
        undo.push_async_callback(_undo, self._hv.delete_vm_volume, kernel_volume(name))
        crash_point("create.kernel-uploaded")
        initrd_file = None
        if files.initrd_fd is not None:
            initrd_file = await self._hv.upload_boot_file(
                initrd_volume(name), files.initrd_fd, files.initrd_size
            )
            undo.push_async_callback(
                _undo, self._hv.delete_vm_volume, initrd_volume(name)
            )
        made = await self._make_disks(name, disks, image, undo)
        crash_point("create.disks-created")
        vm_dir = self._layout.vm_dir(name)
        self._host.make_private_dir(vm_dir)
        undo.callback(self._host.remove_tree, vm_dir)
        return VMSpec(
            name=name,
            owner_uid=request.owner_uid,
            kernel=kernel_file,
            initrd=initrd_file,
            cmdline=request.cmdline,
            memory_mib=request.memory_mib,
            vcpus=request.vcpus,
            accel=self._accel,
            console_log=self._layout.console_log(name),
            gdb_socket=self._layout.gdb_socket(name),
            agent_socket=self._layout.agent_socket(name),
            debug=request.debug,
            created_usec=time.time_ns() // 1000,
            release=files.release,
            vmlinux=request.vmlinux,
            kernel_path=request.kernel_path,
            tree=request.tree,
            disks=made,
            on_panic=request.on_panic,
            initramfs=request.initramfs,
            shares=tuple(
                Share(tag, directory, self._layout.share_socket(name, index))
                for index, (tag, directory) in enumerate(sorted(request.shares))
            ),
        )

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

    async def _make_disks(
        self,
        name: str,
        disks: tuple[NewDisk, ...],
        image: ImageRecord | None,
        undo: contextlib.AsyncExitStack,
    ) -> tuple[Disk, ...]:
        """The VM's own disks: an overlay on its image (vda), then blank ones."""
        made = []
        for disk in disks:
            base = image if disk.base_image else None
            size = disk.size if base is None else max(base.capacity, disk.size)
            volume = disk_volume(name, disk.target)
            path = await self._hv.create_vm_disk(volume, size, base)
            undo.push_async_callback(_undo, self._hv.delete_vm_volume, volume)
            made.append(
                Disk(path, disk.target, base.name, Backing(base.path, base.format))
                if base is not None
                else Disk(path, disk.target)
            )
        return tuple(made)

    async def _replace_kernel(self, record: VMRecord, fd: int) -> None:
        """Stage a new snapshot of the kernel: rebuilding the tree later is safe."""
        size, release = await _read_kernel(self._host, fd)
        await self._hv.upload_boot_file(kernel_volume(record.name), fd, size)
        if release != record.spec.release:
            self._store(
                await self._hv.redefine_vm(record.spec.replace(release=release))
            )
        log.info("vm.kernel_replaced", vm=record.name, release=release)

    async def _replace_initrd(self, record: VMRecord, fd: int, size: int) -> None:
        """Stage a new snapshot of the initrd (a VM without one gets one)."""
        path = await self._hv.upload_boot_file(initrd_volume(record.name), fd, size)
        if record.spec.initrd != path:
            self._store(await self._hv.redefine_vm(record.spec.replace(initrd=path)))
        log.info("vm.initrd_replaced", vm=record.name)

    def uses_image(self, image: str) -> tuple[str, ...]:
        """Names of the VMs whose disks are based on *image*, or being created on it."""
        creating = sorted(
            name
            for name, entry in self._vms.items()
            if entry.creating is not None and entry.creating.image == image
        )
        return tuple(
            r.name
            for r in self.list()
            if any(d.base_image == image for d in r.spec.disks)
        ) + tuple(creating)

    async def start(
        self,
        name: str,
        *,
        paused: bool = False,
        kernel_fd: int | None = None,
        initrd_fd: int | None = None,
        checkpoint: str = "",
        check: Callable[[VMRecord], Awaitable[None]] | None = None,
        run: RunStart | None = None,
    ) -> VMRecord:
        """Boot the VM; *kernel_fd* replaces its kernel first (a fresh build),
        and *initrd_fd* its initrd.

        With *checkpoint* it starts in that checkpoint's state, once *check*
        (see :meth:`CheckpointService.starter`) passed on the staged kernel.
        """
        async with self._locked(name) as entry:
            record = _shown(entry)
            if record.state.active:
                raise InvalidState(f"VM {name!r} is already {record.state}")
            # Both files are checked before either replaces the VM's.
            initrd_size = (
                None if initrd_fd is None else await _read_initrd(self._host, initrd_fd)
            )
            await self._check_served(entry, record.spec)
            if kernel_fd is not None:
                await self._replace_kernel(record, kernel_fd)
            if initrd_fd is not None and initrd_size is not None:
                await self._replace_initrd(self.get(name), initrd_fd, initrd_size)
            if check is not None:
                await check(self.get(name))
            # A new boot: nothing of the last one (its watcher, its diagnosis,
            # its running time) may carry over into this one's diagnosis.
            _end_watching(entry)
            self._rotate_console_log(name)
            boot = entry.boot = Boot(
                BootClock(started_paused=paused), waiting_for_debugger=paused
            )
            # Marked first, and shown with "starting": every event of the boot
            # carries its mark. A failed start leaves the mark of the last
            # boot that did start.
            assert entry.record is not None, "a VM the hypervisor never reported"
            last = entry.record.boot
            mark = BootMark(
                max(time.time_ns() // 1000, last.started_usec + 1),
                run=None if run is None else run.run,
            )
            await self._hv.mark_boot(name, mark)
            entry.record = dataclasses.replace(entry.record, boot=mark)
            async with self._transition(entry, VMState.STARTING):
                try:
                    starting = self._hv.start_vm(
                        name, paused=paused, checkpoint=checkpoint, run=run
                    )
                    if record.spec.shares:
                        # QEMU takes the sockets' one connection each, served
                        # or not: a next start needs them served again.
                        entry.served.clear()
                        await self._start_served(name, starting)
                    else:
                        await starting
                    if checkpoint:
                        # libvirt's revert brought back the definition as the
                        # checkpoint had it, with that boot's mark.
                        await self._hv.mark_boot(name, mark)
                except BaseException:
                    boot.waiting_for_debugger = False
                    await _undo(lambda n: self._hv.mark_boot(n, last), name)
                    raise
            log.info("vm.started", vm=name, paused=paused, checkpoint=checkpoint)
            return self.get(name)

    async def _check_served(self, entry: VMEntry, spec: VMSpec) -> None:
        """Refuse to start a VM with a share nobody serves: QEMU would fail on
        a socket that is gone, or wait on one whose server is gone.

        kdlabd cannot ask: the server (virtiofsd) answers one connection,
        QEMU's. What it knows: the socket it handed over for the share since
        the last start is still the one at the share's path, and some process
        still holds it listening (the server, or the caller about to start
        it)."""
        for share in spec.shares:
            listener = entry.served.get(share.tag)
            if listener is None:
                raise InvalidState(
                    f"share {share.tag!r} of VM {spec.name!r} is not served: its "
                    f"owner starts it with kdlabctl start {spec.name}, which serves "
                    f"{share.directory} as them (D-Bus: ServeShares, then Start)"
                )
            listens = await blocking.run(
                functools.partial(self._host.listens, listener),
                seconds=SHARE_SOCKET_SECONDS,
                what=f"looking for the listener of share {share.tag}",
            )
            if not listens:
                raise InvalidState(
                    f"nobody serves share {share.tag!r} of VM {spec.name!r} any "
                    f"more (its virtiofsd exited; see its log): kdlabctl start "
                    f"{spec.name} serves it again"
                )

    async def _start_served(self, name: str, starting: Awaitable[None]) -> None:
        """Start a VM with shares, within :data:`SHARED_START_SECONDS`: past
        that, a share's server holds QEMU, and the VM is destroyed (which
        ends libvirt's wait)."""
        task = asyncio.ensure_future(starting)
        try:
            await asyncio.wait_for(asyncio.shield(task), SHARED_START_SECONDS)
            return
        except TimeoutError:
            log.warning("vm.share_start_timeout", vm=name)
        await _undo(self._hv.destroy_vm, name)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, SHARED_START_SECONDS)
        raise HypervisorError(
            f"VM {name!r} did not start within {SHARED_START_SECONDS:g} s: QEMU "
            "waited for a share's virtiofsd, which never answered; the VM was "
            f"stopped (see the virtiofsd logs; kdlabctl start {name} serves the "
            "shares again)"
        )

    async def serve_shares(self, name: str, uid: int) -> dict[str, int]:
        """Listening sockets for the VM's shares, by tag, for its owner *uid*
        to serve (a virtiofsd of theirs on each) before the next start.

        Each socket is bound at the share's path (replacing an old one), where
        only QEMU (and root) can connect; kdlabd keeps no copy, only what
        identifies it (see :meth:`_check_served`).
        """
        async with self._locked(name) as entry:
            record = _shown(entry)
            spec = record.spec
            if uid != spec.owner_uid:
                raise NotAuthorized(
                    f"only the owner of VM {name!r} (uid {spec.owner_uid}) may serve "
                    "its shares: the guest sees them with the server's rights"
                )
            if not spec.shares:
                raise InvalidState(
                    f"VM {name!r} has no shares (kdlabctl create --share DIR makes "
                    "a VM that has)"
                )
            if record.state.active or entry.transition is not None:
                raise InvalidState(
                    f"VM {name!r} is {record.state}: its shares are served before "
                    f"it starts (kdlabctl stop {name} first)"
                )
            descriptors.require(
                self._host.free_descriptors() - len(spec.shares) + 1,
                "the sockets of shares",
            )
            entry.served.clear()
            served: dict[str, Listener] = {}
            fds: dict[str, int] = {}
            try:
                for share in spec.shares:
                    fds[share.tag], served[share.tag] = await self._listen(name, share)
            except BaseException:
                for fd in fds.values():
                    os.close(fd)
                raise
            entry.served.update(served)
            log.info("vm.shares_served", vm=name, tags=sorted(fds))
            return fds

    async def _listen(self, name: str, share: Share) -> tuple[int, Listener]:
        try:
            return await self._host.listen_for_qemu(
                share.socket,
                seconds=SHARE_SOCKET_SECONDS,
                what=f"binding the socket of share {share.tag} of {name}",
            )
        except blocking.Unanswered:
            raise HypervisorError(
                f"the socket of share {share.tag!r} ({share.socket}) was not made "
                f"within {SHARE_SOCKET_SECONDS:g} s: kdlabd's runtime directory "
                "does not answer"
            ) from None
        except OSError as err:
            raise HypervisorError(
                f"cannot make the socket of share {share.tag!r} at {share.socket}: "
                f"{err.strerror or err}"
            ) from None

    async def stop(
        self, name: str, *, force: bool = False, timeout: float = DEFAULT_STOP_TIMEOUT
    ) -> VMRecord:
        """Power off: ACPI first, the plug after *timeout* seconds (or at once)."""
        async with self._locked(name) as entry:
            record = _shown(entry)
            if not record.state.active:
                raise InvalidState(f"VM {name!r} is not running (it is {record.state})")
            # A panicked guest answers no power button: pull the plug.
            force = (
                force
                or timeout <= 0
                or (entry.record is not None and entry.record.panicked)
            )
            async with self._transition(entry, VMState.STOPPING):
                # However the guest goes off now, it was asked to.
                assert entry.record is not None, "a VM the hypervisor never reported"
                stopping = dataclasses.replace(entry.record.boot, stop_requested=True)
                await self._hv.mark_boot(name, stopping)
                if not force:
                    await self._hv.shutdown_vm(name)
                    force = not await self._wait_inactive(entry, timeout)
                    if force:
                        log.warning("vm.shutdown_timeout", vm=name, timeout=timeout)
                if force:
                    await self._hv.destroy_vm(name)
            log.info("vm.stopped", vm=name, forced=force)
            return self.get(name)

    async def delete(self, name: str) -> None:
        async with self._locked(name) as entry:
            record = _shown(entry)
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
            self._host.remove_tree(self._layout.vm_dir(name))
            self._host.remove_tree(self._layout.shares_dir(name))
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
        descriptors.require(self._host.free_descriptors(), "a gdb connection")
        address: Address = str(record.spec.gdb_socket)
        if debug.gdb_tcp_port is not None:
            address = ("127.0.0.1", debug.gdb_tcp_port)
        try:
            return await self._host.connect(
                address,
                seconds=GDB_CONNECT_SECONDS,
                what=f"connecting to the gdbstub of {name}",
            )
        except (OSError, blocking.Unanswered) as err:
            why = err.strerror if isinstance(err, OSError) else "no answer"
            raise HypervisorError(
                f"cannot reach the gdbstub of VM {name!r} at {address}: {why}"
            ) from None

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
                lambda: self._host.open_read_only(path),
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

    @contextlib.contextmanager
    def _reserve(self, request: CreateRequest) -> Iterator[None]:
        """Hold the new VM's name, and count it against its owner's VMs."""
        name, uid = request.name, request.owner_uid
        if name in self._vms:
            raise VMExists(f"a VM named {name!r} already exists")
        entries = self._vms.values()
        owned = sum(
            e.shown is not None and e.shown.spec.owner_uid == uid for e in entries
        )
        owned += sum(
            e.creating is not None and e.creating.owner_uid == uid for e in entries
        )
        self._limits.room_for_vm(uid, owned)
        self._vms[name] = VMEntry(name, creating=request)
        try:
            yield
        finally:
            # By name: the VM may have been shown, and forgotten, meanwhile.
            entry = self._vms.get(name)
            if entry is not None and entry.creating is request:
                entry.creating = None
                if entry.shown is None:
                    del self._vms[name]

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[VMEntry]:
        """The entry of the VM *name*, while no other operation runs on it."""
        async with self._entry(name).lock:
            # Looked up again: the VM may have gone while the lock was held.
            yield self._entry(name)

    def operation(self, name: str) -> contextlib.AbstractAsyncContextManager[VMEntry]:
        """Hold the VM *name* while no other operation runs on it (checkpoints)."""
        return self._locked(name)

    @contextlib.asynccontextmanager
    async def _transition(self, entry: VMEntry, state: VMState) -> AsyncIterator[None]:
        """Show *state* while an operation is under way, whatever libvirt says.

        Afterwards, failed or not, the VM shows what the hypervisor reports.
        """
        entry.transition = state
        self._publish(entry)
        try:
            yield
        finally:
            entry.transition = None
            await self.refresh(entry.name)

    async def _wait_inactive(self, entry: VMEntry, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            entry.changed.clear()
            record = await self._hv.get_vm(entry.name)
            if record is None or not record.state.active:
                return True
            # Events wake us at once; the timeout re-checks in case one was lost.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.changed.wait(), min(1.0, remaining))
        return False

    def _watch_boot(self, entry: VMEntry, boot: Boot) -> None:
        """Diagnose the VM's boot while it runs, and once more when it ends."""

        async def watch() -> None:
            try:
                while self._vms.get(entry.name) is entry:
                    record = _shown(entry)
                    await self._diagnose(entry, record)
                    if not record.state.active:
                        return
                    await asyncio.sleep(DIAGNOSIS_INTERVAL)
            finally:
                if boot.watcher is task:
                    boot.watcher = None

        task = asyncio.get_running_loop().create_task(watch())
        boot.watcher = task

    async def _diagnose(self, entry: VMEntry, record: VMRecord) -> None:
        """Re-diagnose the VM's boot; publish the diagnosis if it changed."""
        boot = entry.boot
        found = await self._diagnosis_of(entry, record)
        # The log was read in a thread: a new boot may have begun meanwhile.
        if (
            boot is None
            or entry.boot is not boot
            or self._vms.get(entry.name) is not entry
        ):
            return
        if found != boot.diagnosis:
            boot.diagnosis = found
            if found is not None:
                log.info("vm.diagnosed", vm=entry.name, code=found.code.value)
            self._publish(entry)

    async def _diagnosis_of(self, entry: VMEntry, record: VMRecord) -> Diagnosis | None:
        """The diagnosis of the VM's current (or last) boot; None before it ran."""
        boot = entry.boot
        if boot is None or not boot.clock.has_run:
            return None
        spec = record.spec
        facts = BootFacts(
            cmdline=spec.effective_cmdline,
            disks=tuple(disk.target for disk in spec.disks),
            has_initrd=spec.initrd is not None,
            gdbstub=spec.debug.gdb,
            seconds_since_start=boot.clock.seconds(asyncio.get_running_loop().time()),
            running=_cpus_run(record.state),
            paused=record.state is VMState.PAUSED,
            name=spec.name,
        )
        try:
            text = await blocking.run(
                lambda: self._host.read_excerpt(spec.console_log, HEAD_SIZE, TAIL_SIZE),
                seconds=CONSOLE_LOG_SECONDS,
                what=f"reading {spec.console_log}",
            )
        except FileNotFoundError:
            text = ""
        except blocking.Unanswered:
            return boot.diagnosis  # no news: keep what was found
        return diagnose(text, facts)

    def _rotate_console_log(self, name: str) -> None:
        """Keep the previous boot's console log as ``console.log.1``."""
        current = self._layout.console_log(name)
        with contextlib.suppress(FileNotFoundError):
            self._host.move(current, current.with_name(current.name + ".1"))

    def _has_booted(self, name: str) -> bool:
        log_file = self._layout.console_log(name)
        previous = log_file.with_name(log_file.name + ".1")
        return self._host.has_file(log_file) or self._host.has_file(previous)

    def _store(self, record: VMRecord) -> None:
        """Take what the hypervisor reports of a VM; publish what changed."""
        entry = self._vms.get(record.name)
        if entry is None:
            entry = self._vms[record.name] = VMEntry(record.name)
        entry.record = record
        self._publish(entry)

    def _publish(self, entry: VMEntry) -> None:
        """Tell subscribers what changed in what clients see of *entry*'s VM, and
        follow its state: time and watch its boot, close its consoles."""
        record = entry.record
        assert record is not None, "a VM the hypervisor never reported"
        if record.state is VMState.STOPPED:
            entry.booted = self._has_booted(entry.name)
        shown = client_view(entry)
        boot = entry.boot
        if boot is not None and shown.state not in (VMState.STARTING, VMState.PAUSED):
            boot.waiting_for_debugger = False
        old = entry.shown
        if old == shown:
            return
        entry.shown = shown
        if shown.state.active and boot is None:
            boot = entry.boot = Boot(BootClock(started_paused=False))
        if boot is not None:
            now = asyncio.get_running_loop().time()
            boot.clock.observe(_cpus_run(record.state), now)
        if not shown.state.active and shown.state is not VMState.STARTING:
            self._consoles.close(entry.name)
        if shown.state.active and boot is not None and boot.watcher is None:
            self._watch_boot(entry, boot)
        entry.changed.set()
        for observer in self._observers:
            if old is None:
                observer.vm_added(shown)
            else:
                observer.vm_changed(shown)

    def _forget(self, name: str) -> None:
        """The VM is gone: drop its entry and everything in it."""
        entry = self._vms.get(name)
        if entry is None or entry.shown is None:
            return
        if entry.creating is None:
            del self._vms[name]
        else:  # a create of the name is under way: the name stays taken
            self._vms[name] = VMEntry(name, creating=entry.creating)
        self._consoles.forget(name)
        _end_watching(entry)
        for observer in self._observers:
            observer.vm_removed(name)


def _shown(entry: VMEntry) -> VMRecord:
    """What clients were last told of *entry*'s VM (which they see)."""
    assert entry.shown is not None, "a VM clients do not see"
    return entry.shown


def _end_watching(entry: VMEntry) -> None:
    """Stop diagnosing the VM's boot (it ended, or the VM is gone)."""
    if entry.boot is not None and entry.boot.watcher is not None:
        entry.boot.watcher.cancel()
        entry.boot.watcher = None


def _cpus_run(state: VMState) -> bool:
    """Whether the guest's CPUs run in *state* (a guest shutting down runs)."""
    return state in (VMState.RUNNING, VMState.STOPPING)


async def _read_kernel(files: CallerFiles, fd: int) -> tuple[int, str]:
    """The size and release of the bzImage the caller passed as *fd*."""

    def look() -> tuple[int, bytes]:
        size = validate.readable_file(files, fd, "kernel", validate.KERNEL_MAX_BYTES)
        header = files.read_header(fd, kernel.HEADER_BYTES)
        validate.kernel_image(header)
        return size, header

    size, header = await blocking.from_caller(look, "kernel")
    return size, validate.release(kernel.bzimage_release(header))


async def _read_initrd(files: CallerFiles, fd: int) -> int:
    """The size of the initrd the caller passed, once checked."""
    return await blocking.from_caller(
        lambda: validate.readable_file(files, fd, "initrd", validate.INITRD_MAX_BYTES),
        "initrd",
    )


async def _read_boot_files(files: CallerFiles, request: CreateRequest) -> BootFiles:
    """Check the kernel and initrd the caller passed; what they hold."""
    if request.kernel_fd is None:
        raise InvalidArgument(
            "a kernel is required: pass an open descriptor of a bzImage"
        )
    kernel_size, release = await _read_kernel(files, request.kernel_fd)
    initrd_size = 0
    if request.initrd_fd is not None:
        initrd_size = await _read_initrd(files, request.initrd_fd)
    return BootFiles(
        request.kernel_fd, kernel_size, release, request.initrd_fd, initrd_size
    )


async def _undo(step: Callable[[str], Awaitable[None]], arg: str) -> None:
    """Run one rollback step; a failure is logged, never raised over the cause."""
    try:
        await step(arg)
    except Exception:
        log.exception(
            "rollback.failed", step=getattr(step, "__name__", repr(step)), arg=arg
        )
