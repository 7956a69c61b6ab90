"""``org.kdlab.Kdlab1.Manager`` at ``/org/kdlab/Kdlab1``: VMs, images and jobs."""

# No "from __future__ import annotations": dbus-next reads D-Bus type strings
# from the annotations and needs them unevaluated string constants.

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, signal

from kdlab.wire import (
    API_REVISION,
    BUILD_OPTIONS,
    CREATE_OPTIONS,
    MANAGER_INTERFACE,
    ON_PANIC_DUMP_AND_STOP,
    dump_path,
    image_path,
    job_path,
    vm_path,
)
from kdlabd import __version__
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.dbus_next_patches import Marshalled, marshal
from kdlabd.bus.options import take
from kdlabd.core.dumps import DumpService
from kdlabd.core.images import ImageService
from kdlabd.core.jobs import JobManager
from kdlabd.core.models import DebugSettings
from kdlabd.core.rootfs import DEFAULT_SIZE_BYTES, RootfsSpec
from kdlabd.core.vms import CreateRequest, VMService


class ManagerInterface(ServiceInterface):
    """The entry point: creates VMs and finds them by name."""

    def __init__(
        self,
        vms: VMService,
        images: ImageService,
        jobs: JobManager,
        authorizer: Authorizer,
        dumps: DumpService,
    ) -> None:
        super().__init__(MANAGER_INTERFACE)
        self.vms = vms
        self.images = images
        self.dumps = dumps
        self.jobs = jobs
        self.authorizer = authorizer
        # ListVMs's answer, marshalled, until a VM comes or goes.
        self._vm_paths: Marshalled | None = None

    def vm_added(self, name: str, path: str) -> None:
        """Announce the new VM *name* (exported at *path*)."""
        self._vm_paths = None
        self.VMNew(name, path)

    def vm_removed(self, name: str, path: str) -> None:
        """Announce that the VM *name* (at *path*) is gone."""
        self._vm_paths = None
        self.VMRemoved(name, path)

    def dump_added(self, dump_id: str) -> None:
        """Announce the new dump *dump_id*."""
        self.DumpNew(dump_id, dump_path(dump_id))

    def dump_removed(self, dump_id: str) -> None:
        """Announce that the dump *dump_id* is gone."""
        self.DumpRemoved(dump_id, dump_path(dump_id))

    def resource_owner(self) -> int | None:
        return None

    @exported(Action.MANAGE_VMS)
    async def CreateVM(self, caller: Caller, name: "s", options: "a{sv}") -> "o":
        """Create a VM owned by the caller; the kernel comes as a descriptor."""
        opts = take(options, CREATE_OPTIONS)
        port = opts.get("gdb_tcp_port")
        record = await self.vms.create(
            CreateRequest(
                name=name,
                owner_uid=caller.uid,
                kernel_fd=opts.get("kernel"),
                initrd_fd=opts.get("initrd"),
                cmdline=opts.get("cmdline", ""),
                memory_mib=opts.get("memory_mib", CreateRequest.memory_mib),
                vcpus=opts.get("vcpus", CreateRequest.vcpus),
                debug=DebugSettings(
                    gdb=opts.get("gdb", True), gdb_tcp_port=port or None
                ),
                vmlinux=opts.get("vmlinux", ""),
                kernel_path=opts.get("kernel_path", ""),
                tree=opts.get("tree", ""),
                image=opts.get("image", ""),
                disk_size=opts.get("disk_size", 0),
                extra_disks=tuple(opts.get("extra_disks", ())),
                on_panic=opts.get("on_panic", ON_PANIC_DUMP_AND_STOP),
                initramfs=opts.get("initramfs", ""),
                shares=tuple(opts.get("shares", {}).items()),
            )
        )
        return vm_path(record.name)

    @exported(Action.INSPECT)
    async def ListVMs(self, caller: Caller) -> "ao":
        """Object paths of every VM, sorted by name."""
        if self._vm_paths is None:
            paths = [vm_path(record.name) for record in self.vms.list()]
            self._vm_paths = marshal("ao", [paths])
        return self._vm_paths

    @exported(Action.INSPECT)
    async def GetVM(self, caller: Caller, name: "s") -> "o":
        """The object path of the VM called *name* (error NoSuchVM if there is none)."""
        return vm_path(self.vms.get(name).name)

    @exported(Action.MANAGE_VMS)
    async def CreateImage(
        self, caller: Caller, name: "s", size: "t", options: "a{sv}"
    ) -> "o":
        """A blank image of *size* bytes, owned by the caller."""
        take(options, {})
        return image_path((await self.images.create(name, size, caller.uid)).name)

    @exported(Action.MANAGE_VMS)
    async def ImportImage(
        self, caller: Caller, name: "s", file: "h", options: "a{sv}"
    ) -> "o":
        """Import a raw or self-contained qcow2 file (a descriptor) as a job."""
        take(options, {})
        job = await self.images.import_image(name, file, caller.uid)
        return job_path(job.id)

    @exported(Action.MANAGE_VMS)
    async def BuildImage(self, caller: Caller, name: "s", options: "a{sv}") -> "o":
        """Build a Debian root filesystem image with debootstrap, as a job."""
        opts = take(options, BUILD_OPTIONS)
        spec = RootfsSpec(
            suite=opts.get("suite", "bookworm"),
            size_bytes=opts.get("size", DEFAULT_SIZE_BYTES),
            packages=tuple(opts.get("packages", ())),
            ssh_key=opts.get("ssh_key", ""),
        )
        return job_path(self.images.build_rootfs(name, spec, caller.uid).id)

    @exported(Action.INSPECT)
    async def ListImages(self, caller: Caller) -> "ao":
        """Object paths of every image, sorted by name."""
        return [image_path(image.name) for image in self.images.list()]

    @exported(Action.INSPECT)
    async def GetImage(self, caller: Caller, name: "s") -> "o":
        """The object path of the image *name* (error NoSuchImage if none)."""
        return image_path(self.images.get(name).name)

    @exported(Action.INSPECT)
    async def ListDumps(self, caller: Caller) -> "ao":
        """Object paths of every dump, oldest first."""
        return [dump_path(dump.id) for dump in self.dumps.list()]

    @exported(Action.INSPECT)
    async def GetDump(self, caller: Caller, id: "s") -> "o":
        """The object path of the dump *id* (error NoSuchDump if none)."""
        return dump_path(self.dumps.get(id).id)

    @exported(Action.INSPECT)
    async def ListJobs(self, caller: Caller) -> "ao":
        """Object paths of running and recently finished jobs."""
        return [job_path(job.id) for job in self.jobs.list()]

    @dbus_property(access=PropertyAccess.READ)
    def APIRevision(self) -> "u":
        """Bumped on every additive change of kdlab's interfaces."""
        return API_REVISION

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Accel(self) -> "s":
        """How new VMs are accelerated on this host: ``kvm`` or ``tcg``."""
        return self.vms.accel.value

    @signal()
    def VMNew(self, name: str, path: str) -> "so":
        return [name, path]

    @signal()
    def VMRemoved(self, name: str, path: str) -> "so":
        return [name, path]

    @signal()
    def DumpNew(self, dump_id: str, path: str) -> "so":
        return [dump_id, path]

    @signal()
    def DumpRemoved(self, dump_id: str, path: str) -> "so":
        return [dump_id, path]
