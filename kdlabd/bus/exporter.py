"""Keeps the objects on the bus in step with the VM view of :class:`VMService`."""

from __future__ import annotations

from dbus_next.aio import MessageBus

from kdlabd.bus.auth import Authorizer
from kdlabd.bus.manager import ManagerInterface
from kdlabd.bus.vm import VMInterface
from kdlabd.core.models import VMRecord
from kdlabd.core.vms import VMService
from kdlabd.wire import MANAGER_PATH, vm_path


class BusExporter:
    """A :class:`~kdlabd.core.vms.VMObserver` that exports one object per VM."""

    def __init__(self, bus: MessageBus, authorizer: Authorizer) -> None:
        self._bus = bus
        self._authorizer = authorizer
        self._vms: VMService | None = None
        self._manager: ManagerInterface | None = None
        self._objects: dict[str, VMInterface] = {}

    def serve(self, vms: VMService) -> None:
        """Export the manager for *vms*; VM objects follow as VMs appear."""
        self._vms = vms
        self._manager = ManagerInterface(vms, self._authorizer)
        self._bus.export(MANAGER_PATH, self._manager)

    def vm_added(self, record: VMRecord) -> None:
        assert self._vms is not None, "serve() first"
        assert self._manager is not None, "serve() first"
        interface = VMInterface(record, self._vms, self._authorizer)
        self._objects[record.name] = interface
        path = vm_path(record.name)
        self._bus.export(path, interface)
        self._manager.VMNew(record.name, path)

    def vm_changed(self, record: VMRecord) -> None:
        self._objects[record.name].update(record)

    def vm_removed(self, name: str) -> None:
        assert self._manager is not None, "serve() first"
        path = vm_path(name)
        self._bus.unexport(path)
        del self._objects[name]
        self._manager.VMRemoved(name, path)
