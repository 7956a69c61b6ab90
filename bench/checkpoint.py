"""Checkpoint benchmarks: returning to a booted VM against booting it again.

- ``checkpoint_restore:MIB``: ``kdlabctl checkpoint restore`` of a checkpoint
  taken at the busybox shell of Debian's kernel, until the command returns
  (the VM runs in the shell again), against a cold ``kdlabctl start`` of the
  same VM to the userspace marker (``boot_to_userspace``'s kdlab side), for
  256 and 1024 MiB guests; goal: ratio <= 0.25.
- ``checkpoint_save:MIB``: ``kdlabctl checkpoint save`` of the running VM,
  reported against the same cold boot (no goal).
"""

from __future__ import annotations

import time

from bench.boot import MARKER, marker_vm
from bench.lab import bench_daemon, ctl, layout, stop_vm, wait_in_file
from bench.measure import Goal, Row, interleaved, row
from tests.support import debian
from tests.support.daemon import Kdlabd

SIZES = (256, 1024)
RESTORES = 10  # the issue asks for the median of at least 10
SAVES = 5
SHELL_PROMPT = b"/ # "


def _cold_boot(daemon: Kdlabd, name: str) -> float:
    """Stop (untimed), then ``kdlabctl start`` until the marker: the VM is left
    running, so the next restore has a VM to restore into."""
    stop_vm(daemon, name)
    log = layout(daemon).console_log(name)
    began = time.perf_counter()
    ctl(daemon, "start", name)
    wait_in_file(log, MARKER.encode())
    took = time.perf_counter() - began
    wait_in_file(log, SHELL_PROMPT)
    return took


def _restore(daemon: Kdlabd, name: str) -> float:
    began = time.perf_counter()
    ctl(daemon, "checkpoint", "restore", "-q", name, "ready", timeout=600)
    return time.perf_counter() - began


def _save(daemon: Kdlabd, name: str, tag: str) -> float:
    began = time.perf_counter()
    ctl(daemon, "checkpoint", "save", "-q", name, tag, timeout=600)
    took = time.perf_counter() - began
    ctl(daemon, "checkpoint", "delete", name, tag)
    return took


def checkpoint_restore(quick: bool) -> list[Row]:
    """Restores and saves against cold boots of the same VM, 256 and 1024 MiB."""
    kernel = debian.cloud_kernel()
    initrd = debian.busybox_initramfs(MARKER)
    rows = []
    with bench_daemon() as daemon:
        for memory in SIZES:
            with marker_vm(daemon, kernel, initrd, "--memory", str(memory)) as name:
                _cold_boot(daemon, name)
                _save(daemon, name, "warmup")  # plugs in the state disk
                saves = [
                    _save(daemon, name, f"save{i}")
                    for i in range(2 if quick else SAVES)
                ]
                ctl(daemon, "checkpoint", "save", "-q", name, "ready", timeout=600)
                restores, cold = interleaved(
                    RESTORES,
                    lambda: _restore(daemon, name),
                    lambda: _cold_boot(daemon, name),
                    warmup=1,
                )
                stop_vm(daemon, name)
            what = f"Debian {kernel.release} + busybox initramfs, {memory} MiB"
            rows += [
                row(
                    f"checkpoint_restore:{memory}",
                    restores,
                    cold,
                    baseline="kdlabctl start of the same VM to the userspace marker",
                    unit="s",
                    goal=Goal("ratio <= 0.25", max_ratio=0.25),
                    note=f"{what}; the median of {RESTORES} restores to the shell, "
                    "in the same QEMU process",
                ),
                row(
                    f"checkpoint_save:{memory}",
                    saves,
                    cold,
                    baseline="kdlabctl start of the same VM to the userspace marker",
                    unit="s",
                    goal=Goal("none"),
                    note=f"{what}; the median of {len(saves)} saves",
                ),
            ]
    return rows
