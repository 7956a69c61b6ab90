"""``org.kdlab.Kdlab1.Manager`` at ``/org/kdlab/Kdlab1``: create, find and list VMs."""

# No "from __future__ import annotations": dbus-next reads D-Bus type strings
# from the annotations and needs them unevaluated string constants.

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, signal

from kdlabd import __version__
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.options import take
from kdlabd.core.models import DebugSettings
from kdlabd.core.vms import CreateRequest, VMService
from kdlabd.wire import API_REVISION, MANAGER_INTERFACE, vm_path

CREATE_OPTIONS = {
    "kernel": "h",
    "initrd": "h",
    "cmdline": "s",
    "memory_mib": "u",
    "vcpus": "u",
    "gdb": "b",
    "gdb_tcp_port": "q",
    "vmlinux": "s",
    "kernel_path": "s",
}


class ManagerInterface(ServiceInterface):
    """The entry point: creates VMs and finds them by name."""

    def __init__(self, vms: VMService, authorizer: Authorizer) -> None:
        super().__init__(MANAGER_INTERFACE)
        self.vms = vms
        self.authorizer = authorizer

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
                kernel_source=opts.get("kernel_path", ""),
            )
        )
        return vm_path(record.name)

    @exported(Action.INSPECT)
    async def ListVMs(self, caller: Caller) -> "ao":
        """Object paths of every VM, sorted by name."""
        return [vm_path(record.name) for record in self.vms.list()]

    @exported(Action.INSPECT)
    async def GetVM(self, caller: Caller, name: "s") -> "o":
        """The object path of the VM called *name* (error NoSuchVM if there is none)."""
        return vm_path(self.vms.get(name).name)

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
