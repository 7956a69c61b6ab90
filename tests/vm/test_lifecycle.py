"""A Debian kernel booted through kdlabd on real libvirt and QEMU, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lxml import etree

from kdlab.wire import VM_INTERFACE
from tests.support.bus import BusClient
from tests.support.clients import ctl_env, read_until
from tests.vm.conftest import MARKER, TEST_POOL, Lab, virsh

pytestmark = pytest.mark.vm

QEMU_NS = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0"}


def create(lab: Lab, name: str, *extra: str) -> None:
    result = lab.ctl(
        "create",
        name,
        "--kernel",
        str(lab.kernel.vmlinuz),
        "--initrd",
        str(lab.initramfs),
        "--memory",
        "256",
        *extra,
    )
    assert result.returncode == 0, result.stderr


def state(lab: Lab, name: str) -> str:
    result = lab.ctl("show", name, "--json")
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["state"])


def wait_for_console(lab: Lab, name: str, text: str, timeout: float = 90) -> str:
    """Poll ``kdlabctl logs`` until *text* appears; return the log."""
    deadline = time.monotonic() + timeout
    log = ""
    while time.monotonic() < deadline:
        result = lab.ctl("logs", name)
        log = result.stdout
        if text in log:
            return log
        time.sleep(0.3)
    raise AssertionError(
        f"{text!r} not on {name}'s console after {timeout}s:\n{log[-3000:]}"
    )


def holds_open(pid: int, path: Path) -> bool:
    """Whether process *pid* has *path* open."""
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fds / fd) == str(path) for fd in os.listdir(fds))


def wait_for_diagnosis(lab: Lab, name: str, timeout: float = 90) -> dict[str, str]:
    """Poll ``kdlabctl show --json`` until kdlabd has diagnosed the boot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        diagnosis = json.loads(lab.ctl("show", name, "--json").stdout)["diagnosis"]
        if diagnosis is not None:
            return dict(diagnosis)
        time.sleep(1)
    log = lab.ctl("logs", name).stdout
    raise AssertionError(f"no diagnosis of {name} after {timeout}s:\n{log[-2000:]}")


def boot_volumes(name: str) -> list[str]:
    listing = virsh("vol-list", TEST_POOL).stdout
    return [
        line.split()[0]
        for line in listing.splitlines()
        if line.split()[:1] in ([f"{name}.kernel"], [f"{name}.initrd"])
    ]


def test_debian_kernel_boots_to_userspace_and_is_removed_without_trace(
    lab: Lab, vm_name: str, tmp_path: Path
) -> None:
    client = BusClient(lab.daemon.address)
    try:
        client.current_objects()  # kdlabd keeps these answers: one is made now
        _boot_and_remove(lab, client, vm_name, tmp_path)
    finally:
        client.close()


def _boot_and_remove(lab: Lab, client: BusClient, vm_name: str, tmp_path: Path) -> None:
    create(lab, vm_name, "--cmdline", "loglevel=6")
    assert state(lab, vm_name) == "defined"
    path = client.vm_path(vm_name)
    assert client.current_objects()[path][VM_INTERFACE]["State"] == "defined"
    assert sorted(boot_volumes(vm_name)) == [f"{vm_name}.initrd", f"{vm_name}.kernel"]

    dumped = tmp_path / "domain.xml"
    dumped.write_text(virsh("dumpxml", f"kdlab-{vm_name}").stdout)
    validate = subprocess.run(
        ["virt-xml-validate", str(dumped), "domain"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert validate.returncode == 0, validate.stderr
    domain = etree.parse(str(dumped))
    assert domain.findtext("os/kernel", "").endswith(f"/{vm_name}.kernel")
    cmdline = domain.findtext("os/cmdline", "").split()
    assert {"loglevel=6", "console=ttyS0", "nokaslr"} <= set(cmdline)
    qemu_args = [
        a.get("value") for a in domain.iterfind("qemu:commandline/qemu:arg", QEMU_NS)
    ]
    assert "-gdb" in qemu_args

    started = lab.ctl("start", vm_name)
    assert started.returncode == 0, started.stderr
    assert state(lab, vm_name) == "running"
    log = wait_for_console(lab, vm_name, MARKER)
    assert f"{MARKER} {lab.kernel.release}" in log
    assert "Linux version" in log

    stopped = lab.ctl("stop", vm_name, "--force")
    assert stopped.returncode == 0, stopped.stderr
    assert state(lab, vm_name) == "stopped"
    assert MARKER in lab.ctl("logs", vm_name).stdout, (
        "the last boot's log stays readable"
    )

    assert client.current_objects()[path][VM_INTERFACE]["State"] == "stopped"
    deleted = lab.ctl("delete", vm_name)
    assert deleted.returncode == 0, deleted.stderr
    assert path not in client.current_objects()
    assert virsh("dominfo", f"kdlab-{vm_name}").returncode != 0
    assert boot_volumes(vm_name) == []
    assert not (lab.daemon.state_dir / "vms" / vm_name).exists()
    assert lab.ctl("show", vm_name).returncode == 4


def test_start_twice_is_refused_and_delete_of_running_vm_keeps_it(
    lab: Lab, vm_name: str
) -> None:
    create(lab, vm_name)
    assert lab.ctl("start", vm_name).returncode == 0
    again = lab.ctl("start", vm_name)
    assert again.returncode == 3, again.stderr
    assert "already running" in again.stderr
    refused = lab.ctl("delete", vm_name)
    assert refused.returncode == 3
    assert "stop it first" in refused.stderr
    assert virsh("domstate", f"kdlab-{vm_name}").stdout.strip() == "running"
    assert lab.ctl("delete", "--force", vm_name).returncode == 0
    assert virsh("dominfo", f"kdlab-{vm_name}").returncode != 0


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [
        ("/nonexistent/bzImage", "cannot open kernel"),
        ("/etc", "regular file"),
        ("/etc/hostname", "not an x86 bzImage"),
    ],
)
def test_bad_kernel_is_refused_and_leaves_nothing(
    lab: Lab, vm_name: str, kernel: str, expected: str
) -> None:
    result = lab.ctl("create", vm_name, "--kernel", kernel)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert virsh("dominfo", f"kdlab-{vm_name}").returncode != 0
    assert boot_volumes(vm_name) == []
    assert not (lab.daemon.state_dir / "vms" / vm_name).exists()


def test_bad_name_is_refused_and_leaves_nothing(lab: Lab) -> None:
    result = lab.ctl("create", "../etc", "--kernel", str(lab.kernel.vmlinuz))
    assert result.returncode == 2
    assert "invalid VM name" in result.stderr
    assert "kdlab-../etc" not in virsh("list", "--all", "--name").stdout


def test_logs_follow_a_boot_until_the_vm_stops_forced_after_the_timeout(
    lab: Lab, vm_name: str
) -> None:
    """``logs -f`` prints what a boot writes after it started and ends with the VM;
    ``stop`` pulls the plug after its timeout on a guest that ignores ACPI (the
    busybox initramfs runs no acpid, so the power button does nothing)."""
    create(lab, vm_name)
    assert lab.ctl("start", "--paused", vm_name).returncode == 0
    follower = subprocess.Popen(
        [sys.executable, "-m", "kdlabctl", "logs", "-f", vm_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ctl_env(lab.daemon.address),
    )
    assert follower.stdout is not None
    try:
        log = lab.daemon.state_dir / "vms" / vm_name / "console.log"
        deadline = time.monotonic() + 60
        while not holds_open(follower.pid, log) and time.monotonic() < deadline:
            assert follower.poll() is None, follower.communicate()
            time.sleep(0.1)
        assert holds_open(follower.pid, log), "logs -f never opened the log"
        # The CPUs ran no instruction before this: all the follower prints
        # comes after it started.
        assert virsh("resume", f"kdlab-{vm_name}").returncode == 0
        followed = read_until(follower.stdout.fileno(), MARKER, timeout=90)
        assert "Linux version" in followed

        stopped = lab.ctl("stop", vm_name, "--timeout", "3", timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert state(lab, vm_name) == "stopped"
        stops = [
            event
            for event in lab.daemon.events()
            if event.get("event") == "vm.stopped" and event.get("vm") == vm_name
        ]
        assert [event["forced"] for event in stops] == [True]
        # The follower ends by itself once the VM has stopped.
        rest, errors = follower.communicate(timeout=30)
        assert follower.returncode == 0, errors
        assert "reboot: Power down" not in followed + rest.decode(errors="replace")
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
