"""What the benchmarks share: a kdlabd of their own, kdlabctl, VMs, scratch files.

Everything a benchmark makes is removed when it ends, whether it succeeds or
fails: its VMs and images (through kdlabd, then through virsh if kdlabd could
not), kdlabd's pools, its bus and its directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from kdlab.wire import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH
from kdlabd.core.vms import Layout
from tests.support.clients import kdlabctl
from tests.support.daemon import Kdlabd, processes_with
from tests.support.system import (
    remove_domain,
    remove_pools,
    remove_vm,
    system_kdlabd,
    virsh,
)

BENCH_POOLS = "kdlab-bench"
BENCH_IMAGES = f"{BENCH_POOLS}-images"  # the bench kdlabd's pool of images
# The domains of bench_vm ("kdlab-bench-...") and of hand-written baselines.
BENCH_DOMAINS = ("kdlab-bench-", "bench-raw-")
CTL_TIMEOUT = 900.0
INACTIVE = ("defined", "stopped", "crashed")


class BenchError(RuntimeError):
    """A step of a benchmark failed; the message says which and why."""


def run(command: Sequence[str], timeout: float = CTL_TIMEOUT) -> str:
    """Run *command*; its standard output, or :class:`BenchError` with its error."""
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise BenchError(
            f"{shlex.join(command)} exited {done.returncode}: {done.stderr[-2000:]}"
        )
    return done.stdout


def ctl(daemon: Kdlabd, *args: str, timeout: float = CTL_TIMEOUT) -> str:
    """``kdlabctl ARGS`` on the bench kdlabd; its output, or :class:`BenchError`."""
    done = kdlabctl(daemon.address, *args, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(
            f"kdlabctl {shlex.join(args)} exited {done.returncode}: {done.stderr}"
        )
    return done.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def layout(daemon: Kdlabd) -> Layout:
    """Where the bench kdlabd keeps console logs and gdb sockets."""
    return Layout(daemon.state_dir, daemon.runtime_dir)


@contextlib.contextmanager
def scratch(prefix: str = "kdlab-bench-") -> Iterator[Path]:
    """A directory QEMU (another user) can traverse to, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def bench_daemon(pool_prefix: str = BENCH_POOLS) -> Iterator[Kdlabd]:
    """kdlabd on the system libvirtd, on a private bus (system_kdlabd).

    It accelerates its VMs as kdlabd does by default (``auto``: KVM where
    libvirt and the host offer it, TCG otherwise; see :func:`accel`).
    system_kdlabd skips its own clean-up when kdlabd does not stop in time:
    the pools, the bus and the directories are then removed here. Domains and
    pools a killed run left behind are removed first.
    """
    _remove_domains(BENCH_DOMAINS)
    remove_pools(pool_prefix)
    root: Path | None = None
    try:
        with system_kdlabd(pool_prefix, accel="auto") as daemon:
            root = daemon.state_dir.parent
            yield daemon
    finally:
        remove_pools(pool_prefix)
        if root is not None:
            _kill_bus_of(root)
            shutil.rmtree(root, ignore_errors=True)


def accel(daemon: Kdlabd) -> str:
    """``kvm`` or ``tcg``: how *daemon* accelerates its VMs, as it chose it
    (its Manager's Accel property)."""
    reply = run(
        [
            "busctl",
            f"--address={daemon.address}",
            "get-property",
            BUS_NAME,
            MANAGER_PATH,
            MANAGER_INTERFACE,
            "Accel",
        ]
    )
    kind, _, value = reply.strip().partition(" ")
    if kind != "s":
        raise BenchError(f"Manager.Accel is not a string: {reply!r}")
    return str(json.loads(value))


def detect_accel() -> str:
    """How kdlabd accelerates VMs on this machine (a bench kdlabd is asked)."""
    with bench_daemon("kdlab-bench-accel") as daemon:
        return accel(daemon)


def _remove_domains(prefixes: tuple[str, ...]) -> None:
    listed = virsh("list", "--all", "--name").stdout.split()
    for domain in (name for name in listed if name.startswith(prefixes)):
        remove_domain(domain)


def _kill_bus_of(root: Path) -> None:
    """Kill the dbus-daemon whose configuration lies in *root* (ours), if it runs."""
    for process in processes_with(f"--config-file={root / 'bus' / 'bus.conf'}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(process.split()[0]), signal.SIGKILL)


@contextlib.contextmanager
def bench_vm(daemon: Kdlabd, *create_args: str, prefix: str = "bench") -> Iterator[str]:
    """A new kdlab VM (``kdlabctl create NAME ARGS``), deleted afterwards."""
    name = unique(prefix)
    try:
        ctl(daemon, "create", name, "--quiet", *create_args)
        yield name
    finally:
        remove_vm(daemon, name)


def build_image(daemon: Kdlabd, name: str, size: str = "1G", *more: str) -> None:
    """``kdlabctl image build NAME [MORE...]``: Debian bookworm, as the README
    shows."""
    ctl(
        daemon,
        "image",
        "build",
        name,
        "--debootstrap",
        "bookworm",
        "--size",
        size,
        "--quiet",
        *more,
    )


@contextlib.contextmanager
def bench_image(daemon: Kdlabd, size: str = "1G", *more: str) -> Iterator[str]:
    """An image built by kdlabd (from its cached base, for the same *more*
    options of ``image build``), deleted afterwards."""
    name = unique("bench-img")
    try:
        build_image(daemon, name, size, *more)
        yield name
    finally:
        kdlabctl(daemon.address, "image", "delete", name)


def stop_vm(daemon: Kdlabd, name: str) -> None:
    """Pull the plug of a running VM (a no-op on a stopped one)."""
    kdlabctl(daemon.address, "stop", "--force", name)


def wait_in_file(path: Path, text: bytes, timeout: float = 300) -> None:
    """Poll *path* (re-opened: each boot starts a new log) until it holds *text*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if text in path.read_bytes():
                return
        time.sleep(0.005)
    raise BenchError(f"{text!r} not in {path} after {timeout} s")


def wait_inactive(daemon: Kdlabd, name: str, timeout: float = 30) -> None:
    """Until kdlabd shows *name* stopped: after ``virsh destroy`` its view may lag."""
    deadline = time.monotonic() + timeout
    while json.loads(ctl(daemon, "show", name, "--json"))["state"] not in INACTIVE:
        if time.monotonic() > deadline:
            raise BenchError(f"kdlabd still shows {name} active after {timeout} s")
        time.sleep(0.05)
