"""kdlabd.core.images.ImageService, with VMService, against fakes: owners,
images that are busy or in use, the limits on images and VMs, and a reload
after a libvirt reconnection."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from kdlab.errors import (
    BuildFailed,
    HypervisorError,
    InvalidArgument,
    InvalidState,
    LimitExceeded,
    NoSuchImage,
)
from kdlab.states import JobState
from kdlabd.core.builder import Builder
from kdlabd.core.images import ImageService
from kdlabd.core.jobs import Job, JobManager
from kdlabd.core.limits import GIB, Limits
from kdlabd.core.models import Accel, ImageFormat, ImageRecord
from kdlabd.core.rootfs import RootfsSpec
from kdlabd.core.vms import Layout, VMService
from kdlabd.host.builder import LocalBuilder
from kdlabd.host.journal import FileJournal
from kdlabd.host.local import LocalHost
from tests.unit.fake_builder import FakeBuilder
from tests.unit.fake_hypervisor import HOST, FakeHypervisor
from tests.unit.test_vms import OWNER, Lab, Recorder, bzimage, run, settle

OTHER = 1001
MIB = 1 << 20


@dataclass
class ImageRecorder:
    """An ImageObserver that remembers what it was told."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def image_added(self, image: ImageRecord) -> None:
        self.events.append(("added", image.name))

    def image_changed(self, image: ImageRecord) -> None:
        self.events.append(("changed", image.name))

    def image_removed(self, name: str) -> None:
        self.events.append(("removed", name))


@dataclass
class ImageLab(Lab):
    """Lab's VMService, wired with an ImageService as kdlabd wires them."""

    images: ImageService = field(default=None)  # type: ignore[assignment]
    jobs: JobManager = field(default_factory=JobManager)
    journal: FileJournal = field(default=None)  # type: ignore[assignment]
    raw: Path = field(default=None)  # type: ignore[assignment]

    async def start_import(self, name: str, owner: int = OWNER) -> Job:
        fd = os.open(self.raw, os.O_RDONLY)
        try:
            return await self.images.import_image(name, fd, owner)
        finally:
            os.close(fd)

    async def imported(self, name: str, owner: int = OWNER) -> ImageRecord:
        job = await self.jobs.wait((await self.start_import(name, owner)).id)
        assert job.state is JobState.SUCCEEDED, job.message
        return self.images.get(name)


def make_lab(
    tmp_path: Path, limits: Limits | None = None, builder: Builder | None = None
) -> ImageLab:
    hv = FakeHypervisor()
    layout = Layout(tmp_path / "state", tmp_path / "run")
    jobs = JobManager()
    journal = FileJournal(layout.journal_dir())
    vms = VMService(
        hv,
        layout,
        Accel.TCG,
        host=LocalHost(),
        images=lambda name: images.for_disk(name),  # noqa: PLW0108 (made below)
        limits=limits,
    )
    images = ImageService(
        hv,
        jobs=jobs,
        users=vms.uses_image,
        builder=builder or LocalBuilder(layout.scratch_dir(), layout.cache_dir()),
        files=LocalHost(),
        journal=journal,
        limits=limits,
    )
    hv.watch(vms.domain_changed, vms.hypervisor_reconnected)
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage())
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"a raw disk image\n" * 4096)
    return ImageLab(
        tmp_path, hv, Recorder(), layout, vms, kernel, tmp_path / "no-initrd",
        images=images, jobs=jobs, journal=journal, raw=raw,
    )  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path) -> ImageLab:
    return make_lab(tmp_path)


def before(calls: list[str], first: str, then: str) -> bool:
    return calls.index(first) < calls.index(then)


# --- owners ---------------------------------------------------------------------


def test_a_created_image_is_its_creators(lab: ImageLab) -> None:
    async def scenario() -> None:
        image = await lab.images.create("blank", 64 * MIB, OTHER)
        assert image.owner_uid == OTHER
        assert lab.images.get("blank").owner_uid == OTHER
        assert lab.hv.owners == {"blank": OTHER}
        methods = [call.method for call in lab.hv.calls]
        assert before(methods, "set_image_owner", "create_image"), (
            "the owner is recorded before the image exists"
        )

    run(scenario())


def test_a_reload_keeps_what_happened_while_the_pool_was_listed(
    lab: ImageLab,
) -> None:
    """libvirtd came back and kdlabd reloads the pool while calls go on: an
    image created or deleted after the pool was listed keeps what kdlabd did
    (the list is older). Before, a new image was dropped from the bus just as
    its creator called Delete on it (UnknownMethod, seen in CI)."""

    async def scenario() -> None:
        await lab.images.create("old", 64 * MIB, OWNER)
        listed, go = asyncio.Event(), asyncio.Event()
        real = lab.hv.list_images

        async def stale_list() -> list[ImageRecord]:
            images = await real()  # the pool as it is now...
            listed.set()
            await go.wait()  # ...answered later
            return images

        lab.hv.list_images = stale_list  # type: ignore[method-assign]
        loading = asyncio.ensure_future(lab.images.load())
        await listed.wait()
        await lab.images.create("new", 64 * MIB, OWNER)
        await lab.images.delete("old")
        go.set()
        await loading
        assert [image.name for image in lab.images.list()] == ["new"]

    run(scenario())


def test_a_failed_create_leaves_no_owner(lab: ImageLab) -> None:
    lab.hv.fail("create_image")

    async def scenario() -> None:
        with pytest.raises(HypervisorError):
            await lab.images.create("blank", 64 * MIB, OTHER)
        assert lab.hv.owners == {}
        assert lab.images.list() == []

    run(scenario())


def test_an_imported_image_is_its_importers(lab: ImageLab) -> None:
    async def scenario() -> None:
        image = await lab.imported("disk", OTHER)
        assert image.owner_uid == OTHER
        methods = [call.method for call in lab.hv.calls]
        assert before(methods, "set_image_owner", "upload_image")

    run(scenario())


def test_an_image_with_no_recorded_owner_is_roots(lab: ImageLab) -> None:
    lab.hv.images["old"] = ImageRecord(
        "old", ImageFormat.RAW, 64 * MIB, 0, Path("/fake-images/old")
    )

    async def scenario() -> None:
        await lab.images.load()
        assert lab.images.get("old").owner_uid == 0

    run(scenario())


def test_deleting_an_image_forgets_its_owner(lab: ImageLab) -> None:
    async def scenario() -> None:
        await lab.images.create("blank", 64 * MIB, OTHER)
        await lab.images.delete("blank")
        assert (lab.hv.images, lab.hv.owners) == ({}, {})

    run(scenario())


def test_subscribers_hear_of_every_change_until_they_leave(lab: ImageLab) -> None:
    first, second = ImageRecorder(), ImageRecorder()
    leave = lab.images.subscribe(first)
    lab.images.subscribe(second)

    async def scenario() -> None:
        await lab.images.create("blank", 64 * MIB, OTHER)
        await lab.images.resize("blank", 128 * MIB)
        leave()
        await lab.images.delete("blank")

    run(scenario())
    told = [("added", "blank"), ("changed", "blank")]
    assert first.events == told
    assert second.events == [*told, ("removed", "blank")]


def test_reconcile_prunes_owners_of_images_never_made(lab: ImageLab) -> None:
    lab.hv.owners["ghost"] = OTHER  # kdlabd died between the owner and the volume

    async def scenario() -> None:
        await lab.images.load()
        await lab.images.reconcile()
        assert lab.hv.owners == {}

    run(scenario())


# --- busy images and images in use ------------------------------------------------


def test_no_vm_on_an_image_still_being_imported(lab: ImageLab) -> None:
    """The import holds mid-upload (its volume exists, half written): a VM on it
    is refused; cancelling the import then removes it and touches no VM."""
    held = lab.hv.hold("upload_image:disk")

    async def scenario() -> None:
        await lab.imported("other")
        await lab.create("bystander", image="other")
        job = await lab.start_import("disk")
        await settle()
        assert "upload_image" in [call.method for call in lab.hv.calls]
        with pytest.raises(InvalidState) as refused:
            await lab.create("vm1", image="disk")
        assert str(refused.value) == (
            f"image 'disk' is still being imported; wait for job {job.id} to end "
            "(its Completed signal)"
        )
        assert [vm.name for vm in lab.service.list()] == ["bystander"]
        assert "create_vm_disk:vm1.vda.qcow2" not in [
            f"{c.method}:{c.arg}" for c in lab.hv.calls
        ]
        lab.jobs.cancel(job.id)
        held.set()
        assert (await lab.jobs.wait(job.id)).state is JobState.CANCELLED
        assert set(lab.hv.images) == {"other"}
        assert lab.hv.owners == {"other": OWNER}
        assert [vm.name for vm in lab.service.list()] == ["bystander"]
        assert lab.images.used_by("other") == ("bystander",)

    run(scenario())


def test_an_import_cancelled_at_once_still_cleans_up(lab: ImageLab) -> None:
    """A Cancel right behind ImportImage (before the job's task ever ran) ends
    the job, frees the name and closes the job's descriptor."""

    async def scenario() -> None:
        fds = len(os.listdir("/proc/self/fd"))
        job = await lab.start_import("disk")
        lab.jobs.cancel(job.id)
        assert (await lab.jobs.wait(job.id)).state is JobState.CANCELLED
        assert len(os.listdir("/proc/self/fd")) == fds
        assert (lab.hv.images, lab.hv.owners) == ({}, {})
        assert lab.jobs.running_of(OWNER) == 0
        await lab.imported("disk")  # the name is free again

    run(scenario())


def test_an_image_a_vm_is_being_created_on_is_in_use(lab: ImageLab) -> None:
    async def scenario() -> None:
        await lab.imported("disk")
        held = lab.hv.hold("create_vm_disk")
        creating = asyncio.ensure_future(lab.create("vm1", image="disk"))
        await settle()
        assert lab.images.used_by("disk") == ("vm1",)
        with pytest.raises(InvalidState, match="vm1"):
            await lab.images.delete("disk")
        with pytest.raises(InvalidState, match="vm1"):
            await lab.images.resize("disk", 128 * MIB)
        held.set()
        await creating
        assert lab.images.used_by("disk") == ("vm1",)
        size = lab.images.get("disk").capacity
        assert lab.hv.disks == {"vm1.vda.qcow2": (size, "disk")}

    run(scenario())


def test_no_vm_on_an_image_being_deleted(lab: ImageLab) -> None:
    async def scenario() -> None:
        await lab.imported("disk")
        held = lab.hv.hold("delete_image")
        deleting = asyncio.ensure_future(lab.images.delete("disk"))
        await settle()
        with pytest.raises(InvalidState, match="busy"):
            await lab.create("vm1", image="disk")
        held.set()
        await deleting
        with pytest.raises(NoSuchImage):
            await lab.create("vm1", image="disk")
        assert lab.service.list() == []

    run(scenario())


def test_reconcile_keeps_a_partial_image_a_vm_uses(lab: ImageLab) -> None:
    """An image whose import died half-way is deleted at start-up, unless a VM's
    disk is based on it: deleting it would take the VM's disk."""

    async def scenario() -> None:
        await lab.imported("disk")
        await lab.create("vm1", image="disk")
        lab.journal.begin("image", "disk")
        assert await lab.images.reconcile() == []
        assert "disk" in lab.hv.images
        assert lab.journal.pending("image") == []

    run(scenario())


# --- builds (the host's side is tests/unit/test_rootfs.py's) -----------------------


def test_a_build_is_journalled_before_it_runs_and_its_image_uploaded(
    tmp_path: Path,
) -> None:
    builder = FakeBuilder(tmp_path)
    lab = make_lab(tmp_path, builder=builder)
    seen: list[tuple[list[str], dict[str, str]]] = []
    builder.during = lambda: seen.append(
        (lab.journal.pending("build"), lab.journal.details("build", "deb"))
    )

    async def scenario() -> None:
        job = lab.images.build_rootfs("deb", RootfsSpec("bookworm"), OTHER)
        done = await lab.jobs.wait(job.id)
        assert done.state is JobState.SUCCEEDED, done.message
        assert done.message == "built deb (0 MiB)"

    run(scenario())
    assert seen == [(["deb"], {"token": "fake-deb"})]
    (build,) = builder.builds
    assert build.events == ["run", "remove"]
    assert lab.images.get("deb").owner_uid == OTHER
    assert lab.journal.pending("build") == []


def test_a_failed_build_is_killed_removed_and_leaves_no_image(tmp_path: Path) -> None:
    builder = FakeBuilder(tmp_path, failure=BuildFailed("debootstrap failed"))
    lab = make_lab(tmp_path, builder=builder)

    async def scenario() -> None:
        job = lab.images.build_rootfs("deb", RootfsSpec("bookworm"), OWNER)
        done = await lab.jobs.wait(job.id)
        assert done.state is JobState.FAILED
        assert "debootstrap failed" in done.message
        builder.failure = None
        again = await lab.jobs.wait(
            lab.images.build_rootfs("deb", RootfsSpec("bookworm"), OWNER).id
        )
        assert again.state is JobState.SUCCEEDED, "the name was released"

    run(scenario())
    assert [build.events for build in builder.builds] == [
        ["run", "kill", "remove"],
        ["run", "remove"],
    ]
    assert lab.journal.pending("build") == []


def test_start_up_keeps_the_scratch_of_a_build_that_would_not_die(
    tmp_path: Path,
) -> None:
    builder = FakeBuilder(tmp_path, stuck={"t-stuck"})
    lab = make_lab(tmp_path, builder=builder)
    lab.journal.begin("build", "gone", {"token": "t-gone", "scratch": "/s/gone"})
    lab.journal.begin("build", "stuck", {"token": "t-stuck", "scratch": "/s/stuck"})
    with capture_logs() as logs:
        assert run(lab.images.clean_builds()) == ["gone"]
    assert builder.killed == ["t-gone"]
    assert builder.kept == [{"token": "t-stuck", "scratch": "/s/stuck"}]
    assert lab.journal.pending("build") == ["stuck"]
    assert ("reconcile.build_not_killed", "stuck") in [
        (entry["event"], entry.get("image")) for entry in logs
    ]


# --- limits -----------------------------------------------------------------------


def test_imports_and_builds_per_user(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, Limits(jobs_per_user=2))
    held = lab.hv.hold("upload_image")

    async def scenario() -> None:
        first = await lab.start_import("a")
        await lab.start_import("b")
        with pytest.raises(LimitExceeded, match="max_jobs_per_user"):
            await lab.start_import("c")
        with pytest.raises(LimitExceeded, match="max_jobs_per_user"):
            lab.images.build_rootfs("d", RootfsSpec("bookworm"), OWNER)
        await lab.start_import("c", OTHER)  # another uid has its own count
        lab.jobs.cancel(first.id)
        assert (await lab.jobs.wait(first.id)).state is JobState.CANCELLED
        last = await lab.start_import("d")  # room again, "b" still running
        held.set()
        await lab.jobs.wait(last.id)
        await settle()
        assert lab.hv.owners == {"b": OWNER, "c": OTHER, "d": OWNER}

    run(scenario())


@pytest.mark.parametrize(
    "make",
    [
        lambda lab: lab.images.create("big", 2 * GIB, OWNER),
        lambda lab: lab.images.resize("small", 2 * GIB),
    ],
    ids=["create", "resize"],
)
def test_image_sizes(tmp_path: Path, make: Callable[[ImageLab], Any]) -> None:
    lab = make_lab(tmp_path, Limits(disk_gib=1))

    async def scenario() -> None:
        await lab.images.create("small", 64 * MIB, OWNER)
        calls = len(lab.hv.calls)
        with pytest.raises(LimitExceeded, match="max_disk_gib"):
            await make(lab)
        assert lab.hv.calls[calls:] == []  # refused before libvirt was asked
        assert set(lab.hv.images) == {"small"}

    run(scenario())


def test_build_size(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, Limits(disk_gib=1))
    spec = RootfsSpec("bookworm", size_bytes=2 * GIB)
    with pytest.raises(LimitExceeded, match="max_disk_gib"):
        lab.images.build_rootfs("big", spec, OWNER)
    assert lab.jobs.list() == []


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"memory_mib": 4097}, "max_memory_mib"),
        ({"vcpus": 5}, "max_vcpus"),
        ({"image": "small", "disk_size": GIB + 1}, "max_disk_gib"),
        ({"extra_disks": (GIB + 1,)}, "max_disk_gib"),
        ({"extra_disks": (MIB,) * 3}, "max_extra_disks"),
    ],
    ids=["memory", "vcpus", "disk-size", "extra-disk-size", "extra-disks"],
)
def test_vm_limits(tmp_path: Path, options: dict[str, Any], key: str) -> None:
    """The fake host has 4096 MiB and 4 CPUs."""
    limits = Limits(disk_gib=1, extra_disks=2).within_host(HOST)
    lab = make_lab(tmp_path, limits)

    async def scenario() -> None:
        await lab.images.create("small", 64 * MIB, OWNER)
        calls = len(lab.hv.calls)
        with pytest.raises(LimitExceeded, match=key):
            await lab.create("vm1", **options)
        assert lab.hv.calls[calls:] == []
        await lab.create("vm1", memory_mib=4096, vcpus=4, extra_disks=(MIB, GIB))

    run(scenario())


def test_absurd_values_stay_invalid_arguments(lab: ImageLab) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidArgument):
            await lab.create("vm1", vcpus=256)
        with pytest.raises(InvalidArgument):
            await lab.create("vm1", extra_disks=(MIB,) * 26)

    run(scenario())


def test_vms_per_user_counts_creates_under_way(tmp_path: Path) -> None:
    lab = make_lab(tmp_path, Limits(vms_per_user=2))

    async def scenario() -> None:
        await lab.create("a")
        held = lab.hv.hold("define_vm:b")
        creating = asyncio.ensure_future(lab.create("b"))
        await settle()
        with pytest.raises(LimitExceeded, match="max_vms_per_user") as refused:
            await lab.create("c")
        assert f"uid {OWNER} has 2 VMs" in str(refused.value)
        await lab.create("c", owner_uid=OTHER)
        held.set()
        await creating
        with pytest.raises(LimitExceeded):
            await lab.create("d")
        await lab.service.delete("a")
        await lab.create("d")
        assert sorted(vm.name for vm in lab.service.list()) == ["b", "c", "d"]

    run(scenario())


# --- a reload after a reconnection ------------------------------------------


class Refusing:
    """A hypervisor whose pool cannot be listed (libvirt refused the refresh)."""

    async def list_images(self) -> list[ImageRecord]:
        await asyncio.sleep(0)
        raise HypervisorError("libvirt: internal error: pool has asynchronous jobs")


def test_a_reload_after_a_reconnection_that_fails_is_logged(tmp_path: Path) -> None:
    """Not left as an exception nobody retrieves (asyncio logs those with a
    traceback, at some later garbage collection)."""
    unretrieved: list[object] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: unretrieved.append(context)
        )
        service = ImageService(
            Refusing(),  # type: ignore[arg-type]
            jobs=JobManager(),
            users=lambda _name: (),
            builder=LocalBuilder(tmp_path / "scratch", tmp_path / "cache"),
            files=LocalHost(),
            journal=FileJournal(tmp_path / "pending"),
        )
        service.hypervisor_reconnected()
        for _ in range(10):
            await asyncio.sleep(0)

    with capture_logs() as logs:
        asyncio.run(scenario())
        gc.collect()
    assert [entry["event"] for entry in logs] == ["images.reload_failed"]
    assert "asynchronous jobs" in logs[0]["error"]
    assert unretrieved == []
