"""``time_to_breakpoint``: a paused start, then gdb until ``start_kernel`` is hit.

kdlab's way: ``kdlabctl start --paused`` and ``kdlabctl gdb NAME --batch -ex
'hbreak start_kernel' -ex continue`` (gdb reaches the stub through
``kdlabctl gdb-proxy`` and a descriptor from kdlabd). The baseline: ``virsh
start --paused`` of the same domain and plain gdb on the stub's unix socket
(root may enter its directory), with the same Debian vmlinux (590 MB of DWARF).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.boot import MARKER, VIRSH, marker_vm
from bench.lab import (
    BenchError,
    bench_daemon,
    layout,
    run,
    stop_vm,
    wait_inactive,
)
from bench.measure import Goal, Laps, Row, interleaved, row
from tests.support import debian
from tests.support.clients import ctl_env
from tests.support.daemon import Kdlabd
from tests.support.system import virsh

GDB_COMMANDS = ("-ex", "hbreak start_kernel", "-ex", "continue")
HIT = "start_kernel () at"
GDB_TIMEOUT = 120.0


def _until_hit(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run gdb until its output shows the breakpoint hit; then let it detach."""
    gdb = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert gdb.stdout is not None
    seen = []
    try:
        for line in gdb.stdout:
            seen.append(line)
            if HIT in line:
                return
        raise BenchError(f"gdb ended before {HIT!r}:\n{''.join(seen)[-2000:]}")
    finally:
        try:
            gdb.wait(timeout=GDB_TIMEOUT)
        except subprocess.TimeoutExpired:
            gdb.kill()
            gdb.wait()


def _timed_break(
    who: str,
    start: list[str],
    gdb: list[str],
    laps: Laps,
    env: dict[str, str] | None = None,
) -> float:
    """Seconds from the paused start to the hit; *who*'s two parts go to *laps*."""
    began = time.perf_counter()
    run(start)
    started = time.perf_counter()
    laps.add(f"{who} start", started - began)
    _until_hit(gdb, env)
    hit = time.perf_counter()
    laps.add(f"{who} gdb to the hit", hit - started)
    return hit - began


def _kdlab(daemon: Kdlabd, name: str, laps: Laps) -> float:
    wait_inactive(daemon, name)
    kdlabctl = [sys.executable, "-m", "kdlabctl"]
    took = _timed_break(
        "kdlabctl",
        [*kdlabctl, "--bus", daemon.address, "start", "--paused", name],
        [*kdlabctl, "--bus", daemon.address, "gdb", name, "--batch", *GDB_COMMANDS],
        laps,
        ctl_env(daemon.address),
    )
    stop_vm(daemon, name)
    return took


def _plain(domain: str, socket: Path, vmlinux: Path, laps: Laps) -> float:
    gdb = ["gdb", "-q", "-batch", "-ex", f"target remote {socket}", *GDB_COMMANDS]
    took = _timed_break(
        "virsh", [*VIRSH, "start", "--paused", domain], [*gdb, str(vmlinux)], laps
    )
    virsh("destroy", domain)
    return took


def time_to_breakpoint(quick: bool) -> list[Row]:
    """A paused start and gdb to ``start_kernel``: kdlabctl vs virsh + plain gdb."""
    kernel = debian.cloud_kernel()
    vmlinux = debian.cloud_kernel_vmlinux(kernel)
    initrd = debian.busybox_initramfs(MARKER)
    laps = Laps()
    with (
        bench_daemon() as daemon,
        marker_vm(daemon, kernel, initrd, "--vmlinux", str(vmlinux)) as name,
    ):
        socket = layout(daemon).gdb_socket(name)
        # The first round (kdlab first: kdlabd makes the socket's directory)
        # reads the vmlinux into the page cache; it is not counted.
        ours, theirs = interleaved(
            3 if quick else 7,
            lambda: _kdlab(daemon, name, laps),
            lambda: _plain(f"kdlab-{name}", socket, vmlinux, laps),
            warmup=1,
        )
    return [
        row(
            "time_to_breakpoint",
            ours,
            theirs,
            baseline="virsh start --paused + gdb on the socket",
            unit="s",
            goal=Goal("ratio <= 1.2", max_ratio=1.2),
            note=laps.note(
                "kdlabctl start",
                "virsh start",
                "kdlabctl gdb to the hit",
                "virsh gdb to the hit",
            ),
        )
    ]
