"""Post-mortem dumps end to end: a real panic, kdlabd's dump, drgn and crash.

Two kernels, two panics each:

- kdlab's ``--minimal`` kernel built from Debian's linux-source tree
  (everything built in) with the busybox initramfs: ``rdinit=/bin/busybox``
  runs busybox without an applet, which prints its help and exits (the
  kernel panics: ``Attempted to kill init!``); or its shell, where
  ``echo c > /proc/sysrq-trigger`` is typed on the console;
- Debian's cloud kernel booted through kdlab's module initramfs (which loads
  ``qemu_fw_cfg`` and ``pvpanic_mmio``) on a small ext4 disk whose init
  exits, or runs a shell for the sysrq.

Each panic gives exactly one automatic dump; ``kdlabctl drgn NAME SCRIPT``
prints the guest's ``init_uts_ns.name.release`` and the crashed thread's
stack. Then, as real login users: a dump belongs to the VM's owner, who
``dump get``s it into a file of their own; another member can neither get nor
delete it; a dump without VMCOREINFO says so in ``dump list``, with the fix.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kdlab.errors import NotAuthorized
from tests.support.clients import kdlabctl
from tests.support.logins import Logins
from tests.support.prereq import require_tool
from tests.support.timeouts import CTL_TIMEOUT
from tests.vm.conftest import MARKER, Lab
from tests.vm.test_debug import SHELL_PROMPT, Console
from tests.vm.test_images import ext4_image
from tests.vm.test_lifecycle import wait_for_console

pytestmark = pytest.mark.vm

PANIC_SECONDS = 60  # the promise: a dump within 60 s of the panic
BOOT_SECONDS = 120  # TCG on a shared machine
SYSRQ = b"echo c > /proc/sysrq-trigger\r"
SYSRQ_PANIC = "sysrq: Trigger a crash"
DRGN_SCRIPT = """\
print("RELEASE", prog["init_uts_ns"].name.release.string_().decode())
try:
    thread = prog.crashed_thread()
except LookupError as err:  # a dump taken on request: panic_cpu is not set
    print("STACK", "-", err)
else:
    print("STACK", " ".join(frame.name or "?" for frame in thread.stack_trace()))
"""


@pytest.fixture(scope="module")
def drgn_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("drgn") / "crashed.py"
    script.write_text(DRGN_SCRIPT)
    return script


@pytest.fixture(scope="module")
def disk_image(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An image of tests.vm.test_images' ext4 disk, whose /sbin/init runs a
    shell, with an init that exits: /sbin/exits."""
    work = tmp_path_factory.mktemp("disk")
    (work / "root/sbin").mkdir(parents=True)
    (work / "root/sbin/exits").write_text("#!/bin/busybox sh\nexit 0\n")
    (work / "root/sbin/exits").chmod(0o755)
    raw = ext4_image(work / "root.img", work / "root")
    name = f"vmt-dumps-{uuid.uuid4().hex[:8]}"
    imported = lab.ctl("image", "import", name, str(raw), "-q")
    assert imported.returncode == 0, imported.stderr
    yield name
    lab.ctl("image", "delete", name)


def dumps_of(lab: Lab, name: str) -> list[dict[str, Any]]:
    listed = lab.ctl("dump", "list", name, "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def wait_for_dump(lab: Lab, name: str, console_text: str) -> dict[str, Any]:
    """The one automatic dump of *name*, complete, once the console showed
    *console_text* (the panic) and at most PANIC_SECONDS later."""
    wait_for_console(lab, name, console_text, timeout=BOOT_SECONDS)
    deadline = time.monotonic() + PANIC_SECONDS
    while time.monotonic() < deadline:
        automatic = [d for d in dumps_of(lab, name) if d["reason"] != "requested"]
        if automatic and automatic[0]["state"] == "complete":
            time.sleep(1)  # a second dump of the same panic would show now
            automatic = [d for d in dumps_of(lab, name) if d["reason"] != "requested"]
            assert len(automatic) == 1, automatic
            return automatic[0]
        time.sleep(0.5)
    raise AssertionError(f"no complete dump of {name} {PANIC_SECONDS} s after panic")


def drgn_on(lab: Lab, target: str, script: Path) -> dict[str, str]:
    """``kdlabctl drgn TARGET SCRIPT``: what the script printed, by its first word."""
    result = lab.ctl("drgn", target, str(script), timeout=CTL_TIMEOUT * 4)
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(
        line.split(" ", 1) for line in result.stdout.splitlines() if " " in line
    )


def crash_bt(lab: Lab, target: str) -> str:
    """What ``bt`` prints in ``kdlabctl crash TARGET``."""
    require_tool("crash", "crash")
    crashed = kdlabctl(
        lab.daemon.address,
        "crash", target, "-s",
        input_text="bt\nquit\n",
        timeout=CTL_TIMEOUT * 6,
    )  # fmt: skip
    assert crashed.returncode == 0, crashed.stdout + crashed.stderr
    return crashed.stdout


def start(lab: Lab, name: str) -> None:
    started = lab.ctl("start", name)
    assert started.returncode == 0, started.stderr


def crash_by_sysrq(lab: Lab, name: str) -> None:
    """Type ``echo c > /proc/sysrq-trigger`` into the VM's shell, as a person
    would on ``kdlabctl console``, and see the kernel take it."""
    # The prompt, not just the marker: busybox's line editing discards what
    # was typed before it set the terminal up.
    wait_for_console(lab, name, SHELL_PROMPT, timeout=BOOT_SECONDS)
    console = Console(lab.daemon.address, name)
    try:
        console.expect(b"escape character is ^]")
        console.type(SYSRQ)
        console.expect(SYSRQ_PANIC.encode(), timeout=BOOT_SECONDS)
    finally:
        if console.proc.poll() is None:
            console.proc.kill()
        console.proc.wait()
        os.close(console.master)


def create_minimal(lab: Lab, name: str, minimal: Path, cmdline: str) -> None:
    created = lab.ctl(
        "create", name,
        "--kernel", str(minimal / "arch/x86/boot/bzImage"),
        "--vmlinux", str(minimal / "vmlinux"),
        "--initrd", str(lab.initramfs),
        "--memory", "256",
        "--cmdline", cmdline,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr


def create_cloud(lab: Lab, name: str, image: str, vmlinux: Path, init: str) -> None:
    created = lab.ctl(
        "create", name,
        "--kernel", str(lab.kernel.vmlinuz),
        "--modules", str(lab.kernel.modules_dir),
        "--vmlinux", str(vmlinux),
        "--image", image,
        "--memory", "256",
        "--cmdline", f"init=/{init} rw",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr


def assert_panic_dump(dump: dict[str, Any], release: str) -> None:
    assert dump["reason"] == "panic"
    assert dump["owner"] == os.getuid()
    assert dump["kernel_release"] == release
    assert dump["vmcoreinfo"] is True, dump["problem"]
    assert dump["build_id"]


def test_minimal_kernel_whose_init_exits(
    lab: Lab, vm_name: str, minimal_build: Path, drgn_script: Path
) -> None:
    create_minimal(lab, vm_name, minimal_build, "rdinit=/bin/busybox")
    start(lab, vm_name)
    dump = wait_for_dump(lab, vm_name, "Attempted to kill init")
    release = (minimal_build / "include/config/kernel.release").read_text().strip()
    assert_panic_dump(dump, release)
    printed = drgn_on(lab, vm_name, drgn_script)
    assert printed["RELEASE"] == release
    assert "panic" in printed["STACK"].split()


def test_minimal_kernel_crashed_by_sysrq(
    lab: Lab, vm_name: str, minimal_build: Path, drgn_script: Path
) -> None:
    create_minimal(lab, vm_name, minimal_build, "")
    start(lab, vm_name)
    crash_by_sysrq(lab, vm_name)
    dump = wait_for_dump(lab, vm_name, SYSRQ_PANIC)
    printed = drgn_on(lab, dump["id"], drgn_script)
    assert "sysrq_handle_crash" in printed["STACK"].split()
    # configure --minimal picks SLUB: Debian's crash reads only SLAB and SLUB.
    # Its unwinder skips sysrq_handle_crash, which tail-calls panic here.
    bt = crash_bt(lab, dump["id"])
    assert " panic at " in bt
    assert " write_sysrq_trigger at " in bt


def test_cloud_kernel_through_the_module_initramfs_whose_init_exits(
    lab: Lab, vm_name: str, disk_image: str, vmlinux: Path, drgn_script: Path
) -> None:
    create_cloud(lab, vm_name, disk_image, vmlinux, "sbin/exits")
    start(lab, vm_name)
    dump = wait_for_dump(lab, vm_name, "Attempted to kill init")
    assert_panic_dump(dump, lab.kernel.release)
    printed = drgn_on(lab, vm_name, drgn_script)
    assert printed["RELEASE"] == lab.kernel.release
    assert "panic" in printed["STACK"].split()


def test_cloud_kernel_through_the_module_initramfs_crashed_by_sysrq(
    lab: Lab, vm_name: str, disk_image: str, vmlinux: Path, drgn_script: Path
) -> None:
    create_cloud(lab, vm_name, disk_image, vmlinux, "sbin/init")
    start(lab, vm_name)
    wait_for_console(lab, vm_name, SHELL_PROMPT, timeout=BOOT_SECONDS)
    # A dump on request leaves the VM running, and is no automatic one.
    # A compressed one (QEMU writes it flattened): drgn reads it reassembled.
    taken = lab.ctl("dump", "take", vm_name, "--compress", timeout=CTL_TIMEOUT * 4)
    assert taken.returncode == 0, taken.stderr
    requested = taken.stdout.strip()
    (listed,) = dumps_of(lab, vm_name)
    assert (listed["id"], listed["reason"]) == (requested, "requested")
    assert (listed["format"], listed["vmcoreinfo"]) == ("kdump-zlib", True)
    assert json.loads(lab.ctl("show", vm_name, "--json").stdout)["state"] == "running"
    assert drgn_on(lab, requested, drgn_script)["RELEASE"] == lab.kernel.release

    crash_by_sysrq(lab, vm_name)
    dump = wait_for_dump(lab, vm_name, SYSRQ_PANIC)
    assert_panic_dump(dump, lab.kernel.release)
    # NAME is the VM's latest dump: the panic's, not the requested one.
    printed = drgn_on(lab, vm_name, drgn_script)
    assert "sysrq_handle_crash" in printed["STACK"].split()
    assert "sysrq_handle_crash" in crash_bt(lab, vm_name)


def test_a_dump_is_its_owners_to_get_and_nobody_elses(lab: Lab, logins: Logins) -> None:
    """alice dumps her VM (Debian's kernel without its modules: no
    qemu_fw_cfg, so no VMCOREINFO, which the listing says with the fix);
    alice gets the dump as herself, bob can neither get nor delete it."""
    alice, bob = logins.alice, logins.bob
    address = lab.daemon.address
    name = f"vmt-{uuid.uuid4().hex[:8]}"
    created = logins.kdlabctl(
        alice, address, "create", name,
        "--kernel", str(lab.kernel.vmlinuz),
        "--initrd", str(lab.initramfs),
        "--memory", "256",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    try:
        assert logins.kdlabctl(alice, address, "start", name).returncode == 0
        wait_for_console(lab, name, MARKER, timeout=BOOT_SECONDS)
        taken = logins.kdlabctl(alice, address, "dump", "take", name, timeout=300)
        assert taken.returncode == 0, taken.stderr
        (dump,) = dumps_of(lab, name)
        assert dump["id"] == taken.stdout.strip()
        assert (dump["owner"], dump["reason"]) == (alice.uid, "requested")
        assert dump["vmcoreinfo"] is False
        listed = logins.kdlabctl(alice, address, "dump", "list", name)
        assert listed.returncode == 0, listed.stderr
        assert f"{dump['id']}: {dump['problem']}" in listed.stdout
        assert "CONFIG_FW_CFG_SYSFS" in dump["problem"]

        refused = NotAuthorized.exit_code
        theirs = logins.kdlabctl(
            bob, address, "dump", "get", dump["id"], "-o", str(bob.home / "vmcore")
        )
        assert theirs.returncode == refused, theirs.stderr
        assert not (bob.home / "vmcore").exists()
        deleted = logins.kdlabctl(bob, address, "dump", "delete", dump["id"])
        assert deleted.returncode == refused, deleted.stderr

        copy = alice.home / "vmcore"
        got = logins.kdlabctl(
            alice, address, "dump", "get", dump["id"], "-o", str(copy)
        )
        assert got.returncode == 0, got.stderr
        info = copy.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (alice.uid, 0o600)
        assert info.st_size == dump["size"]
        again = logins.kdlabctl(
            alice, address, "dump", "get", dump["id"], "-o", str(copy)
        )
        assert again.returncode == 2
        assert "--force" in again.stderr
        copy.unlink()  # alice's home is the session's: other tests write there

        mine = logins.kdlabctl(alice, address, "dump", "delete", dump["id"])
        assert mine.returncode == 0, mine.stderr
        assert dumps_of(lab, name) == []
    finally:
        logins.kdlabctl(alice, address, "delete", "--force", name)
        lab.ctl("delete", "--force", name)
