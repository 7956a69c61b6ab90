"""``time_to_breakpoint``: a paused start, then gdb until ``start_kernel`` is hit
and the kernel's release printed.

kdlab's way: ``kdlabctl start --paused --attach NAME -- --batch -ex 'hbreak
start_kernel' -ex continue -ex 'p init_uts_ns.name.release'`` (the one-step
command the README shows; ``start --paused`` then ``kdlabctl gdb`` is a row of
its own): gdb connects to kdlabctl, which relays the stub's descriptor from
kdlabd, and reads the symbols through the caller's gdb index cache, which
``kdlabctl create`` warmed. The baseline, by hand: ``virsh start --paused`` of the same
domain and plain gdb with the same Debian vmlinux (590 MB of DWARF) on the
stub's unix socket (root may enter its directory). The cold row is kdlab with
an empty index cache each time: what the first attach costs when nothing
warmed it (gdb then indexes the DWARF and writes the index).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from bench.measure import INFO, Goal, Laps, Row, interleaved, row
from kdlabctl import gdbcache
from tests.support import debian, sshhost
from tests.support.clients import cache_home, ctl_env
from tests.support.daemon import Kdlabd
from tests.support.system import virsh

GDB_COMMANDS = (
    ("-ex", "hbreak start_kernel"),
    ("-ex", "continue"),
    ("-ex", "p init_uts_ns.name.release"),
)
GDB_TIMEOUT = 120.0
WARMUP_TIMEOUT = 300.0


def _gdb_commands() -> list[str]:
    return [word for pair in GDB_COMMANDS for word in pair]


def _until_printed(
    command: list[str], release: str, env: dict[str, str] | None = None
) -> None:
    """Run gdb until its output shows *release* (printed at the breakpoint)."""
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
    printed = f'"{release}"'
    try:
        for line in gdb.stdout:
            seen.append(line)
            if printed in line and "start_kernel" in "".join(seen):
                return
        raise BenchError(f"gdb ended before {printed}:\n{''.join(seen)[-2000:]}")
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
    release: str,
    laps: Laps,
    *,
    env: dict[str, str] | None = None,
) -> float:
    """Seconds from the paused start to the release printed; *who*'s two parts
    go to *laps*."""
    began = time.perf_counter()
    run(start)
    started = time.perf_counter()
    laps.add(f"{who} start", started - began)
    _until_printed(gdb, release, env)
    hit = time.perf_counter()
    laps.add(f"{who} gdb to the release", hit - started)
    return hit - began


def _kdlab(
    daemon: Kdlabd,
    name: str,
    release: str,
    laps: Laps,
    *,
    one_step: bool,
    cold: bool,
    via: Via | None = None,
) -> float:
    """kdlabctl's way: ``start --paused --attach`` (*one_step*) or ``start
    --paused`` then ``gdb``; with the index cache create warmed, or (*cold*)
    an empty one; *via* another host when given."""
    wait_inactive(daemon, name)
    kdlabctl = [sys.executable, "-m", "kdlabctl", "--bus", daemon.address]
    gdb_args = ["--batch", *_gdb_commands()]
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-cache-") as empty:
        env = ctl_env(daemon.address)
        if via is not None:
            kdlabctl = [*via.within, *kdlabctl, *via.host]
            env.update(via.env)
        if cold:
            env["XDG_CACHE_HOME"] = empty
        if one_step:
            began = time.perf_counter()
            attach = [*kdlabctl, "start", "--paused", "--attach", name, "--"]
            _until_printed([*attach, *gdb_args], release, env)
            took = time.perf_counter() - began
            laps.add("start --attach" + (" cold" if cold else ""), took)
        else:
            took = _timed_break(
                "kdlabctl",
                [*kdlabctl, "start", "--paused", name],
                [*kdlabctl, "gdb", name, *gdb_args],
                release,
                laps,
                env=env,
            )
    stop_vm(daemon, name)
    return took


@dataclass(frozen=True)
class Via:
    """How kdlabctl runs: in a network namespace (*within*), with options
    (*host*: ``--host NAME``) and environment (hosts.toml's) of its own."""

    within: list[str]
    host: list[str]
    env: dict[str, str]


def _plain(domain: str, socket: Path, vmlinux: Path, release: str, laps: Laps) -> float:
    gdb = ["gdb", "-q", "-batch", "-ex", f"target remote {socket}", *_gdb_commands()]
    took = _timed_break(
        "virsh",
        [*VIRSH, "start", "--paused", domain],
        [*gdb, str(vmlinux)],
        release,
        laps,
    )
    virsh("destroy", domain)
    return took


def wait_warmed(vmlinux: Path) -> None:
    """Wait for the warmup ``kdlabctl create`` started (in the clients' cache)."""
    build = gdbcache.read_build_id(vmlinux)
    cache = gdbcache.open_cache(env={"XDG_CACHE_HOME": str(cache_home())})
    if not cache.wait(build, WARMUP_TIMEOUT) or not cache.index(build).exists():
        raise BenchError(f"kdlabctl create left no gdb index of {vmlinux}")


@contextlib.contextmanager
def debug_vm(daemon: Kdlabd) -> Iterator[tuple[str, Path]]:
    """A VM of Debian's cloud kernel with its debug vmlinux, whose gdb index
    ``kdlabctl create`` warmed: its name and the vmlinux."""
    kernel = debian.cloud_kernel()
    vmlinux = debian.cloud_kernel_vmlinux(kernel)
    initrd = debian.busybox_initramfs(MARKER)
    with marker_vm(daemon, kernel, initrd, "--vmlinux", str(vmlinux)) as name:
        wait_warmed(vmlinux)
        yield name, vmlinux


def time_to_breakpoint(quick: bool) -> list[Row]:
    """A paused start and gdb to ``start_kernel`` and the release: kdlabctl
    (warm and cold index cache) vs virsh + plain gdb."""
    release = debian.cloud_kernel().release
    laps = Laps()
    with bench_daemon() as daemon, debug_vm(daemon) as (name, vmlinux):
        socket = layout(daemon).gdb_socket(name)
        # The first round (kdlab first: kdlabd makes the socket's directory)
        # reads the vmlinux into the page cache; it is not counted.
        ours, theirs, two_steps, cold = interleaved(
            3 if quick else 7,
            lambda: _kdlab(daemon, name, release, laps, one_step=True, cold=False),
            lambda: _plain(f"kdlab-{name}", socket, vmlinux, release, laps),
            lambda: _kdlab(daemon, name, release, laps, one_step=False, cold=False),
            lambda: _kdlab(daemon, name, release, laps, one_step=True, cold=True),
            warmup=1,
        )
    baseline = "virsh start --paused + plain gdb vmlinux on the socket"
    return [
        row(
            "time_to_breakpoint",
            ours,
            theirs,
            baseline=baseline,
            unit="s",
            goal=Goal("ratio <= 0.8", max_ratio=0.8),
            note="kdlabctl start --paused --attach NAME -- --batch -ex ...; "
            + laps.note("virsh start", "virsh gdb to the release"),
        ),
        row(
            "time_to_breakpoint:two_commands",
            two_steps,
            theirs,
            baseline=baseline,
            unit="s",
            goal=INFO,
            note="kdlabctl start --paused, then kdlabctl gdb: "
            + laps.note("kdlabctl start", "kdlabctl gdb to the release"),
        ),
        row(
            "time_to_breakpoint:cold_cache",
            cold,
            theirs,
            baseline=baseline,
            unit="s",
            goal=INFO,
            note="start --attach with an empty gdb index cache (gdb loads "
            "without it; a warmup writes it beside)",
        ),
    ]


def remote_time_to_breakpoint(quick: bool) -> list[Row]:
    """``time_to_breakpoint``'s one-step command through ``--host`` (ssh on
    loopback to an sshd of the bench's own, in a network namespace, as root
    to root) against the same command on this machine, both run in that
    namespace, on the same VM and index cache."""
    release = debian.cloud_kernel().release
    laps = Laps()
    with (
        sshhost.ssh_host() as host,
        bench_daemon() as daemon,
        debug_vm(daemon) as (name, _),
    ):
        login = host.login(None, None)
        host.name(None, "bench", login, daemon.address)
        unshared = ("-o", "ControlMaster=no")
        host.name(None, "cold", login, daemon.address, ssh_options=unshared)
        here = Via(host.within, [], {})
        there = Via(host.within, ["--host", "bench"], host.root_env())
        cold = Via(host.within, ["--host", "cold"], host.root_env())

        def attach(via: Via) -> Callable[[], float]:
            return lambda: _kdlab(
                daemon, name, release, laps, one_step=True, cold=False, via=via
            )

        ours, theirs, new_ssh = interleaved(
            3 if quick else 7, attach(there), attach(here), attach(cold), warmup=1
        )
    return [
        row(
            "remote_time_to_breakpoint",
            ours,
            theirs,
            baseline="the same kdlabctl start --paused --attach on this machine",
            unit="s",
            goal=Goal("ratio <= 1.3", max_ratio=1.3),
            note="kdlabctl --host HOST start --paused --attach NAME -- --batch "
            "-ex ...: ssh to 127.0.0.1 (a network namespace's sshd) on the "
            "connection the warmup left (kdlabctl's ControlMaster default), the "
            "bus and the gdbstub's stream relayed by kdlabctl's bridge",
        ),
        row(
            "remote_time_to_breakpoint:new_ssh",
            new_ssh,
            theirs,
            baseline="the same kdlabctl start --paused --attach on this machine",
            unit="s",
            goal=INFO,
            note="the same with a new ssh connection each time (ControlMaster=no)",
        ),
    ]
