"""Boot benchmarks: kdlab's VMs against bare QEMU on the same kernel and initrd."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
import uuid
from pathlib import Path

from bench.measure import Row, interleaved, row
from tests.fixtures import debian
from tests.harness import Kdlabd, kdlabctl, system_kdlabd

BENCH_POOLS = "kdlab-bench"
MARKER = debian.DEFAULT_MARKER
MEMORY_MIB = 256


def _wait_in_file(path: Path, text: bytes, timeout: float = 120) -> None:
    """Poll *path* (re-opened: each boot starts a new log) until it holds *text*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in path.read_bytes():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s")


def _kdlab_boot(daemon: Kdlabd, name: str) -> float:
    log = daemon.state_dir / "vms" / name / "console.log"
    start = time.monotonic()
    result = kdlabctl(daemon.address, "start", name)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    _wait_in_file(log, MARKER.encode())
    took = time.monotonic() - start
    kdlabctl(daemon.address, "stop", "--force", name)
    return took


def _bare_qemu_boot(kernel: Path, initrd: Path, cmdline: str) -> float:
    start = time.monotonic()
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-machine",
            "pc,accel=tcg",
            "-m",
            str(MEMORY_MIB),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            cmdline,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert qemu.stdout is not None
    seen = b""
    try:
        while MARKER.encode() not in seen:
            ready, _, _ = select.select([qemu.stdout], [], [], 120)
            chunk = os.read(qemu.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise RuntimeError("bare QEMU ended before the marker")
            seen = seen[-4096:] + chunk
        return time.monotonic() - start
    finally:
        qemu.kill()
        qemu.wait()


def boot_to_userspace(quick: bool) -> list[Row]:
    """``kdlabctl start`` to the userspace marker vs bare QEMU, same files and accel."""
    kernel = debian.cloud_kernel()
    initrd = debian.busybox_initramfs(MARKER)
    name = f"bench-{uuid.uuid4().hex[:6]}"
    with system_kdlabd(BENCH_POOLS) as daemon:
        created = kdlabctl(
            daemon.address,
            "create",
            name,
            "--kernel",
            str(kernel.vmlinuz),
            "--initrd",
            str(initrd),
            "--memory",
            str(MEMORY_MIB),
        )
        if created.returncode != 0:
            raise RuntimeError(created.stderr)
        try:
            shown = kdlabctl(daemon.address, "show", name, "--json")
            cmdline = json.loads(shown.stdout)["cmdline"]
            ours, theirs = interleaved(
                3 if quick else 7,
                lambda: _kdlab_boot(daemon, name),
                lambda: _bare_qemu_boot(kernel.vmlinuz, initrd, cmdline),
            )
        finally:
            kdlabctl(daemon.address, "delete", "--force", name)
    return [
        row(
            "boot_to_userspace",
            ours,
            theirs,
            baseline="bare qemu-system-x86_64",
            unit="s",
            goal="ratio <= 1.10",
            note=f"Debian {kernel.release} + busybox initramfs, TCG, {MEMORY_MIB} MiB",
        )
    ]
