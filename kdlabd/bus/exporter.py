"""Keeps the objects on the bus in step with kdlab's VMs, images and jobs."""

from __future__ import annotations

from dbus_next.aio import MessageBus

from kdlab.wire import MANAGER_PATH, image_path, job_path, vm_path
from kdlabd.bus.auth import Authorizer
from kdlabd.bus.image import ImageInterface
from kdlabd.bus.job import JobInterface
from kdlabd.bus.manager import ManagerInterface
from kdlabd.bus.vm import VMInterface
from kdlabd.core.images import ImageService
from kdlabd.core.jobs import Job, JobManager
from kdlabd.core.models import ImageRecord, VMRecord
from kdlabd.core.vms import VMService


class BusExporter:
    """Observer of the core services: one object per VM, image and job.

    It is attached before the services load, so every object exists before
    kdlabd takes its bus name.
    """

    def __init__(self, bus: MessageBus, authorizer: Authorizer) -> None:
        self._bus = bus
        self._authorizer = authorizer
        self._manager: ManagerInterface | None = None
        self._vms: dict[str, VMInterface] = {}
        self._images: dict[str, ImageInterface] = {}
        self._jobs: dict[int, JobInterface] = {}

    def serve(
        self,
        vms: VMService,
        images: ImageService,
        jobs: JobManager,
    ) -> None:
        """Export the manager; VM, image and job objects follow as they appear."""
        self._services = (vms, images, jobs)
        self._manager = ManagerInterface(vms, images, jobs, self._authorizer)
        self._bus.export(MANAGER_PATH, self._manager)

    @property
    def manager(self) -> ManagerInterface:
        assert self._manager is not None, "serve() first"
        return self._manager

    def vm_added(self, record: VMRecord) -> None:
        vms, _, _ = self._services
        interface = VMInterface(record, vms, self._authorizer)
        self._vms[record.name] = interface
        path = vm_path(record.name)
        self._bus.export(path, interface)
        self.manager.VMNew(record.name, path)
        self._refresh_image_users()

    def vm_changed(self, record: VMRecord) -> None:
        self._vms[record.name].update(record)

    def vm_removed(self, name: str) -> None:
        path = vm_path(name)
        self._bus.unexport(path)
        del self._vms[name]
        self.manager.VMRemoved(name, path)
        self._refresh_image_users()

    def image_added(self, image: ImageRecord) -> None:
        _, images, _ = self._services
        interface = ImageInterface(image, images, self._authorizer)
        self._images[image.name] = interface
        self._bus.export(image_path(image.name), interface)

    def image_changed(self, image: ImageRecord) -> None:
        self._images[image.name].update(image)

    def image_removed(self, name: str) -> None:
        self._bus.unexport(image_path(name))
        del self._images[name]

    def job_added(self, job: Job) -> None:
        _, _, jobs = self._services
        interface = JobInterface(job, jobs, self._authorizer)
        self._jobs[job.id] = interface
        self._bus.export(job_path(job.id), interface)

    def job_changed(self, job: Job) -> None:
        self._jobs[job.id].update()

    job_finished = job_changed

    def job_removed(self, job: Job) -> None:
        self._bus.unexport(job_path(job.id))
        del self._jobs[job.id]

    def _refresh_image_users(self) -> None:
        _, images, _ = self._services
        for name, interface in self._images.items():
            interface.update(images.get(name))
