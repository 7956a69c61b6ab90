"""Keeps the objects on the bus in step with kdlab's VMs, images and jobs."""

from __future__ import annotations

from dbus_next.aio import MessageBus

from kdlab.wire import (
    MANAGER_PATH,
    dump_path,
    image_path,
    job_path,
    process_path,
    recording_path,
    vm_path,
)
from kdlabd.bus.auth import Authorizer
from kdlabd.bus.dump import DumpInterface
from kdlabd.bus.image import ImageInterface
from kdlabd.bus.job import JobInterface
from kdlabd.bus.manager import ManagerInterface
from kdlabd.bus.process import ProcessInterface
from kdlabd.bus.recording import RecordingInterface
from kdlabd.bus.vm import VMInterface
from kdlabd.core.checkpoints import CheckpointService
from kdlabd.core.dumps import DumpRecord, DumpService
from kdlabd.core.execs import ExecService, ProcessRecord
from kdlabd.core.images import ImageService
from kdlabd.core.jobs import Job, JobManager
from kdlabd.core.models import ImageRecord, VMRecord
from kdlabd.core.recordings import RecordingRecord, RecordingService
from kdlabd.core.vms import VMService


class BusExporter:
    """Observer of the core services: the manager, and one object per VM, image
    and job.

    It exports the manager and subscribes to the services when it is made,
    before they load, so every object exists before kdlabd takes its bus name.
    """

    def __init__(
        self,
        bus: MessageBus,
        authorizer: Authorizer,
        vms: VMService,
        images: ImageService,
        jobs: JobManager,
        *,
        dumps: DumpService,
        checkpoints: CheckpointService,
        recordings: RecordingService | None = None,
        execs: ExecService | None = None,
    ) -> None:
        self._bus = bus
        self._authorizer = authorizer
        self._vms = vms
        self._images = images
        self._jobs = jobs
        self._dumps = dumps
        self._dump_objects: dict[str, DumpInterface] = {}
        self._checkpoints = checkpoints
        self._recordings = recordings
        self._recording_objects: dict[str, RecordingInterface] = {}
        self._execs = execs
        self._process_objects: dict[int, ProcessInterface] = {}
        self._vm_objects: dict[str, VMInterface] = {}
        self._image_objects: dict[str, ImageInterface] = {}
        self._job_objects: dict[int, JobInterface] = {}
        self._manager = ManagerInterface(vms, images, jobs, authorizer, dumps)
        bus.export(MANAGER_PATH, self._manager)
        vms.subscribe(self)
        images.subscribe(self)
        jobs.subscribe(self)
        dumps.subscribe(self)
        if recordings is not None:
            recordings.subscribe(self)
        if execs is not None:
            execs.subscribe(self)

    def vm_added(self, record: VMRecord) -> None:
        interface = VMInterface(
            record,
            self._vms,
            self._authorizer,
            dumps=self._dumps,
            checkpoints=self._checkpoints,
            recordings=self._recordings,
            execs=self._execs,
        )
        self._vm_objects[record.name] = interface
        path = vm_path(record.name)
        self._bus.export(path, interface)
        self._manager.vm_added(record.name, path)
        self._refresh_image_users()

    def vm_changed(self, record: VMRecord) -> None:
        self._vm_objects[record.name].update(record)

    def vm_removed(self, name: str) -> None:
        path = vm_path(name)
        self._bus.unexport(path)
        del self._vm_objects[name]
        self._manager.vm_removed(name, path)
        self._refresh_image_users()

    def image_added(self, image: ImageRecord) -> None:
        interface = ImageInterface(image, self._images, self._authorizer)
        self._image_objects[image.name] = interface
        self._bus.export(image_path(image.name), interface)

    def image_changed(self, image: ImageRecord) -> None:
        self._image_objects[image.name].update(image)

    def image_removed(self, name: str) -> None:
        self._bus.unexport(image_path(name))
        del self._image_objects[name]

    def job_added(self, job: Job) -> None:
        interface = JobInterface(job, self._jobs, self._authorizer)
        self._job_objects[job.id] = interface
        self._bus.export(job_path(job.id), interface)

    def job_changed(self, job: Job) -> None:
        self._job_objects[job.id].update()

    job_finished = job_changed

    def job_removed(self, job: Job) -> None:
        self._bus.unexport(job_path(job.id))
        del self._job_objects[job.id]

    def dump_added(self, dump: DumpRecord) -> None:
        interface = DumpInterface(dump, self._dumps, self._authorizer)
        self._dump_objects[dump.id] = interface
        self._bus.export(dump_path(dump.id), interface)
        self._manager.dump_added(dump.id)
        self._refresh_latest_dump(dump)

    def dump_changed(self, dump: DumpRecord) -> None:
        self._dump_objects[dump.id].update(dump)

    def dump_removed(self, dump: DumpRecord) -> None:
        self._bus.unexport(dump_path(dump.id))
        del self._dump_objects[dump.id]
        self._manager.dump_removed(dump.id)
        self._refresh_latest_dump(dump)

    def recording_added(self, recording: RecordingRecord) -> None:
        assert self._recordings is not None
        interface = RecordingInterface(recording, self._recordings, self._authorizer)
        self._recording_objects[recording.id] = interface
        self._bus.export(recording_path(recording.id), interface)

    def recording_changed(self, recording: RecordingRecord) -> None:
        self._recording_objects[recording.id].update(recording)

    def recording_removed(self, recording: RecordingRecord) -> None:
        self._bus.unexport(recording_path(recording.id))
        del self._recording_objects[recording.id]

    def process_added(self, process: ProcessRecord) -> None:
        assert self._execs is not None
        interface = ProcessInterface(process, self._execs, self._authorizer)
        self._process_objects[process.id] = interface
        self._bus.export(process_path(process.id), interface)

    def process_exited(self, process: ProcessRecord) -> None:
        self._process_objects[process.id].exited(process)

    def process_removed(self, process: ProcessRecord) -> None:
        self._bus.unexport(process_path(process.id))
        del self._process_objects[process.id]

    def _refresh_latest_dump(self, dump: DumpRecord) -> None:
        vm = self._vm_objects.get(dump.vm)
        if vm is not None:
            vm.dumps_changed()

    def _refresh_image_users(self) -> None:
        for name, interface in self._image_objects.items():
            interface.update(self._images.get(name))
