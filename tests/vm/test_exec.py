"""Commands run in a real guest (kdlabctl exec), on real libvirt under TCG.

One VM of Debian's cloud kernel, booted once for the module: kdlab's
userspace initramfs starts the agent on the virtio-serial port (a module
of that kernel), and every test runs commands through it. ``up --run``
boots the minimal tree of its own.
"""

from __future__ import annotations

import hashlib
import os
import pty
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.errors import EXIT_LOST, EXIT_TIMEOUT, ExecFailed, InvalidState
from tests.support.clients import client_env, kdlabctl_argv, read_until
from tests.support.system import remove_vm
from tests.vm.conftest import Lab

pytestmark = pytest.mark.vm

BOOT_WAIT = "300"  # seconds for a TCG boot to reach the agent


@pytest.fixture(scope="module")
def guest(lab: Lab) -> Iterator[str]:
    """A running VM of the cloud kernel whose agent answers."""
    name = f"vmt-exec-{os.getpid()}"
    created = lab.ctl(
        "create", name, "--kernel", str(lab.kernel.vmlinuz), "--memory", "384"
    )
    assert created.returncode == 0, created.stderr
    try:
        assert lab.ctl("start", name).returncode == 0
        up = lab.ctl("exec", name, "--wait", BOOT_WAIT, "--", "true", timeout=400)
        assert up.returncode == 0, up.stderr
        yield name
    finally:
        remove_vm(lab.daemon, name)


def run(
    lab: Lab, *args: str, data: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """kdlabctl with binary stdio (*data* on its stdin; else none)."""
    return subprocess.run(
        kdlabctl_argv(lab.daemon.address, *args),
        input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
        capture_output=True,
        env=client_env(),
        timeout=timeout,
        check=False,
    )


def test_both_streams_and_the_exit_status(lab: Lab, guest: str) -> None:
    done = run(lab, "exec", guest, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, b"out\n", b"err\n")


def test_64_mib_through_stdout_arrive_intact(lab: Lab, guest: str) -> None:
    script = (
        "head -c 67108864 /dev/urandom > /tmp/big && "
        "sha256sum /tmp/big >&2 && cat /tmp/big && rm /tmp/big"
    )
    done = run(lab, "exec", guest, "--", "sh", "-c", script, timeout=600)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == 64 << 20
    assert done.stderr.split()[0].decode() == hashlib.sha256(done.stdout).hexdigest()


def test_stdin_reaches_the_command_intact(lab: Lab, guest: str) -> None:
    data = os.urandom(4 << 20)
    done = run(lab, "exec", guest, "--", "sha256sum", data=data, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_eight_execs_at_once(lab: Lab, guest: str) -> None:
    started = [
        subprocess.Popen(
            kdlabctl_argv(
                lab.daemon.address, "exec", guest, "--", "sh", "-c",
                f"sleep 2; echo {i}; exit {i}",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=client_env(),
        )
        for i in range(8)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=120)[0] for p in started]
    assert [p.returncode for p in started] == list(range(8))
    assert outputs == [f"{i}\n".encode() for i in range(8)]


def test_a_timeout_kills_the_command_and_says_so(lab: Lab, guest: str) -> None:
    done = run(lab, "exec", guest, "--timeout", "2", "--", "sleep", "600")
    assert done.returncode == EXIT_TIMEOUT
    assert b"ran past --timeout 2 and was killed" in done.stderr
    left = run(lab, "exec", guest, "--", "sh", "-c", "pgrep -x 'sleep' || true")
    assert left.stdout == b"", "the guest's sleep was killed"


def test_errors_keep_their_codes(lab: Lab, guest: str) -> None:
    missing = run(lab, "exec", guest, "--", "/no/such/program")
    assert missing.returncode == ExecFailed.exit_code
    assert b"No such file or directory" in missing.stderr


def test_ctrl_c_and_a_terminal(lab: Lab, guest: str) -> None:
    """``-t``: the command has a terminal in the guest; Ctrl-C typed on
    kdlabctl's terminal interrupts it there."""
    leader, follower = pty.openpty()
    script = (
        "tty; trap 'echo got-INT; exit 5' INT; echo ready; while :; do sleep 0.2; done"
    )
    proc = subprocess.Popen(
        kdlabctl_argv(lab.daemon.address, "exec", guest, "-t", "--", "sh", "-c",
                      script),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=client_env(),
        start_new_session=True,
    )  # fmt: skip
    os.close(follower)
    try:
        seen = read_until(leader, "ready", timeout=60)
        assert "/dev/pts/" in seen
        os.write(leader, b"\x03")
        read_until(leader, "got-INT", timeout=60)
        assert proc.wait(timeout=60) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


def test_a_command_outlives_no_vm(lab: Lab, vm_name: str) -> None:
    """The VM stops under a running command: kdlabctl exits 255 and says so;
    a stopped VM runs nothing (InvalidState)."""
    created = lab.ctl(
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz), "--memory", "256"
    )
    assert created.returncode == 0, created.stderr
    assert lab.ctl("start", vm_name).returncode == 0
    running = subprocess.Popen(
        kdlabctl_argv(
            lab.daemon.address, "exec", vm_name, "--wait", BOOT_WAIT, "--",
            "sh", "-c", "echo started; sleep 600",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )  # fmt: skip
    assert running.stdout is not None
    assert running.stdout.readline() == b"started\n"
    assert lab.ctl("stop", vm_name, "--force").returncode == 0
    _out, err = running.communicate(timeout=60)
    assert running.returncode == EXIT_LOST, err
    assert b"the VM stopped" in err
    stopped = run(lab, "exec", vm_name, "--", "true")
    assert stopped.returncode == InvalidState.exit_code


def test_up_run_prints_the_trees_version_and_stops(
    lab: Lab, vm_name: str, minimal_build: Path
) -> None:
    done = run(
        lab, "up", str(minimal_build), "--name", vm_name, "--run",
        "cat /proc/version; exit 3", timeout=600,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith(b"Linux version 6.1"), done.stdout
    shown = lab.ctl("show", vm_name, "--json")
    assert '"state": "stopped"' in shown.stdout


def test_a_restarted_kdlabd_runs_commands_again(lab: Lab, guest: str) -> None:
    """kdlabd's connection to the agent is per kdlabd: a new one greets the
    agent again, which drops what the old one left."""
    lab.daemon.stop()
    lab.daemon.start()
    done = run(lab, "exec", guest, "--", "echo", "again")
    assert (done.returncode, done.stdout) == (0, b"again\n"), done.stderr


def test_signal_goes_to_the_guest_command(lab: Lab, guest: str) -> None:
    proc = subprocess.Popen(
        kdlabctl_argv(lab.daemon.address, "exec", guest, "--", "sh", "-c",
                      "trap 'echo got-TERM; exit 4' TERM; echo ready; "
                      "while :; do sleep 0.2; done"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (4, b"got-TERM\n"), err
