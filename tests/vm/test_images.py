"""Disk images on real libvirt: import, overlays, a Debian kernel with its modules."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kdlab.errors import BuildFailed
from tests.support import REPO
from tests.support.clients import NOBODY, Identity, ctl_env
from tests.support.daemon import processes_with
from tests.support.prereq import require_tool
from tests.support.system import forget_cached_base
from tests.vm.conftest import POOL_PREFIX, Lab, virsh
from tests.vm.test_lifecycle import wait_for_console, wait_for_diagnosis
from tests.vm.test_rootfs_build import SSH_KEY, debugfs

pytestmark = pytest.mark.vm

IMAGE_POOL = f"{POOL_PREFIX}-images"
BOOT_POOL = f"{POOL_PREFIX}-boot"
ROOT_MARKER = "KDLAB-ROOT-MOUNTED"
DISK_MARKER = "KDLAB-ROOT-DISK"
MIB = 1024 * 1024


DEFAULT_INIT = (
    "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
    "/bin/busybox mount -t sysfs sysfs /sys\n"
    f'echo "{ROOT_MARKER} $(/bin/busybox cat /proc/cmdline)"\n'
    f'echo "{DISK_MARKER} $(/bin/busybox cat /sys/block/vda/size) sectors"\n'
    "exec /bin/busybox sh\n"
)


def ext4_image(path: Path, tree: Path, init_script: str = DEFAULT_INIT) -> Path:
    """A small whole-disk ext4 whose /sbin/init (by default) prints a marker:
    a root to boot."""
    require_tool("mke2fs", "e2fsprogs")
    for directory in ("bin", "sbin", "proc", "sys", "dev"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", tree / "bin" / "busybox")
    init = tree / "sbin" / "init"
    init.write_text(init_script)
    init.chmod(0o755)
    subprocess.run(
        ["mke2fs", "-q", "-t", "ext4", "-F", "-d", str(tree), str(path), "64M"],
        check=True,
    )
    return path


def images(lab: Lab) -> dict[str, dict[str, object]]:
    result = lab.ctl("image", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {image["name"]: image for image in json.loads(result.stdout)}


def pool_volumes(pool: str) -> list[str]:
    listing = virsh("vol-list", pool).stdout.splitlines()[2:]
    return [line.split()[0] for line in listing if line.strip()]


@pytest.fixture
def image_name(lab: Lab) -> Iterator[str]:
    name = f"img-{os.getpid()}-{time.monotonic_ns() % 100000}"
    yield name
    lab.ctl("image", "delete", name)


def test_vm_boots_debian_kernel_from_an_overlay_of_an_image(
    lab: Lab, vm_name: str, image_name: str, tmp_path: Path
) -> None:
    require_tool("qemu-img", "qemu-utils")
    raw = ext4_image(tmp_path / "root.img", tmp_path / "tree")
    imported = lab.ctl("image", "import", image_name, str(raw))
    assert imported.returncode == 0, imported.stderr
    assert image_name in pool_volumes(IMAGE_POOL), "images are volumes virsh sees"
    assert images(lab)[image_name]["format"] == "raw"

    created = lab.ctl(
        "create",
        vm_name,
        "--kernel",
        str(lab.kernel.vmlinuz),
        "--image",
        image_name,
        "--extra-disk",
        "16M",
        "--memory",
        "256",
    )
    assert created.returncode == 0, created.stderr
    assert "initramfs" in created.stderr, "a Debian kernel gets its virtio modules"
    assert images(lab)[image_name]["used_by"] == [vm_name]

    disk = Path(
        virsh(
            "vol-path", f"{vm_name}.vda.qcow2", "--pool", f"{POOL_PREFIX}-boot"
        ).stdout.strip()
    )
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert info["backing-filename"].endswith(f"/{image_name}")
    assert info["actual-size"] < 1024 * 1024, "an overlay, not a copy"

    assert lab.ctl("start", vm_name).returncode == 0
    log = wait_for_console(lab, vm_name, ROOT_MARKER)
    assert f"{ROOT_MARKER} root=/dev/vda rw" in log

    refused = lab.ctl("image", "delete", image_name)
    assert refused.returncode == 3
    assert vm_name in refused.stderr
    assert lab.ctl("delete", "--force", vm_name).returncode == 0
    assert not [v for v in pool_volumes(f"{POOL_PREFIX}-boot") if v.startswith(vm_name)]
    assert images(lab)[image_name]["used_by"] == []
    assert lab.ctl("image", "delete", image_name).returncode == 0
    assert image_name not in pool_volumes(IMAGE_POOL)


def test_an_images_owner_is_kept_by_libvirt_beside_it(
    lab: Lab, image_name: str
) -> None:
    """A kdlab member imports: its uid is an empty volume of the pool next to the
    image (virsh sees it), the image's file stays root's (a member's file could
    be rewritten under other users' VMs), and kdlabd reads it back after a
    restart. Deleting the image removes the record."""
    member = Identity(NOBODY.uid, NOBODY.gid, (grp.getgrnam("kdlab").gr_gid,))
    public = Path(tempfile.mkdtemp(dir=lab.daemon.state_dir.parent))
    public.chmod(0o755)
    raw = public / "disk.raw"
    raw.write_bytes(b"a member's disk image\n" * 1024)
    raw.chmod(0o644)
    imported = subprocess.run(
        [*member.setpriv(), sys.executable, "-m", "kdlabctl", "image", "import",
         image_name, str(raw)],
        env=ctl_env(lab.daemon.address), cwd=REPO, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    mark = f".owner-{NOBODY.uid}.{image_name}"
    assert mark in pool_volumes(IMAGE_POOL)
    assert images(lab)[image_name]["owner"] == NOBODY.uid
    assert mark not in images(lab), "the record is no image"
    path = Path(virsh("vol-path", image_name, "--pool", IMAGE_POOL).stdout.strip())
    assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (0, 0o600)

    assert lab.daemon.stop() == 0
    lab.daemon.start()
    assert images(lab)[image_name]["owner"] == NOBODY.uid
    assert lab.ctl("image", "delete", image_name).returncode == 0
    assert not [v for v in pool_volumes(IMAGE_POOL) if v.endswith(image_name)]
    shutil.rmtree(public)


def test_qcow2_with_a_backing_file_is_refused(
    lab: Lab, image_name: str, tmp_path: Path
) -> None:
    require_tool("qemu-img", "qemu-utils")
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 4096)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
            str(overlay),
        ],
        check=True,
    )
    result = lab.ctl("image", "import", image_name, str(overlay))
    assert result.returncode == 2
    assert "backing file" in result.stderr
    assert image_name not in pool_volumes(IMAGE_POOL)
    assert image_name not in images(lab)


def test_interrupted_import_is_cancelled_and_leaves_no_volume(
    lab: Lab, image_name: str, tmp_path: Path
) -> None:
    # Real data, not a hole: holes upload in no time at all.
    big = tmp_path / "big.raw"
    block = os.urandom(1024 * 1024)
    with big.open("wb") as file:
        for _ in range(768):
            file.write(block)
    client = subprocess.Popen(
        [sys.executable, "-m", "kdlabctl", "image", "import", image_name, str(big)],
        env=ctl_env(lab.daemon.address),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stderr is not None
    line = client.stderr.readline()
    while line and "uploading" not in line:
        line = client.stderr.readline()
    assert "uploading" in line, "the job reports its upload progress"
    client.send_signal(signal.SIGINT)
    rest = client.stderr.read()
    assert client.wait(timeout=60) == 130, rest
    assert "cancelling" in rest
    assert image_name not in images(lab)
    assert image_name not in pool_volumes(IMAGE_POOL)


def test_built_debian_image_boots_debians_kernel_to_a_shell(
    lab: Lab, vm_name: str, image_name: str
) -> None:
    """The README's image flow: image build, create --image, a login shell, and
    ``kdlabctl exec`` through the agent the image runs."""
    require_tool("debootstrap", "debootstrap")
    built = lab.ctl(
        "image",
        "build",
        image_name,
        "--debootstrap",
        "bookworm",
        "--size",
        "1G",
        timeout=900,
    )
    assert built.returncode == 0, built.stderr
    image = images(lab)[image_name]
    assert image["capacity"] == 1024**3
    assert image["allocation"] < image["capacity"] // 2, "the upload stays sparse"

    created = lab.ctl(
        "create",
        vm_name,
        "--kernel",
        str(lab.kernel.vmlinuz),
        "--image",
        image_name,
        "--memory",
        "512",
    )
    assert created.returncode == 0, created.stderr
    assert lab.ctl("start", vm_name).returncode == 0
    # systemd's serial getty logs root in by itself: the prompt is the proof.
    log = wait_for_console(lab, vm_name, "root@kdlab:~#", timeout=180)
    assert "EXT4-fs (vda): mounted filesystem" in log
    # The image's systemd runs kdlab's agent; udev named its port once kdlab's
    # initramfs loaded virtio_console (the image has no modules of its own).
    started = time.monotonic()
    os_release = ("exec", vm_name, "--wait", "120", "--", "cat", "/etc/os-release")
    ran = lab.ctl(*os_release, timeout=180)
    print(f"\nexec on the built image: {time.monotonic() - started:.1f} s")
    assert ran.returncode == 0, ran.stderr
    assert "VERSION_CODENAME=bookworm" in ran.stdout
    # A graceful stop: the power button reaches systemd-logind, which powers off
    # (the kernel says so last); no plug is pulled.
    stopped = lab.ctl("stop", vm_name, "--timeout", "120", timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    assert "reboot: Power down" in lab.ctl("logs", vm_name).stdout


def build_leftovers(lab: Lab, name: str) -> list[str]:
    """What an image build that did not complete left behind (nothing, it must)."""
    state = lab.daemon.state_dir
    found = [f"image {name}"] if name in images(lab) else []
    found += [f"volume {name}"] if name in pool_volumes(IMAGE_POOL) else []
    for directory in (state / "scratch", state / "pending"):
        found += [str(p) for p in directory.iterdir()] if directory.is_dir() else []
    found += [f"process {p}" for p in processes_with(str(state / "scratch"))]
    return found


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_cancelled_build_kills_debootstrap_and_leaves_nothing(
    lab: Lab, image_name: str
) -> None:
    require_tool("debootstrap", "debootstrap")
    forget_cached_base("bookworm", ("hello",))
    client = subprocess.Popen(
        [sys.executable, "-m", "kdlabctl", "image", "build", image_name,
         "--debootstrap", "bookworm", "--packages", "hello"],
        env=ctl_env(lab.daemon.address), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stderr is not None
    line = client.stderr.readline()
    while line and not line.startswith(("debootstrap", "unpacking the cached")):
        line = client.stderr.readline()
    assert line, "the build reports its first step"
    scratch = str(lab.daemon.state_dir / "scratch")
    assert wait_until(lambda: len(processes_with(scratch)) > 0, 60)
    running = processes_with(scratch)
    client.send_signal(signal.SIGINT)
    rest = client.stderr.read()
    assert client.wait(timeout=60) == 130, rest
    assert "cancelling" in rest
    # Cancel returns at once; the job then kills and removes, still bounded.
    wait_until(lambda: build_leftovers(lab, image_name) == [], 60)
    assert build_leftovers(lab, image_name) == [], f"was running: {running}"


def test_failed_build_says_why_and_leaves_nothing(lab: Lab, image_name: str) -> None:
    require_tool("debootstrap", "debootstrap")
    built = lab.ctl(
        "image", "build", image_name, "--debootstrap", "bookworm",
        "--packages", "kdlab-no-such-package", timeout=600,
    )  # fmt: skip
    assert built.returncode == BuildFailed.exit_code, built.stderr
    assert "debootstrap failed" in built.stderr
    assert "kdlab-no-such-package" in built.stderr
    assert "Traceback" not in built.stderr
    assert build_leftovers(lab, image_name) == []


def test_wrong_root_device_is_diagnosed_naming_the_vms_disk(
    lab: Lab, vm_name: str, image_name: str, tmp_path: Path
) -> None:
    raw = ext4_image(tmp_path / "root.img", tmp_path / "tree")
    assert lab.ctl("image", "import", image_name, str(raw)).returncode == 0
    created = lab.ctl(
        "create",
        vm_name,
        "--kernel",
        str(lab.kernel.vmlinuz),
        "--image",
        image_name,
        "--cmdline",
        "root=/dev/sda",
        "--memory",
        "256",
    )
    assert created.returncode == 0, created.stderr
    assert lab.ctl("start", vm_name).returncode == 0
    diagnosis = wait_for_diagnosis(lab, vm_name)
    assert diagnosis["code"] == "root-device-missing"
    assert "/dev/sda" in diagnosis["cause"]
    assert "vda" in diagnosis["fix"]
    human = lab.ctl("show", vm_name).stdout
    assert "root-device-missing" in human


def disk_capacity(vm: str) -> int:
    """The virtual size of *vm*'s root disk volume, in bytes."""
    info = virsh("vol-info", "--bytes", f"{vm}.vda.qcow2", "--pool", BOOT_POOL)
    assert info.returncode == 0, info.stderr
    (capacity,) = re.findall(r"^Capacity:\s+(\d+) bytes$", info.stdout, re.MULTILINE)
    return int(capacity)


def test_resize_grows_an_image_and_disk_size_sizes_a_vms_disk(
    lab: Lab, image_name: str, vm_name: str, tmp_path: Path
) -> None:
    raw = ext4_image(tmp_path / "root.img", tmp_path / "tree")  # 64 MiB
    assert lab.ctl("image", "import", image_name, str(raw)).returncode == 0
    shrink = lab.ctl("image", "resize", image_name, "--size", "32M")
    assert shrink.returncode == 2, shrink.stderr
    grown = lab.ctl("image", "resize", image_name, "--size", "96M")
    assert grown.returncode == 0, grown.stderr
    assert images(lab)[image_name]["capacity"] == 96 * MIB

    kernel = ("--kernel", str(lab.kernel.vmlinuz), "--memory", "256")
    created = lab.ctl("create", vm_name, *kernel, "--image", image_name)
    assert created.returncode == 0, created.stderr
    bigger = f"{vm_name}-big"
    try:
        created = lab.ctl(
            "create", bigger, *kernel, "--image", image_name, "--disk-size", "128M"
        )
        assert created.returncode == 0, created.stderr
        assert disk_capacity(bigger) == 128 * MIB
    finally:
        lab.ctl("delete", bigger)
    assert disk_capacity(vm_name) == 96 * MIB

    # The guest sees the grown disk.
    assert lab.ctl("start", vm_name).returncode == 0
    log = wait_for_console(lab, vm_name, " sectors")
    assert f"{DISK_MARKER} {96 * MIB // 512} sectors" in log


def test_image_build_installs_packages_and_the_ssh_key(
    lab: Lab, image_name: str, tmp_path: Path
) -> None:
    """``image build --packages --ssh-key`` through kdlabctl: both are in the image."""
    require_tool("debootstrap", "debootstrap")
    require_tool("debugfs", "e2fsprogs")
    key = tmp_path / "id_ed25519.pub"
    key.write_text(SSH_KEY + "\n")
    built = lab.ctl(
        "image",
        "build",
        image_name,
        *("--debootstrap", "bookworm", "--size", "1G"),
        *("--packages", "strace", "--ssh-key", str(key)),
        timeout=900,
    )
    assert built.returncode == 0, built.stderr
    volume = Path(virsh("vol-path", image_name, "--pool", IMAGE_POOL).stdout.strip())
    assert debugfs(volume, "cat /root/.ssh/authorized_keys") == SSH_KEY + "\n"
    installed = debugfs(volume, "cat /var/lib/dpkg/status")
    for package in ("strace", "openssh-server"):
        assert f"Package: {package}\nStatus: install ok installed\n" in installed
    assert "Type: regular" in debugfs(volume, "stat /usr/bin/strace")
