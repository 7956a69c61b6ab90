"""kdlabd's post-mortem dumps on real QEMU, through its D-Bus objects.

Debian's cloud kernel (CONFIG_FW_CFG_SYSFS=m, CONFIG_PVPANIC_MMIO=m) boots the
tests' busybox initramfs with ``qemu_fw_cfg`` and ``pvpanic_mmio`` loaded from
it, as kdlab's module initramfs loads them (kdlabctl/initramfs.py): the guest
hands QEMU its VMCOREINFO, and tells it of a panic. ``rdinit=/exits`` loads
them and ends init, so the kernel panics with ``Attempted to kill init!``.

What is shown: one dump per panic within 60 s of it, owned by the VM's owner
(a real login user), complete, with the kernel's release and VMCOREINFO; the
VM then stopped (dump-and-stop) or paused (dump-and-keep); a dump of a
running VM on request in both formats (ELF and kdump-zlib, their VMCOREINFO
read by kdlab/kernel/vmcore.py) leaves it running; another user can neither
open nor delete a dump; and a kdlabd killed while a dump is written leaves no
partial volume once it is back. kdlabctl's dump commands are shown in
tests/vm/test_dumps.py.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Variant

from kdlab import wire
from kdlab.errors import NotAuthorized
from kdlab.kernel import vmcore
from tests.support import debian
from tests.support.bus import BusClient
from tests.support.clients import gdbus_error
from tests.support.logins import Logins
from tests.support.prereq import require
from tests.vm.conftest import MARKER, POOL_PREFIX, Lab, virsh
from tests.vm.test_lifecycle import wait_for_console

pytestmark = pytest.mark.vm

PANIC_SECONDS = 60  # the promise: a dump within 60 s of the panic
BOOT_SECONDS = 180  # TCG on a shared machine
DUMP_MODULES = ("qemu_fw_cfg", "pvpanic_mmio")
INIT_EXITS = "rdinit=/exits"
PANIC_LINE = "Attempted to kill init!"


@pytest.fixture(scope="module")
def initramfs(lab: Lab) -> Path:
    """The busybox initramfs that loads the dump modules of the cloud kernel."""
    try:
        return debian.busybox_initramfs(MARKER, lab.kernel, DUMP_MODULES)
    except debian.FixtureError as err:
        require(False, f"the dump modules of Debian's kernel: {err}")
        raise


def create(
    lab: Lab, name: str, initrd: Path, *args: str, memory_mib: int = 256
) -> None:
    """``kdlabctl create`` of Debian's kernel with *initrd*, and *args*."""
    created = lab.ctl(
        "create", name, "--kernel", str(lab.kernel.vmlinuz), "--initrd", str(initrd),
        "--memory", str(memory_mib), *args,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr


def vm_call(client: BusClient, name: str, member: str, *body: Any) -> list[Any]:
    signature = "a{sv}" if body else ""
    return client.ok(client.vm_path(name), wire.VM_INTERFACE, member, signature,
                     list(body))  # fmt: skip


def dumps_of(client: BusClient, name: str) -> dict[str, dict[str, Any]]:
    """The Dump objects of VM *name*: path -> properties."""
    return {
        path: interfaces[wire.DUMP_INTERFACE]
        for path, interfaces in client.managed_objects().items()
        if wire.DUMP_INTERFACE in interfaces
        and interfaces[wire.DUMP_INTERFACE]["VM"] == name
    }


def wait_for_panic_dump(
    lab: Lab, client: BusClient, name: str
) -> tuple[str, dict[str, Any]]:
    """The one dump of *name*'s panic: complete at most PANIC_SECONDS after the
    console showed the panic, and still the only one a while later."""
    wait_for_console(lab, name, PANIC_LINE, timeout=BOOT_SECONDS)
    deadline = time.monotonic() + PANIC_SECONDS
    while time.monotonic() < deadline:
        dumps = dumps_of(client, name)
        if any(d["State"] == wire.DUMP_STATE_COMPLETE for d in dumps.values()):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no complete dump of {name} {PANIC_SECONDS} s after")
    time.sleep(3)  # a second dump of the same panic (pvpanic and console) shows now
    (found,) = dumps_of(client, name).items()
    return found


def wait_for_state(client: BusClient, name: str, state: str) -> None:
    deadline = time.monotonic() + 60
    while client.vm_properties(name)["State"] != state:
        assert time.monotonic() < deadline, client.vm_properties(name)
        time.sleep(0.5)


def read_dump(client: BusClient, path: str) -> tuple[bytes, str | None, int]:
    """Open() as root: the file's first bytes, its VMCOREINFO and its size."""
    reply = client.call(path, wire.DUMP_INTERFACE, "Open")
    assert reply.error_name is None, reply.body
    (fd,) = reply.unix_fds
    try:
        info = vmcore.vmcoreinfo(lambda offset, size: os.pread(fd, size, offset))
        return os.pread(fd, 64, 0), info, os.fstat(fd).st_size
    finally:
        os.close(fd)


def assert_panic_dump(
    lab: Lab, client: BusClient, path: str, dump: dict[str, Any], owner: int
) -> None:
    assert dump["Owner"] == owner
    assert dump["State"] == wire.DUMP_STATE_COMPLETE
    assert dump["Reason"] == wire.DUMP_REASON_PANIC
    assert dump["KernelRelease"] == lab.kernel.release
    assert dump["Vmcoreinfo"] is True, dump["Problem"]
    assert dump["Problem"] == ""
    assert dump["Format"] == wire.DUMP_FORMAT_ELF
    head, info, size = read_dump(client, path)
    assert head.startswith(vmcore.ELF_MAGIC)
    assert info is not None
    assert vmcore.release(info) == lab.kernel.release
    assert dump["BuildId"] == vmcore.build_id(info) != ""
    assert dump["Size"] == size
    (headline,) = client.ok(path, wire.DUMP_INTERFACE, "GetHeadline")
    assert PANIC_LINE in headline


def test_a_panic_gives_one_dump_of_the_owners_which_others_cannot_open_or_delete(
    lab: Lab, initramfs: Path, client: BusClient, logins: Logins
) -> None:
    """alice's VM (dump-and-stop, the default) panics: one dump, hers, and the
    VM stopped; bob, in group kdlab too, can neither open nor delete it."""
    alice, bob = logins.alice, logins.bob
    name = f"vmt-{os.urandom(4).hex()}"
    created = logins.kdlabctl(
        alice, lab.daemon.address, "create", name,
        "--kernel", str(lab.kernel.vmlinuz),
        "--initrd", str(initramfs),
        "--memory", "256",
        "--cmdline", INIT_EXITS,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    try:
        started = logins.kdlabctl(alice, lab.daemon.address, "start", name)
        assert started.returncode == 0, started.stderr
        path, dump = wait_for_panic_dump(lab, client, name)
        assert_panic_dump(lab, client, path, dump, alice.uid)
        wait_for_state(client, name, "stopped")
        assert client.vm_properties(name)["LatestDump"] == path

        for member in ("Open", "GetHeadline", "Delete"):
            command = shlex.join(
                ["gdbus", "call", "--address", lab.daemon.address,
                 "--dest", wire.BUS_NAME, "--object-path", path,
                 "--method", f"{wire.DUMP_INTERFACE}.{member}"]
            )  # fmt: skip
            error, message = gdbus_error(logins.run(bob, command))
            assert error == NotAuthorized.dbus_name(), (member, message)
        assert path in dumps_of(client, name)
    finally:
        logins.kdlabctl(alice, lab.daemon.address, "delete", "--force", name)


def test_dump_and_keep_leaves_the_vm_paused(
    lab: Lab, initramfs: Path, client: BusClient, vm_name: str
) -> None:
    create(lab, vm_name, initramfs, "--cmdline", INIT_EXITS,
           "--on-panic", "dump-and-keep")  # fmt: skip
    assert client.vm_properties(vm_name)["OnPanic"] == wire.ON_PANIC_DUMP_AND_KEEP
    vm_call(client, vm_name, "Start", {})
    path, dump = wait_for_panic_dump(lab, client, vm_name)
    assert_panic_dump(lab, client, path, dump, 0)
    time.sleep(2)  # a stop after the dump would show by now
    assert client.vm_properties(vm_name)["State"] == "paused"


def take_dump(client: BusClient, name: str, compress: bool) -> str:
    """TakeDump; the dump's path once it is complete."""
    options = {"compress": Variant("b", compress)}
    path, _job = vm_call(client, name, "TakeDump", options)
    deadline = time.monotonic() + 300
    while True:
        state = dumps_of(client, name).get(path, {}).get("State")
        if state == wire.DUMP_STATE_COMPLETE:
            return str(path)
        assert state == wire.DUMP_STATE_WRITING, f"the dump {path} is gone"
        assert time.monotonic() < deadline
        time.sleep(0.5)


def pool_files(lab: Lab) -> set[str]:
    return {p.name for p in (lab.daemon.state_dir / "dumps").iterdir()}


def test_dumps_of_a_running_vm_in_both_formats_and_a_kill_while_one_is_written(
    lab: Lab, initramfs: Path, client: BusClient, vm_name: str
) -> None:
    """A running 1 GiB guest: TakeDump (ELF, then kdump-zlib) leaves it
    running, both carry its VMCOREINFO; then kdlabd is killed (SIGKILL) while
    a third dump is written: after its restart nothing of it is left."""
    create(lab, vm_name, initramfs, memory_mib=1024)
    vm_call(client, vm_name, "Start", {})
    wait_for_console(lab, vm_name, MARKER, timeout=BOOT_SECONDS)
    for compress, fmt, magic in (
        (False, wire.DUMP_FORMAT_ELF, vmcore.ELF_MAGIC),
        # QEMU 7.2 writes kdump-compressed dumps flattened; vmcore.py reads
        # the real kdump headers (offsets of QEMU's structs) through it.
        (True, wire.DUMP_FORMAT_KDUMP_ZLIB, vmcore.FLAT_SIGNATURE),
    ):
        path = take_dump(client, vm_name, compress)
        dump = dumps_of(client, vm_name)[path]
        assert (dump["Format"], dump["Reason"]) == (fmt, wire.DUMP_REASON_REQUESTED)
        assert client.vm_properties(vm_name)["State"] == "running"
        head, info, _size = read_dump(client, path)
        assert head.startswith(magic)
        assert info is not None, f"no VMCOREINFO in the {fmt} dump"
        assert vmcore.release(info) == lab.kernel.release
        assert dump["Vmcoreinfo"] is True

    complete = pool_files(lab)
    options = {"compress": Variant("b", False)}
    path, _job = vm_call(client, vm_name, "TakeDump", options)
    volume = f"{dumps_of(client, vm_name)[path]['Id']}.core"
    deadline = time.monotonic() + 30
    while volume not in pool_files(lab):
        assert time.monotonic() < deadline, "libvirt never created the dump's file"
        time.sleep(0.01)
    written = (lab.daemon.state_dir / "dumps" / volume).stat().st_size
    lab.daemon.kill()
    assert written < 1024 << 20, "the dump was complete before kdlabd was killed"
    assert f"{volume.removesuffix('.core')}.json" not in pool_files(lab)
    lab.daemon.start()
    assert pool_files(lab) == complete
    assert path not in dumps_of(client, vm_name)
    listed = virsh("vol-list", f"{POOL_PREFIX}-dumps")
    assert listed.returncode == 0, listed.stderr
    assert volume not in listed.stdout
    # QEMU stops the guest while it dumps, then lets it run again.
    wait_for_state(client, vm_name, "running")
