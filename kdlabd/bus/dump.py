"""``org.kdlab.Kdlab1.Dump``: one object per post-mortem dump of kdlab's pool."""

# No "from __future__ import annotations": see kdlabd/bus/manager.py.

from typing import Any

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property

from kdlab.wire import DUMP_INTERFACE
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.properties import announce_changes
from kdlabd.core.dumps import DumpRecord, DumpService


def properties(dump: DumpRecord) -> dict[str, Any]:
    """The D-Bus property values of *dump*: the headline without the console's
    words (GetHeadline has them, for the owner)."""
    return {
        "Id": dump.id,
        "VM": dump.vm,
        "VMUUID": dump.vm_uuid,
        "Owner": dump.owner_uid,
        "KernelRelease": dump.kernel_release,
        "BuildId": dump.build_id,
        "VmlinuxHint": dump.vmlinux_hint,
        "Reason": dump.reason,
        "Headline": dump.public_headline,
        "Created": dump.created_usec,
        "Size": dump.size,
        "Format": dump.format,
        "Vmcoreinfo": dump.vmcoreinfo,
        "Problem": dump.problem,
        "State": dump.state,
    }


class DumpInterface(ServiceInterface):
    """A memory dump of a VM's guest; its owner may open or delete it."""

    def __init__(
        self, dump: DumpRecord, dumps: DumpService, authorizer: Authorizer
    ) -> None:
        super().__init__(DUMP_INTERFACE)
        self._id = dump.id
        self._owner = dump.owner_uid
        self.dumps = dumps
        self.authorizer = authorizer
        self._props = properties(dump)

    def resource_owner(self) -> int | None:
        """Another user's dump needs manage-others to open, read or delete."""
        return self._owner

    def update(self, dump: DumpRecord) -> None:
        """Take the dump's new state and announce the properties that changed."""
        self._props = announce_changes(self, self._props, properties(dump))

    @exported(Action.DEBUG_VMS)
    async def Open(self, caller: Caller) -> "h":
        """A read-only, seekable descriptor of the complete dump."""
        return await self.dumps.open(self._id)

    @exported(Action.DEBUG_VMS)
    async def GetHeadline(self, caller: Caller) -> "s":
        """The panic or Oops line as the console printed it."""
        return self.dumps.get(self._id).headline

    @exported(Action.MANAGE_VMS)
    async def Delete(self, caller: Caller) -> None:
        """Delete the dump's volume; the object goes."""
        await self.dumps.delete(self._id)

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self._props["Id"]

    @dbus_property(access=PropertyAccess.READ)
    def VM(self) -> "s":
        return self._props["VM"]

    @dbus_property(access=PropertyAccess.READ)
    def VMUUID(self) -> "s":
        return self._props["VMUUID"]

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self._props["Owner"]

    @dbus_property(access=PropertyAccess.READ)
    def KernelRelease(self) -> "s":
        return self._props["KernelRelease"]

    @dbus_property(access=PropertyAccess.READ)
    def BuildId(self) -> "s":
        return self._props["BuildId"]

    @dbus_property(access=PropertyAccess.READ)
    def VmlinuxHint(self) -> "s":
        return self._props["VmlinuxHint"]

    @dbus_property(access=PropertyAccess.READ)
    def Reason(self) -> "s":
        return self._props["Reason"]

    @dbus_property(access=PropertyAccess.READ)
    def Headline(self) -> "s":
        return self._props["Headline"]

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> "t":
        return self._props["Created"]

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> "t":
        return self._props["Size"]

    @dbus_property(access=PropertyAccess.READ)
    def Format(self) -> "s":
        return self._props["Format"]

    @dbus_property(access=PropertyAccess.READ)
    def Vmcoreinfo(self) -> "b":
        return self._props["Vmcoreinfo"]

    @dbus_property(access=PropertyAccess.READ)
    def Problem(self) -> "s":
        return self._props["Problem"]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self._props["State"]
