"""The seam between kdlab's use cases and a hypervisor (libvirt, or a fake in tests)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from kdlabd.core.limits import HostResources
from kdlabd.core.models import (
    Accel,
    BootMark,
    Disk,
    ImageRecord,
    ImageSource,
    RunFiles,
    RunStart,
    StoredImage,
    VMRecord,
    VMSpec,
)

DomainChanged = Callable[[str], None]
"""Called with a VM's name whenever its domain changed (state, definition)."""

Reconnected = Callable[[], None]
"""Called after the hypervisor connection was lost and re-established."""

UploadProgress = Callable[[int], None]
"""Told the bytes uploaded so far, from a worker thread; may raise to abort."""

DumpProgress = Callable[[int, int], None]
"""Told, on the loop, the bytes of guest memory dumped so far and their total."""

ConsoleOutput = Callable[[bytes], None]
"""Receives what a VM writes to its serial console; ``b""`` when it closed."""

ConsoleSent = Callable[[], None]
"""Told, on the loop, that the hypervisor took typed input (the backlog shrank)."""


class ConsoleStream(Protocol):
    """An open serial console of a running VM."""

    @property
    def backlog(self) -> int:
        """Bytes typed into the console that the hypervisor has not taken yet."""

    def send(self, data: bytes) -> None:
        """Type *data* into the console (never blocks; queued behind the backlog)."""

    async def close(self) -> None:
        """Close the console; no more output is delivered. Bounded in time."""


class Hypervisor(Protocol):
    """What kdlab needs from a hypervisor. Every method may raise a KdlabError.

    Implementations never block the event loop.
    """

    def watch(
        self, on_domain_changed: DomainChanged, on_reconnected: Reconnected
    ) -> None:
        """Register the callbacks for domain events and reconnections."""

    async def resolve_accel(self, accel: Accel) -> Accel:
        """Turn ``auto`` into ``kvm`` or ``tcg`` here; check explicit choices."""

    async def host_resources(self) -> HostResources:
        """The memory and CPUs of the host the VMs run on."""

    async def list_vms(self) -> list[VMRecord]:
        """Every kdlab VM the hypervisor has, running or not."""

    async def get_vm(self, name: str) -> VMRecord | None:
        """The VM called *name*, or None when no such kdlab domain exists."""

    async def define_vm(self, spec: VMSpec) -> VMRecord:
        """Define a persistent domain for *spec*; VMExists if the name is taken."""

    async def redefine_vm(self, spec: VMSpec) -> VMRecord:
        """Update the definition of the existing (inactive) VM *spec.name*."""

    async def undefine_vm(self, name: str) -> None:
        """Remove the VM's (inactive) domain definition."""

    async def start_vm(
        self,
        name: str,
        *,
        paused: bool,
        checkpoint: str = "",
        run: RunStart | None = None,
    ) -> None:
        """Boot the VM; with *paused*, its CPUs wait before the first instruction.

        With *checkpoint*, the VM starts in that checkpoint's state instead.
        With *run*, this boot records or replays (the definition stays as
        it is; the run's pieces are added to this boot only).
        """

    async def emulator(self) -> tuple[str, Path]:
        """The QEMU VMs run on: its version and its binary's path."""

    async def run_position(self, name: str) -> int:
        """The instructions a recording or replaying VM has executed (icount)."""

    async def monitor(self, name: str, command: str) -> str:
        """Run a command of QEMU's human monitor in the VM's QEMU; its answer."""

    async def create_recording_files(
        self, recording: str, disks: tuple[Disk, ...]
    ) -> RunFiles:
        """Make the recording's files in kdlab's recordings pool, writable by
        QEMU: an empty log, a blank qcow2 for its state, and a blank qcow2
        as large as each of *disks* for the run's writes."""

    async def recording_files(
        self, recording: str, targets: Sequence[str] = ()
    ) -> RunFiles:
        """Where the recording's files are (they may not exist), with its
        overlays of the disks *targets*."""

    async def list_recording_volumes(self) -> dict[str, tuple[Path, int]]:
        """The recordings pool's volumes: name to (path, size in bytes)."""

    async def delete_recording_volume(self, volume: str) -> None:
        """Delete one volume of the recordings pool (gone already is fine)."""

    async def recording_pool_free(self) -> int:
        """Bytes free on the recordings pool's filesystem."""

    async def mark_boot(self, name: str, mark: BootMark) -> None:
        """Record *mark* with the VM's definition, where the next
        :class:`VMRecord` of it (from this or a later kdlabd) reads it back."""

    async def shutdown_vm(self, name: str) -> None:
        """Ask the guest to power off (ACPI power button). Returns at once."""

    async def destroy_vm(self, name: str) -> None:
        """Pull the plug."""

    async def suspend_vm(self, name: str) -> None:
        """Stop the VM's CPUs where they are (QEMU keeps running)."""

    async def panic_handled(self, name: str) -> bool:
        """Whether kdlabd marked the VM's current boot's panic as handled."""

    async def mark_panic_handled(self, name: str) -> None:
        """Mark the panic of the VM's current boot as handled (forgotten when
        QEMU stops, so the next boot's panic is new)."""

    async def dump_vm(
        self,
        name: str,
        volume: str,
        *,
        compressed: bool,
        memory_mib: int,
        progress: DumpProgress,
    ) -> Path:
        """Write a memory-only dump of the VM into the dumps pool as *volume*
        (an ELF core, or kdump-compressed with zlib); its path. The VM is
        paused meanwhile and resumed if it ran. Nothing is left on failure."""

    async def list_dump_volumes(self) -> dict[str, tuple[Path, int]]:
        """The dumps pool's volumes: name -> (path, size in bytes)."""

    async def dump_volume_path(self, volume: str) -> Path:
        """Where the dumps pool keeps *volume* (which need not exist)."""

    async def delete_dump_volume(self, volume: str) -> None:
        """Delete the volume *volume* of the dumps pool if it exists."""

    async def dump_pool_free(self) -> int:
        """Bytes free where the dumps pool is."""

    async def open_console(
        self, name: str, on_output: ConsoleOutput, on_sent: ConsoleSent
    ) -> ConsoleStream:
        """Open the VM's serial console; output goes to *on_output* on the loop.

        A console has a hypervisor connection of its own: one that stalls
        (a guest that takes no input) cannot starve other calls.
        """

    async def attach_disk(self, name: str, disk: Disk) -> None:
        """Plug the blank *disk* into the running VM, now and in its definition."""

    async def save_checkpoint(self, name: str, tag: str, description: str) -> None:
        """Save the running or paused VM's whole state as *tag*, in one step.

        UnsupportedDisk if a disk is not qcow2 (nothing is made then).
        """

    async def restore_checkpoint(self, name: str, tag: str, *, paused: bool) -> None:
        """Load *tag* into the running or paused VM, in the same QEMU process.

        Attached debuggers and consoles stay attached. With *paused* the CPUs
        stay stopped afterwards; otherwise they run.
        """

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        """Delete the checkpoint *tag* (its metadata and its state in the disks)."""

    async def list_images(self) -> list[ImageRecord]:
        """Every image of kdlab's image pool, with its owner."""

    async def get_image(self, name: str) -> ImageRecord | None:
        """The image *name*, or None."""

    async def image_owners(self) -> dict[str, int]:
        """The owner recorded for each image name, images made or not yet."""

    async def set_image_owner(self, name: str, uid: int | None) -> None:
        """Record *uid* as the owner of image *name* (None: forget its owner).

        Recorded before the image is made, so no image exists without its owner.
        """

    async def create_image(self, name: str, size: int) -> ImageRecord:
        """A blank (sparse raw) image of *size* bytes."""

    async def upload_image(
        self, name: str, source: ImageSource, progress: UploadProgress
    ) -> ImageRecord:
        """Stream *source* into the new image *name*; nothing is left on failure."""

    async def inspect_image(self, name: str) -> StoredImage:
        """What the image *name* holds as stored (never what a client offered)."""

    async def delete_image(self, name: str) -> None:
        """Delete the image *name* if it exists, and its owner record."""

    async def resize_image(self, image: ImageRecord, size: int) -> ImageRecord:
        """Grow *image* to *size* bytes."""

    async def create_vm_disk(
        self, volume: str, size: int, base: ImageRecord | None
    ) -> Path:
        """A VM's qcow2 disk: an overlay on *base* (O(1), no copy) or blank."""

    async def upload_boot_file(self, volume: str, fd: int, size: int) -> Path:
        """Stream *size* bytes of *fd* into the VM volume *volume*; return its path."""

    async def list_vm_volumes(self) -> list[str]:
        """Names of the volumes in the pool of VM volumes (kernels, initrds, disks)."""

    async def delete_vm_volume(self, volume: str) -> None:
        """Delete the VM volume *volume* (kernel, initrd or disk) if it exists."""
