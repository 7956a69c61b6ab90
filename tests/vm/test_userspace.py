"""A VM without an image boots kdlab's userspace initramfs, on real libvirt.

``kdlabctl create NAME --kernel K`` of Debian's cloud kernel (virtio_pci,
virtio_console, fuse, virtiofs are modules there, found next to it): kdlabctl
builds the initramfs with them and kdlab's agent, the console shows the ready
line, the shell answers and outlives ``exit``, and ``kdlabctl stop`` powers
the guest off through the ACPI power button (busybox acpid), not by pulling
the plug. One boot for all of it (TCG boots cost seconds).
"""

from __future__ import annotations

import time

import pytest

from kdlab.kernel.diagnosis import BootFacts, diagnose
from kdlab.kernel.initramfs import POWER_BUTTON, READY, SHELL_ENDED
from tests.support import figures
from tests.vm.conftest import Lab
from tests.vm.test_debug import Console
from tests.vm.test_lifecycle import state, wait_for_console

pytestmark = pytest.mark.vm


def assert_no_diagnosis(log: str) -> None:
    """The boot diagnosis finds nothing wrong in a console *log* of
    kdlab's userspace (kdlabd's, which it re-reads every 2 s, may lag)."""
    facts = BootFacts(
        cmdline="console=ttyS0 nokaslr",
        disks=(),
        has_initrd=True,
        gdbstub=True,
        seconds_since_start=60,
        running=False,
    )
    found = diagnose(log, facts)
    assert found is None, found


def answers(console: Console, command: str, answer: str) -> None:
    """Type *command* into the shell and wait for *answer*, a text the typed
    line does not hold itself (the terminal echoes what is typed)."""
    assert answer not in command
    console.type(command.encode() + b"\r")
    console.expect(answer.encode())


def test_a_vm_without_an_image_boots_to_kdlabs_shell_and_stops_on_acpi(
    lab: Lab, vm_name: str
) -> None:
    created = lab.ctl(
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz), "--memory", "256"
    )
    assert created.returncode == 0, created.stderr
    assert (
        f"built kdlab's userspace initramfs with modules from {lab.kernel.modules_dir}"
        in created.stderr
    )
    started = time.monotonic()
    assert lab.ctl("start", vm_name).returncode == 0
    log = wait_for_console(lab, vm_name, READY.text(), timeout=120)
    figures.record(
        "kdlab userspace: start to its ready line (TCG)",
        round(time.monotonic() - started, 1),
        "",
        unit="s",
    )
    assert "VFS: Unable to mount root fs" not in log
    assert "cannot load module" not in log

    console = Console(lab.daemon.address, vm_name)
    try:
        console.expect(b"escape character is ^]")
        answers(console, "echo up-$((6*7))", "up-42")
        # virtio_console (the agent's port) is a module of this kernel: loaded.
        answers(
            console, "echo mod-$(grep -c '^virtio_console ' /proc/modules)", "mod-1"
        )
        answers(console, "ls /dev/virtio-ports/", "org.kdlab.agent.0")
        # Leaving the shell starts another: PID 1 lives on, no panic.
        console.type(b"exit\r")
        console.expect(SHELL_ENDED.text().encode())
        answers(console, "echo again-$((1+1))", "again-2")
        assert console.detach() == 0
    finally:
        if console.proc.poll() is None:
            console.proc.kill()
            console.proc.wait()

    asked = time.monotonic()
    stopped = lab.ctl("stop", vm_name)
    seconds = time.monotonic() - asked
    assert stopped.returncode == 0, stopped.stderr
    figures.record(
        "kdlab userspace: kdlabctl stop (ACPI power button)",
        round(seconds, 1),
        "",
        unit="s",
    )
    assert state(lab, vm_name) == "stopped"
    log = lab.ctl("logs", vm_name).stdout
    # The guest powered itself off: the button reached acpid.
    assert POWER_BUTTON.text() in log
    assert "reboot: Power down" in log
    assert_no_diagnosis(log)
