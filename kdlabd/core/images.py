"""Disk images: volumes of kdlab's image pool that VM disks are overlays of.

Imports and builds are jobs (see :mod:`kdlabd.core.jobs`); creating,
resizing and deleting are quick calls. An image belongs to the uid that made
it (the bus layer lets only its owner, or a user allowed to manage others',
delete or resize it). An image some VM's disk is based on, or one a VM is
being created on, is never deleted or resized under it, and no VM is created
on an image that is still being imported, built or changed.

A build runs on the host behind the :class:`~kdlabd.core.builder.Builder`
port. It is journalled before it starts anything, with what the builder needs
to find it again (its scratch directory, the token naming its processes), so
a kdlabd killed in the middle kills what is left of the build when it starts
again and removes its scratch files (:meth:`ImageService.clean_builds`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Protocol

import structlog

from kdlab.errors import (
    BuildFailed,
    ImageExists,
    InvalidArgument,
    InvalidState,
    NoSuchImage,
)
from kdlabd.core import blocking, validate
from kdlabd.core.builder import Builder
from kdlabd.core.host import CallerFiles
from kdlabd.core.hypervisor import Hypervisor
from kdlabd.core.jobs import Job, JobManager, finish_on_cancel
from kdlabd.core.journal import Journal, crash_point, hold_point
from kdlabd.core.limits import Limits
from kdlabd.core.models import ImageFormat, ImageRecord, ImageSource
from kdlabd.core.observers import Observers
from kdlabd.core.rootfs import RootfsSpec
from kdlabd.core.tasks import Background

log = structlog.get_logger(__name__)

# What a job does to its image, for "image X is still being ...".
_MADE = {"import": "imported", "build": "built"}


class ImageObserver(Protocol):
    """Told about every change of the image view (the bus layer exports objects)."""

    def image_added(self, image: ImageRecord) -> None: ...

    def image_changed(self, image: ImageRecord) -> None: ...

    def image_removed(self, name: str) -> None: ...


class ImageService:
    """The images kdlab has, and what can be done with them."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        *,
        jobs: JobManager,
        users: Callable[[str], tuple[str, ...]],
        builder: Builder,
        files: CallerFiles,
        journal: Journal,
        limits: Limits | None = None,
    ) -> None:
        self._hv = hypervisor
        self._jobs = jobs
        self._users = users
        self._builder = builder
        self._files = files
        self._journal = journal
        self._observers: Observers[ImageObserver] = Observers()
        self._limits = limits or Limits()
        self._images: dict[str, ImageRecord] = {}
        # Names stored or forgotten while a load() waits for the pool's list:
        # that list is older than what happened to them meanwhile.
        self._loading: list[set[str]] = []
        self._busy: set[str] = set()
        self._background = Background("images.reload_failed")

    def subscribe(self, observer: ImageObserver) -> Callable[[], None]:
        """Tell *observer* of every image added, changed or removed from now on;
        returns the function that ends the subscription."""
        return self._observers.subscribe(observer)

    async def load(self) -> None:
        """Rebuild the view from the pool; an image created or deleted while
        the pool was listed (a reload after libvirtd came back) keeps what
        kdlabd did to it, not what the older list says."""
        touched: set[str] = set()
        self._loading.append(touched)
        try:
            listed = await self._hv.list_images()
        finally:
            self._loading.remove(touched)
        found = {image.name: image for image in listed if image.name not in touched}
        for name in list(self._images):
            if name not in found and name not in touched:
                self._forget(name)
        for image in found.values():
            self._store(image)

    def hypervisor_reconnected(self) -> None:
        """libvirt came back: reload the pool and finish interrupted rollbacks."""

        async def reload() -> None:
            # On failure the view stays as it was; the next start-up reloads it.
            await self.load()
            await self.reconcile()

        self._background.start(reload())

    async def clean_builds(self) -> list[str]:
        """At start-up: kill what is left of builds that died with kdlabd, and
        empty the scratch directory. The builds whose processes would not die
        are named in the log and left for the next start."""
        cleaned, kept = [], []
        for name in self._journal.pending("build"):
            record = self._journal.details("build", name)
            try:
                await finish_on_cancel(self._builder.kill_left(record))
            except BuildFailed as err:
                log.error("reconcile.build_not_killed", image=name, error=str(err))
                kept.append(record)
                continue
            self._journal.done("build", name)
            cleaned.append(name)
        await self._builder.empty_scratch(kept)
        if cleaned:
            log.warning("reconcile.killed_builds", images=cleaned)
        return cleaned

    async def reconcile(self) -> list[str]:
        """Delete images whose import or build died half-way (kdlabd or libvirtd),
        and owner records of images that were never made."""
        removed = []
        for name in self._journal.pending("image"):
            if name in self._busy:
                continue
            if name in self._images:
                try:
                    await self._delete(name)
                except InvalidState:
                    # A VM's disk is based on it (a kdlabd older than the check
                    # let that happen): keep it, the VM would lose its disk.
                    log.error("reconcile.partial_image_in_use", image=name)
                else:
                    removed.append(name)
            self._journal.done("image", name)
        for name in await self._hv.image_owners():
            if name not in self._images and name not in self._busy:
                await self._hv.set_image_owner(name, None)
        if removed:
            log.warning("reconcile.removed_partial_images", removed=removed)
        return removed

    def list(self) -> list[ImageRecord]:
        return sorted(self._images.values(), key=lambda i: i.name)

    def get(self, name: str) -> ImageRecord:
        try:
            return self._images[name]
        except KeyError:
            raise NoSuchImage(
                f"no image named {name!r} (see: kdlabctl image list)"
            ) from None

    def used_by(self, name: str) -> tuple[str, ...]:
        return self._users(name)

    def for_disk(self, name: str) -> ImageRecord:
        """The image *name*, for a new VM's disk to be based on.

        Refused while the image is being imported, built, resized or deleted:
        a VM's overlay on a half-written image would boot garbage, and the
        image's rollback would delete it from under the VM.
        """
        if name in self._busy:
            job = self._jobs.running_on(name)
            if job is not None:
                raise InvalidState(
                    f"image {name!r} is still being {_MADE.get(job.kind, job.kind)}; "
                    f"wait for job {job.id} to end (its Completed signal)"
                )
            raise InvalidState(
                f"image {name!r} is busy with another operation; try again"
            )
        return self.get(name)

    async def create(self, name: str, size: int, owner_uid: int) -> ImageRecord:
        """A blank (sparse) raw image owned by *owner_uid*."""
        size = self._size(size)
        with self._claimed(name):
            # Recorded first: an image never exists without its owner.
            await self._hv.set_image_owner(name, owner_uid)
            try:
                image = await self._hv.create_image(name, size)
            except BaseException:
                with contextlib.suppress(Exception):  # else pruned at start-up
                    await self._hv.set_image_owner(name, None)
                raise
        self._store(image)
        return image

    async def import_image(self, name: str, fd: int, owner_uid: int) -> Job:
        """Stream the client's file into a new image, as a job.

        The descriptor is checked now (raw, or a self-contained qcow2), in a
        thread with a time limit, and duplicated, because the caller's copy is
        closed when the call returns.
        """
        source = await blocking.from_caller(
            lambda: validate.image_source(self._files, fd, self._limits), "image"
        )
        self._room_for_job(owner_uid)
        self._reserve(name)
        own = ImageSource(os.dup(fd), source.size, source.format, source.capacity)

        async def work(job: Job) -> None:
            try:
                image = await self._upload(
                    name,
                    own,
                    job,
                    (0.0, 1.0),
                    lambda: crash_point("image.upload-started"),
                )
                job.report(
                    1.0, f"imported {name} ({image.format}, {image.capacity >> 20} MiB)"
                )
            finally:
                os.close(own.fd)
                self._release(name)

        return self._jobs.start("import", name, owner_uid, work)

    def build_rootfs(self, name: str, spec: RootfsSpec, owner_uid: int) -> Job:
        """A job: debootstrap a Debian root filesystem into the new image *name*.

        The build is journalled first (see :meth:`clean_builds`); its
        processes are killed if it fails, its scratch space removed in any case.
        """
        self._limits.disk(spec.size_bytes, "image size")
        self._room_for_job(owner_uid)
        self._reserve(name)
        build = self._builder.rootfs(name, spec)

        async def work(job: Job) -> None:
            self._journal.begin("build", name, build.record)
            try:
                await build.run(lambda f, s: job.report(0.9 * f, s))
                job.report(0.9, "uploading into the image pool")
                fd = build.open_image()
                try:
                    image = await self._upload(
                        name,
                        validate.image_source(self._files, fd, self._limits),
                        job,
                        (0.9, 0.1),
                        lambda: crash_point("build.upload-started"),
                    )
                finally:
                    os.close(fd)
                job.report(1.0, f"built {name} ({image.capacity >> 20} MiB)")
            except BaseException:
                await finish_on_cancel(build.kill())
                raise
            finally:
                await finish_on_cancel(build.remove())
                self._journal.done("build", name)
                self._release(name)

        return self._jobs.start("build", name, owner_uid, work)

    async def delete(self, name: str) -> None:
        self.get(name)
        with self._claimed(name, exists=True):
            await self._delete(name)

    async def resize(self, name: str, size: int) -> ImageRecord:
        image = self.get(name)
        self._refuse_if_used(name, "resize")
        self._size(size)
        if size < image.capacity:
            raise InvalidArgument(
                f"image {name!r} is {image.capacity} bytes; shrinking would cut its "
                "filesystem: give a larger size"
            )
        with self._claimed(name, exists=True):
            resized = await self._hv.resize_image(image, size)
            await self._judge_stored(name, image.format)
        self._store(resized)
        return resized

    async def _judge_stored(self, name: str, expected: ImageFormat) -> None:
        """Refuse what the volume holds unless it is a self-contained *expected*.

        The client's file may have changed after it was checked: only the
        bytes in the pool count (see :func:`validate.stored_image`).
        """
        try:
            stored = await self._hv.inspect_image(name)
            validate.stored_image(stored, expected, self._limits)
        except InvalidArgument as err:
            log.warning("image.refused_as_stored", image=name, reason=str(err))
            raise

    async def _upload(
        self,
        name: str,
        source: ImageSource,
        job: Job,
        span: tuple[float, float],
        started: Callable[[], None],
    ) -> ImageRecord:
        """Upload *source* as image *name*, its progress filling *span* (start,
        share) of the job; *started* is called once the intent is journalled."""
        start, share = span

        def progress(done: int) -> None:
            job.report_from_thread(
                start + share * done / source.size,
                f"uploading: {done >> 20} of {source.size >> 20} MiB",
            )

        # The intent stays if the upload fails and its own rollback could not
        # delete the volume (libvirtd went away): reconciliation does it later.
        self._journal.begin("image", name)
        try:
            # Recorded first: an image never exists without its owner.
            await self._hv.set_image_owner(name, job.owner_uid)
            started()
            await hold_point("image.upload-started")
            image = await finish_on_cancel(
                self._hv.upload_image(name, source, progress)
            )
            job.report(start + share, "checking the stored image")
            await self._judge_stored(name, source.format)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._delete(name)
                self._journal.done("image", name)
            raise
        self._journal.done("image", name)
        self._store(image)
        return image

    async def _delete(self, name: str) -> None:
        """Delete image *name* (volume and owner), unless a VM's disk is based on it.

        Every path that deletes an image comes here: a delete, the rollback of
        an import or build, reconciliation.
        """
        self._refuse_if_used(name, "delete")
        await self._hv.delete_image(name)
        self._forget(name)

    def _size(self, size: int) -> int:
        """An image size: valid (InvalidArgument), within the limit (LimitExceeded)."""
        return self._limits.disk(validate.disk_size(size, "image size"), "image size")

    def _room_for_job(self, owner_uid: int) -> None:
        self._limits.room_for_job(owner_uid, self._jobs.running_of(owner_uid))

    def _refuse_if_used(self, name: str, what: str) -> None:
        users = self.used_by(name)
        if users:
            raise InvalidState(
                f"cannot {what} image {name!r}: the disks of VM(s) {', '.join(users)} "
                "are based on it (delete those VMs first)"
            )

    def _reserve(self, name: str, *, exists: bool = False) -> None:
        """Hold *name* while an operation on it runs: one operation per image."""
        validate.name(name, "image name")
        if name in self._busy:
            raise InvalidState(f"image {name!r} is busy with another operation")
        if not exists and name in self._images:
            raise ImageExists(f"an image named {name!r} already exists")
        self._busy.add(name)

    def _release(self, name: str) -> None:
        self._busy.discard(name)

    @contextlib.contextmanager
    def _claimed(self, name: str, *, exists: bool = False) -> Iterator[None]:
        self._reserve(name, exists=exists)
        try:
            yield
        finally:
            self._release(name)

    def _store(self, image: ImageRecord) -> None:
        for touched in self._loading:
            touched.add(image.name)
        old = self._images.get(image.name)
        if old == image:
            return
        self._images[image.name] = image
        for observer in self._observers:
            if old is None:
                observer.image_added(image)
            else:
                observer.image_changed(image)

    def _forget(self, name: str) -> None:
        for touched in self._loading:
            touched.add(name)
        if self._images.pop(name, None) is not None:
            for observer in self._observers:
                observer.image_removed(name)
