"""An in-memory :class:`kdlabd.core.hypervisor.Hypervisor` for core tests.

It behaves like libvirt where kdlab relies on it: domains are persistent, a start
writes a console log (as virtlogd does), lifecycle changes are announced through
the ``watch`` callback on the next loop iteration, and names are unique. It records
every call, can be told to fail at a step, and can hold a step until the test
releases it (to look at what is visible mid-operation).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.errors import (
    HypervisorError,
    InvalidState,
    NoSuchCheckpoint,
    NoSuchVM,
    UnsupportedDisk,
    VMExists,
)
from kdlab.states import StopCause, VMState
from kdlabd.core import checkpoints
from kdlabd.core.hypervisor import (
    ConsoleOutput,
    ConsoleSent,
    DomainChanged,
    DumpProgress,
    Reconnected,
    UploadProgress,
)
from kdlabd.core.limits import HostResources
from kdlabd.core.models import (
    Accel,
    BootMark,
    Checkpoint,
    Disk,
    ImageFormat,
    ImageRecord,
    ImageSource,
    RunFiles,
    RunStart,
    StoredImage,
    VMRecord,
    VMSpec,
    stop_cause,
)
from kdlabd.core.validate import IMAGE_HEADER_BYTES

POOL = Path("/fake-pool")
IMAGE_POOL = Path("/fake-images")
HOST = HostResources(memory_mib=4096, cpus=4)


@dataclass
class Call:
    """One call of the fake: method name and its main argument (VM or volume name)."""

    method: str
    arg: str


@dataclass
class Domain:
    spec: VMSpec
    uuid: str
    state: VMState = VMState.STOPPED
    boot: BootMark = field(default_factory=BootMark)
    stopped_by: StopCause = StopCause.NONE
    """What libvirt would tell of how it went off (its shut-off reason)."""
    panicked: bool = False  # pvpanic seen, QEMU keeps the guest (on_crash preserve)
    panic_handled: bool = False  # live metadata: gone when QEMU stops
    # Checkpoints by tag, with their descriptions (libvirt's snapshot metadata).
    checkpoints: dict[str, tuple[Checkpoint, str]] = field(default_factory=dict)
    # The definition's boot mark when each was taken: a revert brings it back.
    marks: dict[str, BootMark] = field(default_factory=dict)
    raw_disk: bool = False
    """A disk that is not qcow2 (made with virsh): no checkpoint fits in it."""
    loaded: list[str] = field(default_factory=list)
    """The checkpoints restored into the running process, in order."""


@dataclass
class FakeConsole:
    """A console whose guest takes typed input only when the test says so."""

    on_output: ConsoleOutput
    on_sent: ConsoleSent
    waiting: list[bytes] = field(default_factory=list)
    taken: bytearray = field(default_factory=bytearray)
    closed: bool = False

    @property
    def backlog(self) -> int:
        return sum(map(len, self.waiting))

    def send(self, data: bytes) -> None:
        self.waiting.append(data)

    async def close(self) -> None:
        self.closed = True

    def take(self) -> None:
        """The guest reads everything typed so far."""
        for data in self.waiting:
            self.taken += data
        self.waiting.clear()
        self.on_sent()


@dataclass
class FakeHypervisor:
    """Domains and boot volumes in memory."""

    domains: dict[str, Domain] = field(default_factory=dict)
    volumes: dict[str, bytes] = field(default_factory=dict)
    # The image pool: volumes by name, and the owner recorded for each name.
    images: dict[str, ImageRecord] = field(default_factory=dict)
    heads: dict[str, bytes] = field(default_factory=dict)  # their first bytes
    owners: dict[str, int] = field(default_factory=dict)
    # VM disks: (virtual size, the image it is an overlay of) by volume name.
    disks: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    host: HostResources = HOST
    calls: list[Call] = field(default_factory=list)
    consoles: list[FakeConsole] = field(default_factory=list)
    last_run: RunStart | None = None  # the run of the last start_vm
    # "method" or "method:arg" -> the exception that call raises (after recording it).
    failures: dict[str, BaseException] = field(default_factory=dict)
    # "method" or "method:arg" -> an event the call waits for before doing anything.
    holds: dict[str, asyncio.Event] = field(default_factory=dict)
    # Whether the guest obeys the ACPI power button, and how long it takes.
    guest_powers_off: bool = True
    shutdown_delay: float = 0.01
    kvm_available: bool = False
    # The dumps pool: a real directory (DumpService reads and writes files in
    # it through the real LocalHost); what a dump of any VM holds.
    dump_dir: Path = Path("/nonexistent-dumps")
    dump_content: bytes = b"\x7fELF-not-really"
    dump_free: int = 1 << 40
    recording_dir: Path = Path("/nonexistent-recordings")
    icount: int = 0  # what run_position answers
    recording_free: int = 1 << 40
    _on_changed: DomainChanged | None = None
    _on_reconnected: Reconnected | None = None
    _power_off: dict[str, asyncio.TimerHandle] = field(default_factory=dict)

    # The test's controls.

    def fail(self, step: str, error: BaseException | None = None) -> None:
        """Make *step* ("define_vm" or "upload_boot_file:vm.initrd") raise."""
        self.failures[step] = error or HypervisorError(
            f"libvirt: injected failure at {step}"
        )

    def hold(self, step: str) -> asyncio.Event:
        """Make *step* wait until the returned event is set."""
        return self.holds.setdefault(step, asyncio.Event())

    def called(self, method: str) -> list[str]:
        """The arguments of every call of *method*, in order."""
        return [call.arg for call in self.calls if call.method == method]

    def add_domain(self, spec: VMSpec, state: VMState = VMState.STOPPED) -> Domain:
        """A domain that appeared behind kdlabd's back (e.g. while it was down)."""
        domain = Domain(spec, str(uuid.uuid4()), state)
        self.domains[spec.name] = domain
        return domain

    def set_state(
        self, name: str, state: VMState, how: StopCause = StopCause.GUEST
    ) -> None:
        """Change a domain's state, as a guest or libvirt would, and send the
        event; a domain that goes off does so *how*."""
        self.domains[name].state = state
        self.domains[name].stopped_by = how
        self._announce(name)

    def panic(self, name: str) -> None:
        """The guest panics and its pvpanic device tells QEMU (libvirt's event)."""
        domain = self.domains[name]
        domain.state, domain.panicked = VMState.PAUSED, True
        self._announce(name)

    def reconnect(self) -> None:
        """Pretend libvirtd restarted and the connection was re-opened."""
        assert self._on_reconnected is not None, "watch() was not called"
        self._on_reconnected()

    # The Hypervisor protocol.

    def watch(
        self, on_domain_changed: DomainChanged, on_reconnected: Reconnected
    ) -> None:
        self._on_changed = on_domain_changed
        self._on_reconnected = on_reconnected

    async def resolve_accel(self, accel: Accel) -> Accel:
        await self._step("resolve_accel", accel.value)
        if accel is Accel.AUTO:
            return Accel.KVM if self.kvm_available else Accel.TCG
        return accel

    async def list_vms(self) -> list[VMRecord]:
        await self._step("list_vms", "")
        return [self._record(d) for d in self.domains.values()]

    async def get_vm(self, name: str) -> VMRecord | None:
        await self._step("get_vm", name)
        domain = self.domains.get(name)
        return None if domain is None else self._record(domain)

    async def define_vm(self, spec: VMSpec) -> VMRecord:
        await self._step("define_vm", spec.name)
        if spec.name in self.domains:
            raise VMExists(f"libvirt already has a domain named kdlab-{spec.name}")
        domain = self.add_domain(spec)
        self._announce(spec.name)
        return self._record(domain)

    async def undefine_vm(self, name: str) -> None:
        await self._step("undefine_vm", name)
        domain = self._domain(name)
        if domain.state.active:
            raise InvalidState("fake: kdlab never undefines a running domain")
        del self.domains[name]
        self._announce(name)

    async def start_vm(
        self,
        name: str,
        *,
        paused: bool,
        checkpoint: str = "",
        run: RunStart | None = None,
    ) -> None:
        await self._step("start_vm", name)
        self.last_run = run
        domain = self._domain(name)
        if domain.state.active:
            raise InvalidState("domain is already running")
        if checkpoint:
            self._checkpoint(domain, checkpoint)
            domain.loaded.append(checkpoint)
            domain.boot = domain.marks[checkpoint]
        # virtlogd truncates or creates the log (append='off') when QEMU starts;
        # a guest whose CPUs wait has printed nothing yet.
        domain.spec.console_log.write_bytes(
            b"" if paused else b"Linux version 6.1.0 (fake)\n"
        )
        domain.state = VMState.PAUSED if paused else VMState.RUNNING
        self._announce(name)

    async def mark_boot(self, name: str, mark: BootMark) -> None:
        await self._step("mark_boot", name)
        self._domain(name).boot = mark

    async def attach_disk(self, name: str, disk: Disk) -> None:
        await self._step("attach_disk", name)
        domain = self._domain(name)
        domain.spec = domain.spec.replace(disks=(*domain.spec.disks, disk))
        self._announce(name)

    async def save_checkpoint(self, name: str, tag: str, description: str) -> None:
        await self._step("save_checkpoint", name)
        domain = self._domain(name)
        if domain.raw_disk:
            raise UnsupportedDisk(f"VM {name!r} has disks that are not qcow2 (vda)")
        if not domain.state.active:
            raise InvalidState("fake: no memory to save")
        checkpoint = checkpoints.parse(tag, description, 0)
        domain.checkpoints[tag] = (checkpoint, description)
        domain.marks[tag] = domain.boot
        self._announce(name)

    async def restore_checkpoint(self, name: str, tag: str, *, paused: bool) -> None:
        await self._step("restore_checkpoint", name)
        domain = self._domain(name)
        self._checkpoint(domain, tag)
        domain.loaded.append(tag)
        domain.state = VMState.PAUSED if paused else VMState.RUNNING
        self._announce(name)

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        await self._step("delete_checkpoint", name)
        domain = self._domain(name)
        self._checkpoint(domain, tag)
        del domain.checkpoints[tag]
        self._announce(name)

    @staticmethod
    def _checkpoint(domain: Domain, tag: str) -> Checkpoint:
        if tag not in domain.checkpoints:
            raise NoSuchCheckpoint(f"fake: no checkpoint {tag!r}")
        return domain.checkpoints[tag][0]

    async def shutdown_vm(self, name: str) -> None:
        await self._step("shutdown_vm", name)
        domain = self._domain(name)
        if not domain.state.active:
            raise InvalidState("domain is not running")
        if self.guest_powers_off:
            loop = asyncio.get_running_loop()
            self._power_off[name] = loop.call_later(
                self.shutdown_delay, self.set_state, name, VMState.STOPPED
            )

    async def destroy_vm(self, name: str) -> None:
        await self._step("destroy_vm", name)
        domain = self._domain(name)
        if not domain.state.active:
            raise InvalidState("domain is not running")
        if name in self._power_off:
            self._power_off.pop(name).cancel()
        domain.state = VMState.STOPPED
        domain.stopped_by = StopCause.KILLED
        domain.panicked = domain.panic_handled = False
        self._announce(name)

    async def suspend_vm(self, name: str) -> None:
        await self._step("suspend_vm", name)
        domain = self._domain(name)
        if domain.state is VMState.RUNNING:
            domain.state = VMState.PAUSED
            self._announce(name)

    async def panic_handled(self, name: str) -> bool:
        return self._domain(name).panic_handled

    async def mark_panic_handled(self, name: str) -> None:
        await self._step("mark_panic_handled", name)
        self._domain(name).panic_handled = True

    async def dump_vm(
        self,
        name: str,
        volume: str,
        *,
        compressed: bool,  # noqa: ARG002 (the fake writes one format)
        memory_mib: int,
        progress: DumpProgress,
    ) -> Path:
        path = self.dump_dir / volume
        path.write_bytes(b"")  # libvirt creates the file first

        def half_written() -> None:
            progress(memory_mib << 19, memory_mib << 20)

        try:
            await self._step("dump_vm", name, while_held=half_written)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if not self._domain(name).state.active:
            path.unlink()
            raise InvalidState("domain is not running")
        path.write_bytes(self.dump_content)
        return path

    async def emulator(self) -> tuple[str, Path]:
        await self._step("emulator", "")
        return "QEMU 7.2.0", Path("/bin/true")

    async def run_position(self, name: str) -> int:
        await self._step("run_position", name)
        return self.icount

    async def monitor(self, name: str, command: str) -> str:
        await self._step("monitor", f"{name}: {command}")
        return ""

    async def create_recording_files(
        self, recording: str, disks: tuple[Disk, ...]
    ) -> RunFiles:
        files = await self.recording_files(recording, [d.target for d in disks])
        for path in (files.log, files.state, *(p for _t, p in files.disks)):
            path.write_bytes(b"")
        return files

    async def recording_files(
        self, recording: str, targets: Sequence[str] = ()
    ) -> RunFiles:
        folder = self.recording_dir
        return RunFiles(
            folder / f"{recording}.rr",
            folder / f"{recording}.state",
            tuple((t, folder / f"{recording}.{t}.qcow2") for t in targets),
        )

    async def list_recording_volumes(self) -> dict[str, tuple[Path, int]]:
        return {
            p.name: (p, p.stat().st_size) for p in sorted(self.recording_dir.iterdir())
        }

    async def delete_recording_volume(self, volume: str) -> None:
        (self.recording_dir / volume).unlink(missing_ok=True)

    async def recording_pool_free(self) -> int:
        return self.recording_free

    async def list_dump_volumes(self) -> dict[str, tuple[Path, int]]:
        await self._step("list_dump_volumes", "")
        return {
            p.name: (p, p.stat().st_size)
            for p in sorted(self.dump_dir.iterdir())
            if not p.name.startswith(".")
        }

    async def dump_volume_path(self, volume: str) -> Path:
        return self.dump_dir / volume

    async def delete_dump_volume(self, volume: str) -> None:
        await self._step("delete_dump_volume", volume)
        (self.dump_dir / volume).unlink(missing_ok=True)

    async def dump_pool_free(self) -> int:
        return self.dump_free

    async def open_console(
        self, name: str, on_output: ConsoleOutput, on_sent: ConsoleSent
    ) -> FakeConsole:
        await self._step("open_console", name)
        console = FakeConsole(on_output, on_sent)
        self.consoles.append(console)
        return console

    async def upload_boot_file(self, volume: str, fd: int, size: int) -> Path:
        await self._step("upload_boot_file", volume)
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise HypervisorError("fake: short read")
        self.volumes[volume] = data
        return POOL / volume

    async def delete_vm_volume(self, volume: str) -> None:
        await self._step("delete_vm_volume", volume)
        self.volumes.pop(volume, None)

    async def list_vm_volumes(self) -> list[str]:
        await self._step("list_vm_volumes", "")
        return sorted(self.volumes)

    async def host_resources(self) -> HostResources:
        await self._step("host_resources", "")
        return self.host

    async def list_images(self) -> list[ImageRecord]:
        await self._step("list_images", "")
        return [self._image(name) for name in sorted(self.images)]

    async def get_image(self, name: str) -> ImageRecord | None:
        await self._step("get_image", name)
        return self._image(name) if name in self.images else None

    async def image_owners(self) -> dict[str, int]:
        await self._step("image_owners", "")
        return dict(self.owners)

    async def set_image_owner(self, name: str, uid: int | None) -> None:
        await self._step("set_image_owner", name)
        if uid is None:
            self.owners.pop(name, None)
        else:
            self.owners[name] = uid

    async def create_image(self, name: str, size: int) -> ImageRecord:
        await self._step("create_image", name)
        return self._new_image(name, ImageFormat.RAW, size)

    async def upload_image(
        self, name: str, source: ImageSource, progress: UploadProgress
    ) -> ImageRecord:
        # Held like a real upload: it reports progress, so it stops once its
        # job is cancelled (the report raises).
        await self._step("upload_image", name, while_held=lambda: progress(0))
        # Like libvirt: the volume exists from the start of the upload.
        self._new_image(name, source.format, source.capacity)
        data = os.pread(source.fd, source.size, 0)
        if len(data) != source.size:
            del self.images[name]
            raise HypervisorError("fake: short read")
        self.heads[name] = data[:IMAGE_HEADER_BYTES]
        progress(source.size)
        return self._image(name)

    async def inspect_image(self, name: str) -> StoredImage:
        await self._step("inspect_image", name)
        image = self.images[name]
        return StoredImage(
            header=self.heads.get(name, bytes(IMAGE_HEADER_BYTES)),
            probed_format=image.format.value,
            tool_format=image.format.value,
            virtual_size=image.capacity,
        )

    async def delete_image(self, name: str) -> None:
        await self._step("delete_image", name)
        self.images.pop(name, None)
        self.owners.pop(name, None)

    async def resize_image(self, image: ImageRecord, size: int) -> ImageRecord:
        await self._step("resize_image", image.name)
        self.images[image.name] = dataclasses.replace(
            self.images[image.name], capacity=size
        )
        return self._image(image.name)

    async def create_vm_disk(
        self, volume: str, size: int, base: ImageRecord | None
    ) -> Path:
        await self._step("create_vm_disk", volume)
        self.volumes[volume] = b""
        self.disks[volume] = (size, base.name if base is not None else None)
        return POOL / volume

    # Internals.

    def _new_image(self, name: str, fmt: ImageFormat, size: int) -> ImageRecord:
        self.images[name] = ImageRecord(name, fmt, size, 0, IMAGE_POOL / name)
        return self._image(name)

    def _image(self, name: str) -> ImageRecord:
        """The image with the owner recorded for it (root if none), as libvirt's."""
        return dataclasses.replace(
            self.images[name], owner_uid=self.owners.get(name, 0)
        )

    async def _step(
        self, method: str, arg: str, while_held: Callable[[], None] | None = None
    ) -> None:
        self.calls.append(Call(method, arg))
        # Like a worker thread: other tasks run while "libvirt" works.
        await asyncio.sleep(0)
        for key in (f"{method}:{arg}", method):
            if key in self.holds:
                while not self.holds[key].is_set():
                    if while_held is not None:
                        while_held()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.holds[key].wait(), 0.01)
        for key in (f"{method}:{arg}", method):
            if key in self.failures:
                raise self.failures[key]

    def _domain(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise NoSuchVM(
                f"no VM named {name!r} (its libvirt domain is gone)"
            ) from None

    @staticmethod
    def _record(domain: Domain) -> VMRecord:
        how = stop_cause(domain.state, domain.boot, domain.stopped_by)
        found = sorted(
            (c for c, _ in domain.checkpoints.values()), key=lambda c: c.created_usec
        )
        return VMRecord(
            domain.spec,
            domain.uuid,
            domain.state,
            boot=domain.boot,
            last_stop=how,
            panicked=domain.panicked,
            checkpoints=tuple(found),
        )

    def _announce(self, name: str) -> None:
        if self._on_changed is not None:
            asyncio.get_running_loop().call_soon(self._on_changed, name)
