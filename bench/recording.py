"""Record/replay benchmarks: what recording costs a boot, and how fast gdb goes
back one instruction in a replay.

- ``record_overhead``: ``kdlabctl record`` of a VM (Debian's cloud kernel,
  the busybox initramfs) until the userspace marker, against ``kdlabctl
  start`` of the same VM to the same marker, interleaved; the VM is stopped
  and the recording deleted between runs. No goal: the ratio is what QEMU's
  record mode (instruction counting, the event log) costs.
- ``reverse_step_latency``: a recorded boot to the marker is replayed under
  ``kdlabctl gdb`` to a hardware breakpoint on ``run_init_process`` (the
  kernel starting the initramfs's /init, the end of the kernel's boot); then
  one ``reverse-stepi`` is timed (each followed by a ``stepi`` back), with
  kdlabd's periodic snapshots (``--snapshot-interval 1``: QEMU goes back from
  the last one) against without (``--snapshot-interval 0``: QEMU replays from
  the recording's start). Goal: <= 1 s with snapshots, absolute.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from bench.boot import MARKER, MEMORY_MIB, kdlab_boot, marker_vm, timed_boot
from bench.debug import wait_warmed
from bench.lab import (
    BenchError,
    accel,
    bench_daemon,
    ctl,
    layout,
    stop_vm,
    wait_inactive,
)
from bench.measure import Goal, Laps, Row, interleaved, row
from kdlab import wire
from kdlabd.core.recordings import auto_snapshots
from tests.support import debian
from tests.support.clients import ctl_env, read_until
from tests.support.daemon import Kdlabd
from tests.support.system import virsh

BREAKPOINT = "run_init_process"
COMPLETE_TIMEOUT = 120.0
GDB_TIMEOUT = 300.0
STEPS = 3  # reverse-stepi timed in each replay
REPLAYS = 2  # replays of each kind (with and without snapshots)
BOOTS = 5


def _tcg(daemon: Kdlabd) -> str:
    """The bench kdlabd's accelerator, which must be TCG: QEMU records only TCG."""
    accelerator = accel(daemon)
    if accelerator != "tcg":
        raise BenchError(f"kdlabd runs VMs under {accelerator}: QEMU records TCG only")
    return accelerator


def _wait_complete(daemon: Kdlabd, name: str, recording: str) -> None:
    """Until kdlabd has finished *recording* (the VM stopped: sidecar written)."""
    deadline = time.monotonic() + COMPLETE_TIMEOUT
    while time.monotonic() < deadline:
        listed = json.loads(ctl(daemon, "recording", "list", name, "--json"))
        states = [r["state"] for r in listed if r["id"] == recording]
        if states == [wire.RECORDING_STATE_COMPLETE]:
            return
        time.sleep(0.2)
    raise BenchError(f"recording {recording} not complete {COMPLETE_TIMEOUT} s on")


def _record_to_marker(daemon: Kdlabd, name: str, recording: str, laps: Laps) -> float:
    """``kdlabctl record`` until the marker; then (untimed) the VM stopped and
    the recording complete."""
    wait_inactive(daemon, name)
    took = timed_boot(
        lambda: ctl(daemon, "record", "-q", "--as", recording, name),
        lambda: stop_vm(daemon, name),
        log=layout(daemon).console_log(name),
        marker=MARKER,
        laps=laps,
        lap="kdlabctl record",
    )
    _wait_complete(daemon, name, recording)
    return took


def _recorded_boot(daemon: Kdlabd, name: str, ids: Iterator[int], laps: Laps) -> float:
    recording = f"{name}-{next(ids)}"
    took = _record_to_marker(daemon, name, recording, laps)
    ctl(daemon, "recording", "delete", recording)
    return took


def record_overhead(quick: bool) -> list[Row]:
    """A recorded boot to the userspace marker against an unrecorded one."""
    kernel = debian.cloud_kernel()
    initrd = debian.busybox_initramfs(MARKER)
    laps = Laps()
    ids = itertools.count()
    with bench_daemon() as daemon, marker_vm(daemon, kernel, initrd) as name:
        accelerator = _tcg(daemon)
        recorded, plain = interleaved(
            3 if quick else BOOTS,
            lambda: _recorded_boot(daemon, name, ids, laps),
            lambda: kdlab_boot(daemon, name, MARKER, laps),
            warmup=1,
        )
    return [
        row(
            "record_overhead",
            recorded,
            plain,
            baseline="kdlabctl start of the same VM to the userspace marker",
            unit="s",
            goal=Goal("none"),
            note=f"Debian {kernel.release} + busybox initramfs, "
            f"{accelerator.upper()}, {MEMORY_MIB} MiB; "
            + laps.note("kdlabctl record", "kdlabctl start"),
        )
    ]


class _Gdb:
    """``kdlabctl gdb NAME`` reading commands from a pipe."""

    def __init__(self, daemon: Kdlabd, name: str) -> None:
        self._gdb = subprocess.Popen(
            [sys.executable, "-m", "kdlabctl", "gdb", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=ctl_env(daemon.address),
        )

    def send(self, commands: str, until: str) -> str:
        """Send *commands*; gdb's output until *until* comes."""
        assert self._gdb.stdin is not None
        assert self._gdb.stdout is not None
        self._gdb.stdin.write(commands.encode())
        self._gdb.stdin.flush()
        try:
            return read_until(self._gdb.stdout.fileno(), until, GDB_TIMEOUT)
        except AssertionError as err:
            raise BenchError(f"gdb: {err}") from None

    def timed(self, command: str) -> float:
        """Seconds *command* takes (until gdb runs the next one)."""
        began = time.perf_counter()
        self.send(f"{command}\necho DONE-{command}\\n\n", f"DONE-{command}")
        return time.perf_counter() - began

    def pc(self) -> str:
        answer = self.send("p/x $pc\necho PC-END\\n\n", "PC-END")
        return str(re.findall(r"= (0x[0-9a-f]+)", answer)[-1])

    def close(self) -> None:
        self._gdb.kill()
        self._gdb.wait()


def _reverse_steps(
    daemon: Kdlabd, name: str, recording: str, interval: int, laps: Laps
) -> list[float]:
    """Replay *recording* (snapshots every *interval* s) under gdb to the
    breakpoint; the seconds of STEPS reverse-stepi there."""
    wait_inactive(daemon, name)
    ctl(daemon, "replay", "-q", "--snapshot-interval", str(interval), name, recording)
    kind = "with" if interval else "without"
    gdb = _Gdb(daemon, name)
    try:
        gdb.send(f"hbreak {BREAKPOINT}\n", "Hardware assisted breakpoint 1")
        laps.add(f"to {BREAKPOINT} {kind}", gdb.timed("continue"))
        at = gdb.pc()
        taken = auto_snapshots(
            virsh(
                "qemu-monitor-command", f"kdlab-{name}", "--hmp", "info snapshots"
            ).stdout
        )
        laps.add(f"snapshots {kind}", len(taken))
        steps = []
        for _ in range(STEPS):
            steps.append(gdb.timed("reverse-stepi"))
            back = gdb.pc()
            laps.add(f"stepi {kind}", gdb.timed("stepi"))
            if back == at or gdb.pc() != at:
                raise BenchError(f"reverse-stepi at {at} went to {back}, not back")
        return steps
    finally:
        gdb.close()
        stop_vm(daemon, name)


def _replay(
    daemon: Kdlabd, name: str, recording: str, interval: int, laps: Laps
) -> Callable[[], float]:
    """One replay's reverse steps (kept in *laps*); their median."""

    def contender() -> float:
        steps = _reverse_steps(daemon, name, recording, interval, laps)
        for step in steps:
            laps.add(f"reverse-stepi {interval}", step)
        return statistics.median(steps)

    return contender


def reverse_step_latency(quick: bool) -> list[Row]:
    """reverse-stepi ~the end of a replayed boot, with kdlabd's snapshots and
    without."""
    kernel = debian.cloud_kernel()
    vmlinux = debian.cloud_kernel_vmlinux(kernel)
    initrd = debian.busybox_initramfs(MARKER)
    laps = Laps()
    with (
        bench_daemon() as daemon,
        marker_vm(daemon, kernel, initrd, "--vmlinux", str(vmlinux)) as name,
    ):
        _tcg(daemon)
        wait_warmed(vmlinux)
        recording = f"{name}-boot"
        recorded = _record_to_marker(daemon, name, recording, laps)
        interleaved(
            1 if quick else REPLAYS,
            _replay(daemon, name, recording, 1, laps),
            _replay(daemon, name, recording, 0, laps),
        )
    with_snapshots = laps.values("reverse-stepi 1")
    without = laps.values("reverse-stepi 0")
    return [
        row(
            "reverse_step_latency",
            with_snapshots,
            without,
            baseline="the same reverse-stepi without kdlabd's snapshots "
            "(--snapshot-interval 0: QEMU replays from the start)",
            unit="s",
            goal=Goal("<= 1 s", max_value=1.0),
            note=f"Debian {kernel.release} + busybox initramfs, TCG, {MEMORY_MIB} "
            f"MiB; recorded boot to the marker {recorded:.2f} s; at {BREAKPOINT}, "
            f"reached in the replay in {laps.median(f'to {BREAKPOINT} without'):.2f} s "
            f"without snapshots, {laps.median(f'to {BREAKPOINT} with'):.2f} s with "
            f"{laps.median('snapshots with'):.0f} taken (--snapshot-interval 1); "
            f"stepi {laps.median('stepi with'):.3f} s",
        )
    ]
