"""Checkpoints on real libvirt and QEMU (TCG), with Debian's kernel.

The issue's demonstration: boot to the busybox shell, save ``ready``, change
memory (a file in the initramfs' tmpfs root, a sysctl), restore: the change
is gone, the console viewer that stayed attached still answers, and a gdb
connected before the restore still reads ``jiffies`` afterwards, in the same
QEMU process. With a disk image, a file written after the checkpoint is gone
and the image is untouched. kdlabd killed during a save leaves no half
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlabd.core.journal import CRASH_ENV
from tests.support.clients import ctl_env, kdlabctl, read_until
from tests.support.prereq import require_tool
from tests.support.system import remove_vm, system_kdlabd
from tests.vm.conftest import POOL_PREFIX, Lab, virsh
from tests.vm.test_debug import (  # noqa: F401 (consoles: a fixture)
    SHELL_PROMPT,
    Console,
    consoles,
    gdb_session,
)
from tests.vm.test_images import DISK_MARKER, ext4_image, image_name  # noqa: F401
from tests.vm.test_lifecycle import wait_for_console

pytestmark = pytest.mark.vm


def booted(lab: Lab, name: str, ready: str, opened: list[Console]) -> Console:
    """Start *name*, wait for *ready* in its log; a console viewer attached."""
    assert lab.ctl("start", name).returncode == 0
    wait_for_console(lab, name, ready, timeout=180)
    console = Console(lab.daemon.address, name)
    opened.append(console)
    console.expect(b"escape character is ^]")
    return console


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/kdlab-{name}.pid").read_text())


def ask(console: Console, command: str, token: str) -> str:
    """Type *command* (which ends by echoing *token*-END); the line before it."""
    start = len(console.seen)
    console.type(f"{command}; echo {token}-$((40+2))-END\r".encode())
    console.expect(f"{token}-42-END".encode(), timeout=60)
    return console.seen[start:].decode(errors="replace")


def printk_level(console: Console, token: str) -> str:
    answer = ask(console, "read a b < /proc/sys/kernel/printk; echo LVL=$a", token)
    found = re.findall(r"LVL=(\d+)", answer)
    assert found, answer
    return found[-1]


def checkpoints(ctl: object, name: str) -> list[str]:
    result = ctl("checkpoint", "list", name, "--json")  # type: ignore[operator]
    assert result.returncode == 0, result.stderr
    return [c["tag"] for c in json.loads(result.stdout)]


def test_restore_brings_the_state_back_with_console_and_gdb_attached(
    lab: Lab,
    vm_name: str,
    consoles: list[Console],  # noqa: F811 (the fixture)
    vmlinux: Path,
) -> None:
    result = lab.ctl(
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz),
        "--initrd", str(lab.initramfs), "--memory", "256", "--vmlinux", str(vmlinux),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    console = booted(lab, vm_name, SHELL_PROMPT, consoles)
    level = printk_level(console, "before")
    assert level != "3"

    saved = lab.ctl("checkpoint", "save", vm_name, "ready", timeout=300)
    assert saved.returncode == 0, saved.stderr
    assert "saved checkpoint ready" in saved.stdout
    shown = json.loads(lab.ctl("show", vm_name, "--json").stdout)
    ((tag, _created, memory, boot, kernel),) = shown["checkpoints"]
    assert (tag, memory) == ("ready", 256 << 20)
    assert boot == shown["booted"] > 0
    assert kernel == hashlib.sha256(lab.kernel.vmlinuz.read_bytes()).hexdigest()
    pid = qemu_pid(vm_name)

    ask(
        console, "echo changed > /tmp/after-ckpt; echo 3 > /proc/sys/kernel/printk", "w"
    )
    assert printk_level(console, "changed") == "3"

    require_tool("gdb", "gdb")
    gdb, send = gdb_session(lab, vm_name)
    try:
        send(b"p jiffies\n", "$1 = ")

        restored = lab.ctl("checkpoint", "restore", vm_name, "ready", timeout=300)
        assert restored.returncode == 0, restored.stderr
        assert qemu_pid(vm_name) == pid, "restored inside the same QEMU process"

        answer = ask(
            console, "[ -e /tmp/after-ckpt ] && echo FILE-THERE || echo FILE-GONE", "r"
        )
        assert "FILE-GONE" in answer
        assert printk_level(console, "after") == level

        after = send(b"flushregs\np jiffies\nquit\n", "$2 = ")
        assert "Undefined command" not in after
        assert re.search(r"\$2 = \d+", after), after
        assert gdb.wait(timeout=60) == 0
    finally:
        if gdb.poll() is None:
            gdb.kill()
            gdb.wait()
    assert console.proc.poll() is None, "the console viewer stayed attached"

    assert console.detach() == 0
    paused_then_started_into(lab, vm_name, level, consoles)


def paused_then_started_into(
    lab: Lab, vm_name: str, level: str, opened: list[Console]
) -> None:
    """--paused leaves the CPUs stopped; a stopped VM starts into the
    checkpoint; deleting the VM removes its checkpoints."""
    paused = lab.ctl("checkpoint", "restore", vm_name, "ready", "--paused")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(lab.ctl("show", vm_name, "--json").stdout)["state"] == "paused"
    booted = json.loads(lab.ctl("show", vm_name, "--json").stdout)["booted"]
    assert lab.ctl("stop", "--force", vm_name).returncode == 0
    started = lab.ctl("start", vm_name, "--from", "ready")
    assert started.returncode == 0, started.stderr
    assert json.loads(lab.ctl("show", vm_name, "--json").stdout)["booted"] > booted
    console = Console(lab.daemon.address, vm_name)
    opened.append(console)
    console.expect(b"escape character is ^]")
    assert printk_level(console, "started") == level
    assert console.detach() == 0
    # libvirt keeps no metadata of them once the VM is gone.
    assert lab.ctl("delete", "--force", vm_name).returncode == 0
    assert virsh("snapshot-list", f"kdlab-{vm_name}").returncode != 0


def test_a_file_written_after_the_checkpoint_is_gone_and_the_image_untouched(
    lab: Lab,
    vm_name: str,
    image_name: str,  # noqa: F811 (the fixture)
    tmp_path: Path,
    consoles: list[Console],  # noqa: F811 (the fixture)
) -> None:
    raw = ext4_image(tmp_path / "root.img", tmp_path / "tree")
    imported = lab.ctl("image", "import", image_name, str(raw))
    assert imported.returncode == 0, imported.stderr
    base = Path(
        virsh("vol-path", image_name, "--pool", f"{POOL_PREFIX}-images").stdout.strip()
    )
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    created = lab.ctl(
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz),
        "--image", image_name, "--memory", "256",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    console = booted(lab, vm_name, DISK_MARKER, consoles)
    time.sleep(1)
    ask(console, "/bin/busybox mount -o remount,rw /", "rw")
    saved = lab.ctl("checkpoint", "save", vm_name, "clean", timeout=300)
    assert saved.returncode == 0, saved.stderr

    ask(console, "echo written > /after-ckpt; /bin/busybox sync", "w")
    answer = ask(console, "[ -e /after-ckpt ] && echo FILE-THERE", "there")
    assert "FILE-THERE" in answer
    restored = lab.ctl("checkpoint", "restore", vm_name, "clean", timeout=300)
    assert restored.returncode == 0, restored.stderr
    answer = ask(
        console, "[ -e /after-ckpt ] && echo FILE-THERE || echo FILE-GONE", "gone"
    )
    assert "FILE-GONE" in answer
    assert console.detach() == 0
    assert lab.ctl("stop", "--force", vm_name).returncode == 0
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before


def boot_volumes(prefix: str, name: str) -> list[str]:
    listing = virsh("vol-list", f"{prefix}-boot").stdout.splitlines()[2:]
    volumes = [line.split()[0] for line in listing if line.strip()]
    return sorted(v for v in volumes if v.startswith(name))


def test_kdlabd_killed_during_a_save_leaves_no_half_checkpoint(lab: Lab) -> None:
    """kill -9 of kdlabd while libvirtd saves: after the restart the checkpoint
    is whole (listed, restorable, in the disk) or absent, and no volume is
    left over; checkpoints survive kdlabd's restart."""
    name = f"vmt-kill-{time.monotonic_ns() % 100000}"
    prefix = f"{POOL_PREFIX}-ck"
    with system_kdlabd(prefix) as daemon:

        def ctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
            return kdlabctl(daemon.address, *args, timeout=timeout)

        try:
            created = ctl(
                "create", name, "--kernel", str(lab.kernel.vmlinuz),
                "--initrd", str(lab.initramfs), "--memory", "256",
            )  # fmt: skip
            assert created.returncode == 0, created.stderr
            assert ctl("start", name).returncode == 0
            deadline = time.monotonic() + 180
            while SHELL_PROMPT not in ctl("logs", name).stdout:
                assert time.monotonic() < deadline
                time.sleep(1)
            # Killed between making the state disk and plugging it in: the next
            # kdlabd removes the volume no definition names.
            daemon.stop()
            daemon.start(env={CRASH_ENV: "checkpoint.state-disk-made"})
            assert ctl("checkpoint", "save", name, "first").returncode != 0
            daemon.wait()
            daemon.start()
            assert boot_volumes(prefix, name) == [f"{name}.initrd", f"{name}.kernel"]
            assert "vda" not in virsh("domblklist", f"kdlab-{name}").stdout

            assert ctl("checkpoint", "save", name, "first").returncode == 0
            saving = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kdlabctl",
                    "checkpoint",
                    "save",
                    name,
                    "second",
                ],
                env=ctl_env(daemon.address),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert saving.stdout is not None
            read_until(saving.stdout.fileno(), "saving", timeout=120)
            daemon.kill()
            saving.wait(timeout=60)
            daemon.start()

            listed = checkpoints(ctl, name)
            assert listed[0] == "first"
            assert set(listed) <= {"first", "second"}
            disk = Path(
                virsh(
                    "vol-path", f"{name}.vda.qcow2", "--pool", f"{prefix}-boot"
                ).stdout.strip()
            )
            stored = subprocess.run(
                ["qemu-img", "snapshot", "-U", "-l", str(disk)],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            in_disk = {line.split()[1] for line in stored.splitlines()[2:] if line}
            assert in_disk == set(listed), (stored, listed)
            for tag in listed:
                restored = ctl("checkpoint", "restore", name, tag)
                assert restored.returncode == 0, restored.stderr
            assert boot_volumes(prefix, name) == [
                f"{name}.initrd",
                f"{name}.kernel",
                f"{name}.vda.qcow2",
            ]
        finally:
            remove_vm(daemon, name)


def test_up_restores_the_checkpoint_of_an_unchanged_kernel_else_boots(
    lab: Lab,
    vm_name: str,
    minimal_build: Path,
) -> None:
    tree = str(minimal_build)
    first = lab.ctl("up", tree, "--name", vm_name, "--batch", timeout=300)
    assert first.returncode == 0, first.stderr
    saved = lab.ctl("checkpoint", "save", vm_name, "early", timeout=300)
    assert saved.returncode == 0, saved.stderr
    pid = qemu_pid(vm_name)

    again = lab.ctl(
        "up", tree, "--name", vm_name, "--checkpoint", "early", "--batch", timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "booting" not in again.stderr
    assert "waits for the debugger" not in again.stderr, "it restored, not booted"
    assert qemu_pid(vm_name) == pid

    other = lab.ctl(
        "up", tree, "--name", vm_name, "--checkpoint", "nope", "--batch", timeout=300
    )
    assert other.returncode == 0, other.stderr
    assert f"VM {vm_name} has no checkpoint nope; booting" in other.stderr
    assert "waits for the debugger" in other.stderr
    assert qemu_pid(vm_name) != pid
