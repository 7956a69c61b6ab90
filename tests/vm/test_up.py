"""From a kernel tree to a breakpoint in one command, on Debian's 6.1 source."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.kernel.initramfs import READY
from tests.vm.conftest import TEST_POOL, Lab, virsh
from tests.vm.test_debug import Console, show
from tests.vm.test_images import ROOT_MARKER, ext4_image
from tests.vm.test_lifecycle import wait_for_console, wait_for_diagnosis
from tests.vm.test_userspace import assert_no_diagnosis

pytestmark = pytest.mark.vm


@pytest.fixture
def image(lab: Lab, tmp_path: Path) -> Iterator[str]:
    name = f"upimg-{time.monotonic_ns() % 10**8}"
    raw = ext4_image(tmp_path / "root.img", tmp_path / "tree")
    assert lab.ctl("image", "import", name, str(raw)).returncode == 0
    yield name
    lab.ctl("image", "delete", name)


def test_up_lands_in_gdb_at_start_kernel_with_lx_helpers(
    lab: Lab, vm_name: str, minimal_build: Path
) -> None:
    checked = lab.ctl("kernel", "check", str(minimal_build))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    up = lab.ctl(
        "up",
        str(minimal_build),
        "--name",
        vm_name,
        "--batch",
        "-ex",
        "hbreak start_kernel",
        "-ex",
        "continue",
        "-ex",
        "lx-version",
    )
    assert up.returncode == 0, up.stderr
    assert "start_kernel () at" in up.stdout
    assert "Linux version 6.1" in up.stdout, "lx-version ran: the gdb scripts loaded"
    shown = json.loads(lab.ctl("show", vm_name, "--json").stdout)
    assert shown["tree"] == str(minimal_build)
    assert shown["vmlinux"] == str(minimal_build / "vmlinux")

    again = lab.ctl("up", str(minimal_build), "--name", vm_name, "--batch")
    assert again.returncode == 0, again.stderr
    assert "created VM" not in again.stderr, "up reuses the VM of the tree"
    assert "waits for the debugger" in again.stderr, "it booted again, paused"
    # gdb --batch quit at once: it detached, and the kernel runs on.
    assert json.loads(lab.ctl("show", vm_name, "--json").stdout)["state"] == "running"


def test_up_of_a_fresh_tree_lands_at_kdlabs_shell(
    lab: Lab, vm_name: str, minimal_build: Path
) -> None:
    """``up --console`` without an image: kdlab's userspace initramfs (the
    minimal kernel has what it needs built in), a shell, no panic."""
    up = Console(
        lab.daemon.address,
        vm_name,
        command=["up", str(minimal_build), "--name", vm_name, "--console"],
    )
    try:
        up.expect(READY.text().encode(), timeout=120)
        up.type(b"echo up-$((6*7)) $(cat /proc/version)\r")
        up.expect(b"up-42 Linux version 6.1")
        assert up.detach() == 0
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()
    assert b"Kernel panic" not in up.seen
    assert_no_diagnosis(lab.ctl("logs", vm_name).stdout)


def test_root_sda_on_a_virtio_disk_panics_and_is_diagnosed(
    lab: Lab, vm_name: str, minimal_build: Path, image: str
) -> None:
    created = lab.ctl(
        "create",
        vm_name,
        "--tree",
        str(minimal_build),
        "--image",
        image,
        "--cmdline",
        "root=/dev/sda",
        "--memory",
        "256",
    )
    assert created.returncode == 0, created.stderr
    assert lab.ctl("start", vm_name).returncode == 0
    diagnosis = wait_for_diagnosis(lab, vm_name)
    assert "VFS: Unable to mount root fs" in lab.ctl("logs", vm_name).stdout
    assert diagnosis["code"] == "root-device-missing"
    assert "vda" in diagnosis["fix"]


def test_up_builds_then_boots_a_new_vm_on_an_image_on_the_console(
    lab: Lab, image: str, vm_name: str, minimal_build: Path
) -> None:
    """``up --build --image --console``: make runs (nothing to redo in the cached
    build), the new VM gets the image as its root disk and boots, and the console
    is attached instead of gdb: nothing waits for a debugger."""
    up = Console(
        lab.daemon.address,
        vm_name,
        command=[
            *("up", str(minimal_build), "--name", vm_name),
            *("--build", "--image", image, "--console"),
        ],
    )
    try:
        up.expect(b"built in ", timeout=600)
        up.expect(b"escape character is ^]", timeout=120)
        up.expect(f"{ROOT_MARKER} root=/dev/vda rw".encode(), timeout=120)
        up.type(b"echo up-$((6*7))\r")
        up.expect(b"up-42")
        assert up.detach() == 0
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()
    shown = show(lab, vm_name)
    assert shown["tree"] == str(minimal_build)
    assert shown["state"] == "running"
    assert shown["waiting_for_debugger"] is False
    used = json.loads(lab.ctl("image", "list", "--json").stdout)
    assert [i["used_by"] for i in used if i["name"] == image] == [[vm_name]]


def test_a_tree_vm_boots_the_newest_bzimage_at_each_start(
    lab: Lab, vm_name: str, minimal_build: Path, tmp_path: Path
) -> None:
    """Between two starts the tree's bzImage is replaced by another kernel (what
    a rebuild does): the second boot is of the new one."""
    tree = tmp_path / "build"  # an O= directory: what kdlabctl reads of one
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "source").symlink_to((minimal_build / "source").resolve())
    release_file = Path("include/config/kernel.release")
    shutil.copy(minimal_build / release_file, tree / release_file)
    bzimage = tree / "arch" / "x86" / "boot" / "bzImage"
    shutil.copy(minimal_build / "arch" / "x86" / "boot" / "bzImage", bzimage)
    release = (minimal_build / release_file).read_text().strip()
    created = lab.ctl(
        "create", vm_name, "--tree", str(tree), "--initrd", str(lab.initramfs)
    )
    assert created.returncode == 0, created.stderr

    for kernel, booted in [
        (None, release),
        (lab.kernel.vmlinuz, lab.kernel.release),
    ]:
        if kernel is not None:
            assert lab.ctl("stop", "--force", vm_name).returncode == 0
            staged = bzimage.with_name("bzImage.new")
            shutil.copy(kernel, staged)
            staged.replace(bzimage)
        assert lab.ctl("start", vm_name).returncode == 0
        wait_for_console(lab, vm_name, f"Linux version {booted} ")
        assert show(lab, vm_name)["kernel_release"] == booted
        uploaded = Path(
            virsh("vol-path", f"{vm_name}.kernel", "--pool", TEST_POOL).stdout.strip()
        )
        digest = hashlib.sha256(uploaded.read_bytes()).hexdigest()
        assert digest == hashlib.sha256(bzimage.read_bytes()).hexdigest()
