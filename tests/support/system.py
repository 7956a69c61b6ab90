"""kdlabd on the system libvirtd, as the vm tier and the benchmarks run it; bare QEMU.

:func:`system_kdlabd` gives kdlabd a private bus, state directories and pools
of its own: its VMs are real domains of the system libvirtd, and a kdlabd the
developer runs is not disturbed.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support import debian
from tests.support.bus import PrivateBus
from tests.support.clients import kdlabctl
from tests.support.daemon import Kdlabd

if TYPE_CHECKING:
    from kdlabd.core.rootfs import RootfsSpec

SYSTEM_LIBVIRT = "qemu:///system"


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    """virsh on the system libvirtd."""
    return subprocess.run(
        ["virsh", "-c", SYSTEM_LIBVIRT, *args],
        capture_output=True,
        text=True,
        check=False,
    )


def remove_domain(domain: str) -> None:
    """Destroy and undefine the libvirt domain *domain*, if it exists."""
    virsh("destroy", domain)
    virsh("undefine", domain)


def remove_vm(daemon: Kdlabd, name: str) -> None:
    """Delete the VM *name* through kdlabd, then its domain through virsh in
    case kdlabd could not; whatever is left of it, if anything."""
    kdlabctl(daemon.address, "delete", "--force", name)
    remove_domain(f"kdlab-{name}")


def remove_pools(pool_prefix: str) -> None:
    """Destroy and undefine the pools of a :func:`system_kdlabd`, if they exist."""
    kinds = ("boot", "images", "dumps", "recordings")
    for pool in (f"{pool_prefix}-{kind}" for kind in kinds):
        virsh("pool-destroy", pool)
        virsh("pool-undefine", pool)


def build_cache() -> Path:
    """Where a :func:`system_kdlabd` keeps its debootstrap bases: in the fixture
    cache (``$KDLAB_CACHE``, read now), as a developer's kdlabd keeps them
    across runs."""
    return debian.cache_dir() / "kdlabd"


def cached_base(spec: RootfsSpec) -> Path:
    """The debootstrap base a build of *spec* uses, in :func:`build_cache`."""
    from kdlabd.host.rootfs import cache_key

    return build_cache() / f"{cache_key(spec)}.tar"


def forget_cached_base(suite: str, packages: tuple[str, ...]) -> None:
    """Remove the debootstrap base of *suite* with *packages* from the builds'
    cache, so the next such build bootstraps for real: a test that must catch
    debootstrap running cannot rely on no run before it having completed that
    build."""
    from kdlabd.core.rootfs import RootfsSpec

    cached_base(RootfsSpec(suite, packages=packages)).unlink(missing_ok=True)


@contextlib.contextmanager
def system_kdlabd(
    pool_prefix: str,
    accel: str = "tcg",
    config: str = "",
    nofile: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Kdlabd]:
    """kdlabd on the system libvirtd, on a private bus, with its own state and pool.

    Its VMs are real domains of the system libvirtd; a kdlabd the developer
    runs is not disturbed. *config* adds lines to its kdlabd.toml, *nofile*
    sets its descriptor limit, *env* adds to its environment
    (KDLAB_TEST_HOLD_AT, ...). On exit the daemon must stop cleanly (exit 0
    within STOP_SECONDS of SIGTERM, no traceback in its log) and must not have
    died on its own before; its pool and directories are removed.
    """
    # QEMU (the libvirt-qemu user) must traverse to the boot volumes and the
    # gdb socket: pytest's temporary directories are 0700, /var/tmp is not.
    root = Path(tempfile.mkdtemp(prefix="kdlab-lab-", dir="/var/tmp"))
    root.chmod(0o711)
    bus = PrivateBus(root / "bus").start()
    daemon = Kdlabd(
        address=bus.address,
        libvirt_uri=SYSTEM_LIBVIRT,
        state_dir=root / "state",
        runtime_dir=root / "run",
        extra_args=("--accel", accel),
        # Builds keep their debootstrap cache across runs, as a developer's do.
        config_text=(
            f'boot_pool = "{pool_prefix}-boot"\nimage_pool = "{pool_prefix}-images"\n'
            f'dump_pool = "{pool_prefix}-dumps"\n'
            f'recording_pool = "{pool_prefix}-recordings"\n'
            f'cache_dir = "{build_cache()}"\n{config}'
        ),
        nofile=nofile,
    )
    try:
        daemon.start(env=env)
        yield daemon
    finally:
        died = daemon.died_on_its_own()
        try:
            if daemon.running:
                daemon.stop()  # exit 0 within STOP_SECONDS, or it fails here
        finally:
            log = daemon.log()
            bus.stop()
            remove_pools(pool_prefix)
            shutil.rmtree(root, ignore_errors=True)
    if died:
        raise RuntimeError(died)
    if "Traceback" in log:
        raise RuntimeError(f"kdlabd logged a traceback:\n{log}")


@dataclass(frozen=True)
class BareGuest:
    """Bare QEMU under TCG booting a kernel, an initrd and a virtio disk.

    The hand-made baseline some vm tests boot without kdlab.
    """

    qemu: str
    kernel: Path
    initrd: Path
    disk: Path
    memory_mib: int = 512
    snapshot: bool = False

    def command(self, cmdline: str) -> list[str]:
        drive = [f"file={self.disk},if=virtio,format=raw"]
        # -snapshot: the boot writes into a temporary overlay, not the image.
        drive += ["-snapshot"] if self.snapshot else []
        return [
            self.qemu,
            *("-machine", "accel=tcg", "-m", str(self.memory_mib), "-smp", "1"),
            *("-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot"),
            *("-kernel", str(self.kernel), "-initrd", str(self.initrd)),
            "-drive",
            *drive,
            *("-append", cmdline),
        ]
