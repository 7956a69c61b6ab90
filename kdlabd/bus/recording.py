"""``org.kdlab.Kdlab1.Recording``: one object per recording of kdlab's pool."""

# No "from __future__ import annotations": see kdlabd/bus/manager.py.

from typing import Any

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property

from kdlab.wire import RECORDING_INTERFACE
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.properties import announce_changes
from kdlabd.core.recordings import RecordingRecord, RecordingService


def properties(recording: RecordingRecord) -> dict[str, Any]:
    """The D-Bus property values of *recording*."""
    return {
        "Id": recording.id,
        "VM": recording.vm,
        "VMUUID": recording.vm_uuid,
        "Owner": recording.owner_uid,
        "KernelRelease": recording.kernel_release,
        "Cmdline": recording.cmdline,
        "Qemu": recording.qemu,
        "Instructions": recording.instructions,
        "Seconds": recording.seconds,
        "Ended": recording.ended,
        "Truncated": recording.truncated,
        "Created": recording.created_usec,
        "Size": recording.size,
        "State": recording.state,
    }


class RecordingInterface(ServiceInterface):
    """A recording of a VM's run; its owner may delete it."""

    def __init__(
        self,
        recording: RecordingRecord,
        recordings: RecordingService,
        authorizer: Authorizer,
    ) -> None:
        super().__init__(RECORDING_INTERFACE)
        self._id = recording.id
        self._owner = recording.owner_uid
        self.recordings = recordings
        self.authorizer = authorizer
        self._props = properties(recording)

    def resource_owner(self) -> int | None:
        """Another user's recording needs manage-others to delete."""
        return self._owner

    def update(self, recording: RecordingRecord) -> None:
        """Take the recording's new state and announce what changed."""
        self._props = announce_changes(self, self._props, properties(recording))

    @exported(Action.MANAGE_VMS)
    async def Delete(self, caller: Caller) -> None:
        """Delete the recording's files; the object goes."""
        await self.recordings.delete(self._id)

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
    def Cmdline(self) -> "s":
        return self._props["Cmdline"]

    @dbus_property(access=PropertyAccess.READ)
    def Qemu(self) -> "s":
        return self._props["Qemu"]

    @dbus_property(access=PropertyAccess.READ)
    def Instructions(self) -> "t":
        return self._props["Instructions"]

    @dbus_property(access=PropertyAccess.READ)
    def Seconds(self) -> "d":
        return self._props["Seconds"]

    @dbus_property(access=PropertyAccess.READ)
    def Ended(self) -> "s":
        return self._props["Ended"]

    @dbus_property(access=PropertyAccess.READ)
    def Truncated(self) -> "b":
        return self._props["Truncated"]

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> "t":
        return self._props["Created"]

    @dbus_property(access=PropertyAccess.READ)
    def Size(self) -> "t":
        return self._props["Size"]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self._props["State"]
