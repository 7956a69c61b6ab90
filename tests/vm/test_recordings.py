"""Record and replay on real libvirt and QEMU (TCG), with Debian's kernel.

The issue's demonstration: a boot whose init exits (the kernel panics) is
recorded; two replays show the same console; in a replay gdb stops at
``panic`` going forwards, goes back to an earlier breakpoint with
reverse-continue, and ten reverse-stepi then ten stepi come back to the same
``$pc`` sequence. Refusals: a VM of two vCPUs without --single-cpu, a replay
after the kernel changed.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Variant

from kdlab.wire import VM_INTERFACE, vm_path
from tests.support.bus import BusClient
from tests.support.prereq import require_tool
from tests.vm.conftest import Lab, virsh
from tests.vm.test_debug import gdb_session
from tests.vm.test_images import ext4_image
from tests.vm.test_lifecycle import wait_for_console

pytestmark = pytest.mark.vm

PANIC = "Attempted to kill init"  # busybox as init prints its help, exits
RECORD_SECONDS = 240


def recordings(lab: Lab, name: str) -> list[dict[str, Any]]:
    listed = lab.ctl("recording", "list", name, "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def wait_complete(lab: Lab, name: str, recording: str) -> dict[str, Any]:
    deadline = time.monotonic() + RECORD_SECONDS
    while time.monotonic() < deadline:
        found = [r for r in recordings(lab, name) if r["id"] == recording]
        if found and found[0]["state"] == "complete":
            return found[0]
        time.sleep(1)
    raise AssertionError(f"recording {recording} did not complete: {found}")


def console_log(lab: Lab, name: str) -> str:
    result = lab.ctl("logs", name)
    assert result.returncode == 0, result.stderr
    return result.stdout


def replayed_log(lab: Lab, name: str, recording: str) -> str:
    """Replay *recording* to its end (no gdb: the guest runs on by itself;
    QEMU powers off where the recording ended): its console log."""
    replay = lab.ctl("replay", name, recording, "--snapshot-interval", "0")
    assert replay.returncode == 0, replay.stderr
    assert virsh("resume", f"kdlab-{name}").returncode == 0
    deadline = time.monotonic() + RECORD_SECONDS
    while json.loads(lab.ctl("show", name, "--json").stdout)["state"] != "stopped":
        assert time.monotonic() < deadline, "the replay did not end by itself"
        time.sleep(1)
    return console_log(lab, name)


def panic_vm(lab: Lab, name: str, vmlinux: Path, *extra: str) -> None:
    created = lab.ctl(
        "create", name, "--kernel", str(lab.kernel.vmlinuz),
        "--initrd", str(lab.initramfs), "--memory", "256", "--vmlinux", str(vmlinux),
        "--cmdline", "rdinit=/bin/busybox panic=0", "--on-panic", "dump-and-stop",
        *extra,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr


def test_a_recorded_panic_replays_the_same_console_twice(
    lab: Lab, vm_name: str, vmlinux: Path
) -> None:
    panic_vm(lab, vm_name, vmlinux)
    started = lab.ctl("record", vm_name, "--as", f"{vm_name}-boot")
    assert started.returncode == 0, started.stderr
    recording = started.stdout.strip()
    assert recording == f"{vm_name}-boot"
    wait_for_console(lab, vm_name, PANIC, timeout=RECORD_SECONDS)
    done = wait_complete(lab, vm_name, recording)
    assert done["ended"] == "panic", done
    assert done["instructions"] > 100_000_000, done
    recorded = console_log(lab, vm_name)
    assert PANIC in recorded
    # The panic was dumped too (OnPanic dump-and-stop), and only once: the
    # replays' panics are the recording's.
    dumps = json.loads(lab.ctl("dump", "list", vm_name, "--json").stdout)
    assert [d["reason"] for d in dumps] == ["panic"], dumps

    first = replayed_log(lab, vm_name, recording)
    second = replayed_log(lab, vm_name, recording)
    assert first == recorded
    assert second == recorded
    after = json.loads(lab.ctl("dump", "list", vm_name, "--json").stdout)
    assert after == dumps


def test_reverse_debugging_in_a_replay(lab: Lab, vm_name: str, vmlinux: Path) -> None:
    require_tool("gdb", "gdb")
    panic_vm(lab, vm_name, vmlinux)
    recording = lab.ctl("record", vm_name).stdout.strip()
    wait_for_console(lab, vm_name, PANIC, timeout=RECORD_SECONDS)
    wait_complete(lab, vm_name, recording)

    replay = lab.ctl("replay", vm_name, recording)
    assert replay.returncode == 0, replay.stderr
    gdb, send = gdb_session(lab, vm_name)
    send(b"hbreak panic\n", "Hardware assisted breakpoint 1")
    send(b"continue\n", "Breakpoint 1, panic")
    # Backwards to init's exit, which called panic; forwards to panic again.
    send(b"hbreak do_exit\n", "Hardware assisted breakpoint 2")
    send(b"reverse-continue\n", "Breakpoint 2, do_exit")
    send(b"continue\n", "Breakpoint 1, panic")

    def pc(step: bytes) -> str:
        answer = send(step + b"p/x $pc\necho PC-END\\n\n", "PC-END")
        return re.findall(r"= (0x[0-9a-f]+)", answer)[-1]

    at_panic = pc(b"")
    backwards = [pc(b"reverse-stepi\n") for _ in range(10)]
    forwards = [pc(b"stepi\n") for _ in range(10)]
    assert forwards[:-1] == list(reversed(backwards))[1:], (backwards, forwards)
    assert forwards[-1] == at_panic
    assert len(set(backwards)) > 1, backwards  # it moved
    gdb.kill()


def test_refusals(lab: Lab, vm_name: str, vmlinux: Path) -> None:
    panic_vm(lab, vm_name, vmlinux, "--cpus", "2")
    refused = lab.ctl("record", vm_name)
    assert refused.returncode == 12, refused.stderr
    assert "--single-cpu" in refused.stderr
    assert not recordings(lab, vm_name)


def test_single_cpu_records_two_vcpus_with_one(
    lab: Lab, vm_name: str, vmlinux: Path
) -> None:
    panic_vm(lab, vm_name, vmlinux, "--cpus", "2")
    started = lab.ctl("record", vm_name, "--single-cpu")
    assert started.returncode == 0, started.stderr
    wait_for_console(lab, vm_name, PANIC, timeout=RECORD_SECONDS)
    assert wait_complete(lab, vm_name, started.stdout.strip())["ended"] == "panic"
    shown = json.loads(lab.ctl("show", vm_name, "--json").stdout)
    assert shown["vcpus"] == 2, "the VM's own definition is unchanged"


def test_a_replay_after_the_kernel_changed_is_refused(
    lab: Lab, vm_name: str, vmlinux: Path, client: BusClient, tmp_path: Path
) -> None:
    panic_vm(lab, vm_name, vmlinux)
    recording = lab.ctl("record", vm_name).stdout.strip()
    wait_for_console(lab, vm_name, PANIC, timeout=RECORD_SECONDS)
    wait_complete(lab, vm_name, recording)
    # A rebuilt kernel: other bytes (one more at the end still boots).
    rebuilt = tmp_path / "bzImage"
    rebuilt.write_bytes(lab.kernel.vmlinuz.read_bytes() + b"\0")
    fd = os.open(rebuilt, os.O_RDONLY)
    try:
        client.ok(vm_path(vm_name), VM_INTERFACE, "Start", "a{sv}",
                  [{"kernel": Variant("h", 0)}], unix_fds=[fd])  # fmt: skip
    finally:
        os.close(fd)
    assert lab.ctl("stop", vm_name, "--force").returncode == 0
    refused = lab.ctl("replay", vm_name, recording)
    assert refused.returncode == 10, refused.stderr
    assert "the kernel was rebuilt or replaced" in refused.stderr


DISK_DONE = "KDLAB-RR-DISK-DONE"


def writing_image(lab: Lab, name: str, tmp_path: Path) -> None:
    """An image whose init writes a file to its root, reads it back, prints
    DISK_DONE and stays in a shell."""
    raw = ext4_image(
        tmp_path / "root.img",
        tmp_path / "tree",
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n"
        "/bin/busybox mount -o remount,rw /\n"
        "/bin/busybox cat /written 2>/dev/null && echo WAS-THERE\n"
        "echo written-$$ > /written; /bin/busybox sync\n"
        f'echo "$(/bin/busybox cat /written) {DISK_DONE}"\n'
        "exec /bin/busybox sh\n",
    )
    imported = lab.ctl("image", "import", name, str(raw))
    assert imported.returncode == 0, imported.stderr


def test_a_recording_of_a_vm_with_a_disk_replays_the_same_console(
    lab: Lab, vm_name: str, vmlinux: Path, tmp_path: Path
) -> None:
    """The run writes its disk; each replay reads the disk as it was when the
    recording began; the VM's own disk never sees the run's writes."""
    image = f"{vm_name}-img"
    writing_image(lab, image, tmp_path)
    try:
        created = lab.ctl(
            "create", vm_name, "--kernel", str(lab.kernel.vmlinuz), "--image", image,
            "--memory", "256", "--vmlinux", str(vmlinux),
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        started = lab.ctl("record", vm_name)
        assert started.returncode == 0, started.stderr
        recording = started.stdout.strip()
        wait_for_console(lab, vm_name, DISK_DONE, timeout=RECORD_SECONDS)
        time.sleep(2)
        assert lab.ctl("stop", vm_name, "--force").returncode == 0
        assert wait_complete(lab, vm_name, recording)["ended"] == "stop"
        recorded = console_log(lab, vm_name)
        assert "WAS-THERE" not in recorded
        first = replayed_log(lab, vm_name, recording)
        second = replayed_log(lab, vm_name, recording)
        assert first == recorded
        assert second == recorded
        # The VM's own disk: as before the recording (no file written).
        assert lab.ctl("start", vm_name).returncode == 0
        wait_for_console(lab, vm_name, DISK_DONE, timeout=RECORD_SECONDS)
        assert "WAS-THERE" not in console_log(lab, vm_name)
        lab.ctl("stop", vm_name, "--force")
        # A boot that did not record wrote the disk: a replay is refused.
        refused = lab.ctl("replay", vm_name, recording)
        assert refused.returncode == 10, refused.stderr
        assert "the disk vda was written" in refused.stderr
    finally:
        lab.ctl("delete", "--force", vm_name)
        lab.ctl("recording", "delete", recording)
        lab.ctl("image", "delete", image)
