"""Fixtures of the bus tier (see tests/support/testdriver.py for what runs and why).

One private dbus-daemon serves the whole session: it keeps no state between
tests once a test's kdlabd and clients have gone. Every test gets its own
kdlabd on a fresh test driver file, so no VM state leaks between tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from kdlab.wire import (
    IMAGE_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    VM_INTERFACE,
)
from tests.bus.guestagent import GuestAgent, agent_binary
from tests.support.bus import PROPERTIES, SYSTEM_BUS_CONFIG, BusClient, PrivateBus
from tests.support.clients import Identity, cache_home, kdlabctl
from tests.support.prereq import require, require_tool
from tests.support.testdriver import Lab

Ctl = Callable[..., CompletedProcess[str]]


@pytest.fixture(scope="session")
def public_dir() -> Iterator[Path]:
    """A directory every uid may traverse: bus socket, kdlabd's files, test kernels."""
    require(os.geteuid() == 0, "root (kdlabd runs as root; clients run as other uids)")
    require(
        SYSTEM_BUS_CONFIG.is_file(),
        f"{SYSTEM_BUS_CONFIG} (apt-get install dbus-system-bus-common)",
    )
    for tool, package in (
        ("dbus-daemon", "dbus-daemon"),
        ("dbus-monitor", "dbus-bin"),
        ("busctl", "systemd"),
        ("gdbus", "libglib2.0-bin"),
        ("setpriv", "util-linux"),
    ):
        require_tool(tool, package)
    path = Path(tempfile.mkdtemp(prefix="kdlab-bus-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def bus(public_dir: Path) -> Iterator[PrivateBus]:
    private = PrivateBus(public_dir / "bus").start()
    yield private
    private.stop()


@pytest.fixture
def client(bus: PrivateBus) -> Iterator[BusClient]:
    """A root dbus-next connection to the private bus."""
    connection = BusClient(bus.address)
    yield connection
    connection.close()


@pytest.fixture
def workdir(public_dir: Path) -> Path:
    path = Path(tempfile.mkdtemp(dir=public_dir, prefix="t-"))
    path.chmod(0o755)
    return path


@pytest.fixture
def kdlabd(bus: PrivateBus, workdir: Path) -> Iterator[Lab]:
    """kdlabd serving the standard fleet (testdriver.FLEET) from a fresh driver file.

    Teardown checks that it exits 0 on SIGTERM and never logged a traceback.
    """
    with Lab(bus, workdir).serving() as lab:
        yield lab


@pytest.fixture
def ctl(bus: PrivateBus) -> Ctl:
    """``ctl(*args, user=None)``: kdlabctl on the private bus (as *user*)."""

    def run(*args: str, user: Identity | None = None) -> CompletedProcess[str]:
        return kdlabctl(bus.address, *args, user=user)

    return run


@pytest.fixture(scope="session")
def kernels(public_dir: Path) -> dict[str, Path]:
    """Files to offer as a kernel, readable by every uid, by what they are."""
    directory = public_dir / "kernels"
    directory.mkdir(mode=0o755)
    header = bytearray(4096)
    header[0x202:0x206] = b"HdrS"  # the x86 boot protocol's bzImage magic
    files = {
        "bzImage": bytes(header),
        "empty": b"",
        "text": b"this is not a kernel\n" * 100,
        "vmlinux": b"\x7fELF\x02\x01\x01" + bytes(4089),
    }
    paths = {}
    for name, content in files.items():
        path = directory / name
        path.write_bytes(content)
        path.chmod(0o644)
        paths[name] = path
    paths["directory"] = directory
    paths["missing"] = directory / "no-such-bzImage"
    paths["device"] = Path("/dev/zero")
    return paths


@pytest.fixture
def image_and_job(
    kdlabd: Lab,  # noqa: ARG001 (it must run)
    client: BusClient,
    kernels: dict[str, Path],
) -> tuple[str, str]:
    """The object paths of an image (CreateImage) and of an import job.

    The test driver cannot upload volumes, so the import fails, but its job
    object stays for a while.
    """
    (image,) = client.ok(
        MANAGER_PATH,
        MANAGER_INTERFACE,
        "CreateImage",
        "sta{sv}",
        ["base", 64 << 20, {}],
    )
    fd = os.open(kernels["text"], os.O_RDONLY)  # any non-empty file is a raw image
    try:
        (job,) = client.ok(
            MANAGER_PATH,
            MANAGER_INTERFACE,
            "ImportImage",
            "sha{sv}",
            ["imported", 0, {}],
            unix_fds=[fd],
        )
    finally:
        os.close(fd)

    def job_ended() -> bool:
        (state,) = client.ok(job, PROPERTIES, "Get", "ss", [JOB_INTERFACE, "State"])
        return bool(state.value != "running")

    # Tests compare snapshots of the objects: the job must not change under them.
    client.wait_until(job_ended)
    return str(image), str(job)


Target = Callable[[str], tuple[str, str]]


@pytest.fixture
def target(image_and_job: tuple[str, str]) -> Target:
    """``target(NAME)``: the interface and object path of "manager", "image"
    (an image), "job" (a job) or the VM called NAME."""
    image, job = image_and_job
    known = {
        "manager": (MANAGER_INTERFACE, MANAGER_PATH),
        "image": (IMAGE_INTERFACE, image),
        "job": (JOB_INTERFACE, job),
    }
    return lambda name: known.get(name, (VM_INTERFACE, f"{MANAGER_PATH}/vm/{name}"))


@pytest.fixture(scope="session")
def agent_program() -> Path:
    """kdlab's exec agent, built for this machine."""
    return agent_binary(cache_home() / "agent")


@pytest.fixture
def guest(kdlabd: Lab, agent_program: Path) -> Iterator[GuestAgent]:
    """The real exec agent on the running VM "busy"'s exec channel (as nobody)."""
    agent = GuestAgent(kdlabd.layout.agent_socket("busy"), agent_program)
    yield agent
    agent.close()
