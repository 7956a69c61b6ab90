"""``dump_take``: a memory dump of a running 512 MiB guest, kdlab against virsh.

kdlab's way: the VM's ``TakeDump`` (what ``kdlabctl dump take`` calls), timed
from the call until kdlabd announces the Dump ``complete`` (its
PropertiesChanged signal): libvirt's
memory-only dump into kdlabd's dumps pool, then kdlabd reading its
VMCOREINFO and writing its sidecar. The baseline, by hand: ``virsh dump
--memory-only`` of the same domain, in the same state (running, the
guest's shell idle), into a file on the same filesystem. Each dump is
deleted after it is timed. The guest is Debian's cloud kernel with the
busybox initramfs that loads ``qemu_fw_cfg`` (both dumps carry VMCOREINFO).
"""

from __future__ import annotations

import time
from pathlib import Path

from dbus_next import Variant

from bench.boot import MARKER, VIRSH
from bench.lab import (
    BenchError,
    bench_daemon,
    bench_vm,
    ctl,
    layout,
    run,
    scratch,
    wait_in_file,
)
from bench.measure import Goal, Row, interleaved, row
from kdlab import wire
from tests.support import debian
from tests.support.bus import BusClient

MEMORY_MIB = 512
DUMP_MODULES = ("qemu_fw_cfg",)
DUMP_TIMEOUT = 600.0


def _completed(client: BusClient, dump: str) -> bool:
    """Whether kdlabd announced *dump* complete (PropertiesChanged)."""
    return any(
        msg.path == dump
        and msg.member == "PropertiesChanged"
        and msg.body[1].get("State", Variant("s", "")).value == wire.DUMP_STATE_COMPLETE
        for msg in client.signals
    )


def _kdlab_dump(client: BusClient, vm: str) -> float:
    """TakeDump until kdlabd announces the dump complete (a signal: polling
    would load kdlabd while it dumps); the dump is deleted afterwards."""
    options = {"compress": Variant("b", False)}
    client.signals.clear()
    started = time.perf_counter()
    dump, _job = client.ok(vm, wire.VM_INTERFACE, "TakeDump", "a{sv}", [options])
    try:
        client.wait_until(lambda: _completed(client, dump), timeout=DUMP_TIMEOUT)
    except AssertionError as err:
        raise BenchError(f"the dump {dump} did not complete: {err}") from None
    elapsed = time.perf_counter() - started
    client.ok(dump, wire.DUMP_INTERFACE, "Delete")
    return elapsed


def _virsh_dump(domain: str, directory: Path) -> float:
    target = directory / "vmcore"
    started = time.perf_counter()
    run([*VIRSH, "dump", "--memory-only", domain, str(target)])
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def dump_take(quick: bool) -> list[Row]:
    """kdlab's TakeDump of a running guest against ``virsh dump --memory-only``."""
    kernel = debian.cloud_kernel()
    initrd = debian.busybox_initramfs(MARKER, kernel, DUMP_MODULES)
    create = ("--kernel", str(kernel.vmlinuz), "--initrd", str(initrd))
    with (
        bench_daemon() as daemon,
        bench_vm(daemon, *create, "--memory", str(MEMORY_MIB)) as name,
        scratch() as directory,
    ):
        ctl(daemon, "start", name)
        wait_in_file(layout(daemon).console_log(name), MARKER.encode())
        client = BusClient(daemon.address)
        client.add_match(
            type="signal",
            interface="org.freedesktop.DBus.Properties",
            member="PropertiesChanged",
            path_namespace=f"{wire.MANAGER_PATH}/dump",
        )
        try:
            vm = client.vm_path(name)
            ours, theirs = interleaved(
                3 if quick else 9,
                lambda: _kdlab_dump(client, vm),
                lambda: _virsh_dump(f"kdlab-{name}", directory),
                warmup=1,
            )
        finally:
            client.close()
    return [
        row(
            "dump_take",
            ours,
            theirs,
            baseline="virsh dump --memory-only",
            unit="s",
            goal=Goal("ratio <= 1.10", max_ratio=1.10),
            note=f"running guest, {MEMORY_MIB} MiB, Debian {kernel.release}, "
            "ELF; kdlab until its Dump object is complete",
        )
    ]
