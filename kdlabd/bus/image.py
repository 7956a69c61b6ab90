"""``org.kdlab.Kdlab1.Image``: one object per disk image of kdlab's pool."""

# No "from __future__ import annotations": see kdlabd/bus/manager.py.

from typing import Any

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property

from kdlab.wire import IMAGE_INTERFACE
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.options import take
from kdlabd.bus.properties import announce_changes
from kdlabd.core.images import ImageService
from kdlabd.core.models import ImageRecord


class ImageInterface(ServiceInterface):
    """A disk image; VM disks are qcow2 overlays of it."""

    def __init__(
        self, image: ImageRecord, images: ImageService, authorizer: Authorizer
    ) -> None:
        super().__init__(IMAGE_INTERFACE)
        self._name = image.name
        self.images = images
        self.authorizer = authorizer
        self._props = self._properties(image)

    def resource_owner(self) -> int | None:
        """Another user's image needs manage-others to delete or resize."""
        owner: int = self._props["Owner"]
        return owner

    def _properties(self, image: ImageRecord) -> dict[str, Any]:
        return {
            "Name": image.name,
            "Owner": image.owner_uid,
            "Format": image.format.value,
            "Capacity": image.capacity,
            "Allocation": image.allocation,
            "UsedBy": list(self.images.used_by(image.name)),
        }

    def update(self, image: ImageRecord) -> None:
        """Take the image's new state and announce the properties that changed."""
        self._props = announce_changes(self, self._props, self._properties(image))

    @exported(Action.MANAGE_VMS)
    async def Delete(self, caller: Caller) -> None:
        """Delete the image; refused while a VM's disk is based on it.

        Another user's image: only with manage-others (root without polkit).
        """
        await self.images.delete(self._name)

    @exported(Action.MANAGE_VMS)
    async def Resize(self, caller: Caller, size: "t", options: "a{sv}") -> None:
        """Grow the image to *size* bytes; refused while VMs use it."""
        take(options, {})
        await self.images.resize(self._name, size)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self._props["Name"]

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        """The uid that imported, built or created the image (0 if not recorded)."""
        return self._props["Owner"]

    @dbus_property(access=PropertyAccess.READ)
    def Format(self) -> "s":
        """``raw`` or ``qcow2``."""
        return self._props["Format"]

    @dbus_property(access=PropertyAccess.READ)
    def Capacity(self) -> "t":
        """Virtual size in bytes."""
        return self._props["Capacity"]

    @dbus_property(access=PropertyAccess.READ)
    def Allocation(self) -> "t":
        """Bytes the image takes on the host."""
        return self._props["Allocation"]

    @dbus_property(access=PropertyAccess.READ)
    def UsedBy(self) -> "as":
        """Names of the VMs whose disks are based on this image."""
        return self._props["UsedBy"]
