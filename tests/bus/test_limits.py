"""kdlabd's limits and busy images, on the bus (issue 10, items 4 and 5).

Each kdlabd here has a configuration of its own (max_* keys). Counts are per
uid and tried as real other uids (setpriv); every refusal is LimitExceeded
(kdlabctl exit 9), documented in the contract, and leaves nothing behind.
Single calls over a size or a host limit are bad-input cases of
test_security.py; here are the limits that need state (VMs and jobs a user
already has), the configuration keys themselves, and the image that is still
being imported (``KDLAB_TEST_HOLD_AT`` holds its import until it is cancelled).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from dbus_next import Variant

from kdlab.errors import HypervisorError, InvalidState, LimitExceeded
from kdlab.wire import JOB_INTERFACE, MANAGER_PATH
from kdlabd.core.journal import HOLD_ENV
from tests.bus import contract, test_policy
from tests.bus.conftest import Ctl
from tests.bus.contract import MANAGER
from tests.bus.test_security import Snapshot, Walk, calls_as
from tests.support.bus import PROPERTIES, BusClient, PrivateBus
from tests.support.clients import NOBODY, Identity
from tests.support.testdriver import FLEET, Lab

pytestmark = pytest.mark.bus

HOLD_IMPORTS = {HOLD_ENV: "image.upload-started"}

kdlab_member = test_policy.kdlab_member  # a fixture: nobody, in group kdlab


@contextmanager
def serving(
    bus: PrivateBus, workdir: Path, config: str = "", env: dict[str, str] | None = None
) -> Iterator[Lab]:
    """kdlabd on the standard fleet with *config* added to its configuration."""
    lab = Lab(bus, workdir)
    lab.daemon.config_text += config
    with lab.serving(env) as serving:
        yield serving


Serving = Callable[..., AbstractContextManager[Lab]]


@pytest.fixture
def limited(bus: PrivateBus, workdir: Path) -> Serving:
    """``limited(config="", env=None)``: :func:`serving` on this test's bus."""
    return lambda config="", env=None: serving(bus, workdir, config, env)


def create_vm(
    client: BusClient, kernel: Path, name: str, **options: Variant
) -> tuple[str, str]:
    """CreateVM that must fail: (error name, message)."""
    fd = os.open(kernel, os.O_RDONLY)
    try:
        return client.error(
            MANAGER_PATH, MANAGER, "CreateVM", "sa{sv}",
            [name, {"kernel": Variant("h", 0), **options}], unix_fds=[fd],
        )  # fmt: skip
    finally:
        os.close(fd)


def import_image(client: BusClient, source: Path, name: str) -> str:
    """ImportImage that must succeed: the job's path."""
    fd = os.open(source, os.O_RDONLY)
    try:
        (job,) = client.ok(MANAGER_PATH, MANAGER, "ImportImage", "sha{sv}",
                           [name, 0, {}], unix_fds=[fd])  # fmt: skip
    finally:
        os.close(fd)
    return str(job)


def cancel(client: BusClient, job: str) -> None:
    """Cancel *job* and wait until it ended."""
    client.ok(job, JOB_INTERFACE, "Cancel")
    client.wait_until(lambda: job_state(client, job) != "running")
    assert job_state(client, job) == "cancelled"


def job_state(client: BusClient, job: str) -> str:
    (state,) = client.ok(job, PROPERTIES, "Get", "ss", [JOB_INTERFACE, "State"])
    return str(state.value)


def images(client: BusClient) -> list[str]:
    (paths,) = client.ok(MANAGER_PATH, MANAGER, "ListImages")
    return [str(path) for path in paths]


def vms(client: BusClient) -> dict[str, object]:
    """Every VM object with its properties."""
    return {
        path: interfaces
        for path, interfaces in client.managed_objects().items()
        if "/vm/" in path
    }


# --- an image still being imported ----------------------------------------------


def test_no_vm_on_an_image_still_being_imported(
    limited: Serving, ctl: Ctl, kernels: dict[str, Path]
) -> None:
    """Start an import (held before its upload), try to create a VM on it:
    InvalidState naming the job. Cancel the import: no VM is affected."""
    with limited(env=HOLD_IMPORTS) as lab:
        client = BusClient(lab.daemon.address)
        try:
            before = vms(client)
            job = import_image(client, kernels["text"], "incoming")
            job_id = job.rsplit("/", 1)[1]
            refused = create_vm(
                client, kernels["bzImage"], "new", image=Variant("s", "incoming")
            )
            contract.assert_error_reply(refused, InvalidState, MANAGER, "CreateVM")
            assert refused[1] == (
                f"image 'incoming' is still being imported; wait for job {job_id} "
                "to end (its Completed signal)"
            )
            result = ctl("create", "new", "--kernel", str(kernels["bzImage"]),
                         "--image", "incoming")  # fmt: skip
            assert result.returncode == InvalidState.exit_code, result.stderr
            assert "still being imported" in result.stderr
            assert job_state(client, job) == "running"
            cancel(client, job)
            assert images(client) == []
            assert vms(client) == before
            assert not lab.vm_dir("new").exists()
        finally:
            client.close()


# --- VMs and jobs per user --------------------------------------------------------


@pytest.fixture
def stranger(kdlab_member: Identity) -> Identity:
    """A member of group kdlab who owns no VM of the fleet: Debian's "daemon"
    (the bus refuses a uid the user database does not know)."""
    entry = pwd.getpwnam("daemon")
    assert entry.pw_uid not in {vm.owner for vm in FLEET}
    return Identity(entry.pw_uid, entry.pw_gid, kdlab_member.groups)


def test_vms_per_user(
    limited: Serving,
    ctl: Ctl,
    kernels: dict[str, Path],
    kdlab_member: Identity,
    stranger: Identity,
) -> None:
    """max_vms_per_user = 1: root (who owns linux-6.9-rc1) and the member (who
    owns booted) are at their limit; a uid with no VM is not."""
    with limited("max_vms_per_user = 1\n") as lab:
        client = BusClient(lab.daemon.address)
        try:
            before = Snapshot.take(lab, client)
            refused = create_vm(client, kernels["bzImage"], "new")
            contract.assert_error_reply(refused, LimitExceeded, MANAGER, "CreateVM")
            assert "uid 0 has 1 VMs" in refused[1]
            assert "max_vms_per_user" in refused[1]
            create = ("create", "new", "--kernel", str(kernels["bzImage"]))
            result = ctl(*create, user=kdlab_member)
            assert result.returncode == LimitExceeded.exit_code == 9, result.stderr
            assert f"uid {kdlab_member.uid} has 1 VMs" in result.stderr
            # Past the limit; the test driver cannot upload the kernel.
            result = ctl(*create, user=stranger)
            assert result.returncode == HypervisorError.exit_code, result.stderr
            assert before.changes(Snapshot.take(lab, client)) == []
        finally:
            client.close()


def test_running_jobs_per_user(
    limited: Serving, workdir: Path, kernels: dict[str, Path], stranger: Identity
) -> None:
    """max_jobs_per_user = 1, imports held: root's second import and a build
    are refused; another uid has its own count; a cancelled job makes room."""
    with limited("max_jobs_per_user = 1\n", HOLD_IMPORTS) as lab:
        client = BusClient(lab.daemon.address)
        try:
            first = import_image(client, kernels["text"], "first")
            before = Snapshot.take(lab, client)
            fd = os.open(kernels["text"], os.O_RDONLY)
            try:
                second = client.error(MANAGER_PATH, MANAGER, "ImportImage", "sha{sv}",
                                      ["second", 0, {}], unix_fds=[fd])  # fmt: skip
            finally:
                os.close(fd)
            contract.assert_error_reply(second, LimitExceeded, MANAGER, "ImportImage")
            assert "uid 0 has 1 running imports and builds" in second[1]
            assert "max_jobs_per_user" in second[1]
            build = client.error(MANAGER_PATH, MANAGER, "BuildImage", "sa{sv}",
                                 ["built", {}])  # fmt: skip
            contract.assert_error_reply(build, LimitExceeded, MANAGER, "BuildImage")
            assert before.changes(Snapshot.take(lab, client)) == []

            walk = Walk(MANAGER_PATH, MANAGER, "ImportImage", "sha{sv}",
                        ["theirs", 0, {}], (str(kernels["text"]),))  # fmt: skip
            replies = calls_as(lab.daemon.address, stranger, [walk], workdir)
            assert replies == [("return", "")]
            (theirs,) = [job for job in jobs(client) if job != first]
            cancel(client, theirs)

            cancel(client, first)
            again = import_image(client, kernels["text"], "second")
            cancel(client, again)
            assert images(client) == []
        finally:
            client.close()


def jobs(client: BusClient) -> list[str]:
    (paths,) = client.ok(MANAGER_PATH, MANAGER, "ListJobs")
    return [str(path) for path in paths]


# --- the host's memory and CPUs, and lower configured limits ----------------------


@pytest.mark.parametrize(
    ("config", "args", "named"),
    [
        ("", ("--memory", "3073"),
         "limit of 3072 MiB (configuration key max_memory_mib)"),
        ("", ("--cpus", "17"), "limit of 16 (configuration key max_vcpus)"),
        ("max_memory_mib = 512\n", ("--memory", "513"), "limit of 512 MiB"),
        ("max_vcpus = 2\n", ("--cpus", "3"), "limit of 2 (configuration key"),
        ("max_extra_disks = 1\n", ("--extra-disk", "1M", "--extra-disk", "1M"),
         "limit of 1 (configuration key max_extra_disks)"),
        ("max_disk_gib = 1\n", ("--extra-disk", "1025M"), "limit of 1 GiB"),
    ],
    ids=["host-memory", "host-cpus", "memory", "vcpus", "extra-disks", "disk-size"],
)  # fmt: skip
def test_create_over_a_limit_exits_9(
    limited: Serving, ctl: Ctl, stranger: Identity, *, kernels: dict[str, Path],
    config: str, args: tuple[str, ...], named: str,
) -> None:  # fmt: skip
    """As a member of kdlab; the test driver's host has 3072 MiB and 16 CPUs."""
    with limited(config) as lab:
        client = BusClient(lab.daemon.address)
        try:
            before = Snapshot.take(lab, client)
            create = ("create", "new", "--kernel", str(kernels["bzImage"]), *args)
            result = ctl(*create, user=stranger)
            assert result.returncode == LimitExceeded.exit_code, result.stderr
            assert named in result.stderr
            assert before.changes(Snapshot.take(lab, client)) == []
        finally:
            client.close()


def test_image_over_the_configured_size_exits_9(limited: Serving, ctl: Ctl) -> None:
    with limited("max_disk_gib = 1\n"):
        result = ctl("image", "create", "big", "--size", "1025M", user=NOBODY)
        assert result.returncode != LimitExceeded.exit_code, "authorization first"
        result = ctl("image", "create", "big", "--size", "1025M")
        assert result.returncode == LimitExceeded.exit_code, result.stderr
        assert "limit of 1 GiB (configuration key max_disk_gib)" in result.stderr
        assert ctl("image", "create", "big", "--size", "1G").returncode == 0
