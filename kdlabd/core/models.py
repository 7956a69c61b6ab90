"""kdlab's models: what a VM is, independent of libvirt and D-Bus."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path

from kdlab import wire
from kdlab.kernel.diagnosis import Diagnosis
from kdlab.states import StopCause, VMState
from kdlabd.core import cmdline as kernel_cmdline


class Accel(enum.StrEnum):
    """How guests are accelerated: ``auto`` picks KVM only where it works."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class DebugSettings:
    """The gdbstub of a VM.

    The stub listens on a unix socket only root and QEMU can reach; a TCP
    listener (always on 127.0.0.1) exists only when *gdb_tcp_port* is set.
    """

    gdb: bool = True
    gdb_tcp_port: int | None = None


class ImageFormat(enum.StrEnum):
    """Disk image formats kdlab accepts."""

    RAW = "raw"
    QCOW2 = "qcow2"


@dataclass(frozen=True)
class ImageRecord:
    """A disk image in kdlab's image pool."""

    name: str
    format: ImageFormat
    capacity: int
    allocation: int
    path: Path
    owner_uid: int = 0
    """The uid that imported, built or created it; root (0) for images kdlab
    did not record an owner of (made before owners were recorded, or by hand)."""


@dataclass(frozen=True)
class ImageSource:
    """An image file a client handed over: its descriptor and what it holds."""

    fd: int
    size: int
    format: ImageFormat
    capacity: int


@dataclass(frozen=True)
class StoredImage:
    """What an image volume holds once its bytes are stored, seen three ways."""

    header: bytes
    """Its first bytes (at least :data:`kdlabd.core.validate.IMAGE_HEADER_BYTES`)."""
    probed_format: str
    """The format libvirt reads from the volume (what a VM's overlay is told)."""
    tool_format: str
    """The format qemu-img reports ("" where it cannot run: a remote libvirt)."""
    virtual_size: int
    backing: str = ""
    """A backing file named by the image (libvirt's or qemu-img's view)."""
    data_file: str = ""
    """An external data file named by the image (qemu-img's view)."""


@dataclass(frozen=True)
class Backing:
    """The base volume of an overlay, with its format stated, never probed."""

    path: Path
    format: ImageFormat


@dataclass(frozen=True)
class Disk:
    """A VM's own disk: a qcow2 overlay on an image, or a blank qcow2 volume."""

    path: Path
    target: str
    base_image: str = ""
    base: Backing | None = None
    """The image's volume under the overlay; the chain ends there."""


@dataclass(frozen=True)
class Share:
    """A directory of the owner's machine the guest may mount, by tag.

    kdlabd never opens *directory*: the owner serves it with a virtiofsd of
    their own (see :meth:`kdlabd.core.vms.VMService.serve_shares`), on the
    socket QEMU connects to.
    """

    tag: str
    """What the guest mounts (``mount -t virtiofs TAG DIR``)."""
    directory: str
    """The owner's absolute path, a hint for the client that serves it."""
    socket: Path
    """kdlabd's unix socket QEMU connects to, as a vhost-user-fs client."""


@dataclass(frozen=True)
class VMSpec:
    """Everything needed to define a VM. Stored in the domain's metadata."""

    name: str
    owner_uid: int
    kernel: Path
    initrd: Path | None
    cmdline: str
    memory_mib: int
    vcpus: int
    accel: Accel
    console_log: Path
    gdb_socket: Path
    debug: DebugSettings = DebugSettings()
    agent_socket: Path | None = None
    """The host side of the exec channel; None for a VM defined before kdlab
    had one (it runs no commands)."""
    created_usec: int = 0
    release: str = ""
    vmlinux: str = ""
    kernel_path: str = ""
    tree: str = ""
    disks: tuple[Disk, ...] = ()
    on_panic: str = wire.ON_PANIC_DUMP_AND_STOP
    """What kdlabd does when the kernel panics (one of wire.ON_PANIC_VALUES)."""
    initramfs: str = ""
    """kdlab's initramfs the initrd is, by mode (wire.INITRAMFS_VALUES): kdlabctl
    builds it again with a new kernel."""
    shares: tuple[Share, ...] = ()
    """Directories the guest may mount, in tag order (fixed at creation)."""
    """*release* is read from the bzImage; *vmlinux*, *kernel_path* and
    *tree* (a kernel source tree) are the client's paths, kept as hints for
    kdlabctl (gdb, start) and never opened by kdlabd."""

    @property
    def effective_cmdline(self) -> str:
        """The command line the VM boots with: *cmdline* and kdlab's additions
        (see :func:`kdlabd.core.cmdline.effective`)."""
        return kernel_cmdline.effective(
            self.cmdline,
            self.disks,
            gdb=self.debug.gdb,
            shares=tuple(share.tag for share in self.shares),
        )

    def replace(self, **changes: object) -> VMSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Run:
    """A boot that records or replays: QEMU's record/replay (icount) of the VM.

    The run's own pieces (the icount options, the log, the state drive) are
    added to the VM's definition for that boot only: libvirt starts the
    domain from a live definition and keeps the persistent one as it is.
    """

    mode: str
    """:data:`kdlab.wire.RUN_RECORD` or :data:`kdlab.wire.RUN_REPLAY`."""
    recording: str
    """The recording's id."""


@dataclass(frozen=True)
class RunFiles:
    """Where QEMU keeps a run's recording: paths kdlabd chose in its pool."""

    log: Path
    """QEMU's record/replay log (``rrfile``)."""
    state: Path
    """A qcow2 no device sees: QEMU's snapshot of the run's start, and the
    snapshots kdlabd takes during a replay (``rrsnapshot``)."""
    disks: tuple[tuple[str, Path], ...] = ()
    """Per disk target, the recording's own qcow2 over the VM's disk: the
    run's writes go there, never into the VM's disk."""


@dataclass(frozen=True)
class RunStart:
    """What a recording or replaying boot needs from the hypervisor."""

    run: Run
    files: RunFiles
    vcpus: int = 1
    """QEMU's record/replay runs one vCPU (Record's single_cpu lowers it)."""


@dataclass(frozen=True)
class BootMark:
    """What kdlabd records with a VM's domain about its current or last boot,
    so that it outlives kdlabd: which boot it is, and whether a Stop asked for
    its end. Clients key what they saw of a boot on *started_usec*."""

    started_usec: int = 0
    """When kdlabd started the boot, in microseconds since the epoch; 0: none."""
    stop_requested: bool = False
    """A Stop call was made during the boot."""
    run: Run | None = None
    """The recording the boot records or replays; None for a plain boot."""


@dataclass(frozen=True)
class Checkpoint:
    """A saved running state of a VM (memory, CPUs, devices, disks), by tag.

    Kept by the hypervisor (libvirt's snapshot metadata, the state in the
    VM's qcow2 disks); kdlab's own facts travel in its description (see
    :mod:`kdlabd.core.checkpoints`).
    """

    tag: str
    created_usec: int
    memory_bytes: int
    boot: int
    """The boot it was taken in (its :attr:`BootMark.started_usec`)."""
    fingerprint: tuple[tuple[str, str], ...] = ()
    """What the VM was when it was taken: kernel, command line, devices."""


@dataclass(frozen=True)
class VMRecord:
    """A VM as the hypervisor knows it: its spec, identity and current state."""

    spec: VMSpec
    uuid: str
    state: VMState
    waiting_for_debugger: bool = False
    diagnosis: Diagnosis | None = None
    boot: BootMark = BootMark()
    last_stop: StopCause = StopCause.NONE
    """How the last boot ended (see :func:`stop_cause`)."""
    panicked: bool = False
    """The hypervisor saw the guest panic (pvpanic) and keeps it stopped."""
    checkpoints: tuple[Checkpoint, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name


def stop_cause(state: VMState, boot: BootMark, how: StopCause) -> StopCause:
    """How the boot *boot* of a VM now in *state* ended, where *how* is what
    the hypervisor tells of the end (it cannot tell a Stop call from any other
    power-off: the mark can)."""
    if not state.off or boot.started_usec == 0:
        return StopCause.NONE
    return StopCause.REQUESTED if boot.stop_requested else how
