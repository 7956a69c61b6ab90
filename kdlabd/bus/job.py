"""``org.kdlab.Kdlab1.Job``: a long operation (image import or build) to watch."""

# No "from __future__ import annotations": see kdlabd/bus/manager.py.

from typing import Any

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, signal

from kdlab.states import JobState
from kdlab.wire import JOB_INTERFACE
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.properties import announce_changes
from kdlabd.core.jobs import Job, JobManager


def properties(job: Job) -> dict[str, Any]:
    return {
        "Id": job.id,
        "Kind": job.kind,
        "Target": job.target,
        "Owner": job.owner_uid,
        "Progress": job.progress,
        "Status": job.status,
        "State": job.state.value,
        "Error": job.error,
    }


class JobInterface(ServiceInterface):
    """Progress is announced with PropertiesChanged; the end with Completed."""

    def __init__(self, job: Job, jobs: JobManager, authorizer: Authorizer) -> None:
        super().__init__(JOB_INTERFACE)
        self._job = job
        self.jobs = jobs
        self.authorizer = authorizer
        self._props = properties(job)

    def resource_owner(self) -> int | None:
        return self._job.owner_uid

    def update(self) -> None:
        """Announce the properties that changed, and the end of the job."""
        self._props = announce_changes(self, self._props, properties(self._job))
        if self._job.state is not JobState.RUNNING:
            self.Completed(self._job.state is JobState.SUCCEEDED, self._job.message)

    @exported(Action.MANAGE_VMS)
    async def Cancel(self, caller: Caller) -> None:
        """Stop the job; what it made so far is removed."""
        self.jobs.cancel(self._job.id)

    @signal()
    def Completed(self, success: bool, message: str) -> "bs":
        return [success, message]

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "u":
        return self._props["Id"]

    @dbus_property(access=PropertyAccess.READ)
    def Kind(self) -> "s":
        """``import`` or ``build``."""
        return self._props["Kind"]

    @dbus_property(access=PropertyAccess.READ)
    def Target(self) -> "s":
        """The name of the image the job makes."""
        return self._props["Target"]

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self._props["Owner"]

    @dbus_property(access=PropertyAccess.READ)
    def Progress(self) -> "d":
        """From 0.0 to 1.0."""
        return self._props["Progress"]

    @dbus_property(access=PropertyAccess.READ)
    def Status(self) -> "s":
        """What the job is doing now, or how it ended."""
        return self._props["Status"]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        """``running``, ``succeeded``, ``failed`` or ``cancelled``."""
        return self._props["State"]

    @dbus_property(access=PropertyAccess.READ)
    def Error(self) -> "s":
        """Why a failed job failed, as a D-Bus error name ("" otherwise)."""
        return self._props["Error"]
