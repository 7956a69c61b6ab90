"""Commands run in a guest (VM.Exec, org.kdlab.Kdlab1.Process, kdlabctl exec).

The bus tier has no guest: the real agent serves the running VM "busy"'s
exec channel as nobody (tests/bus/guestagent.py), so kdlabd, the protocol,
the agent and kdlabctl run for real; the vm tier runs the same through a
guest's virtio-serial port.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from kdlab.errors import (
    EXIT_TIMEOUT,
    ExecFailed,
    InvalidArgument,
    InvalidState,
    NoAgent,
    NotAuthorized,
)
from kdlab.wire import PROCESS_INTERFACE, VM_INTERFACE
from tests.bus.conftest import Ctl
from tests.bus.guestagent import GuestAgent
from tests.support.bus import PROPERTIES, BusClient, PrivateBus
from tests.support.clients import (
    NOBODY,
    client_env,
    kdlabctl_argv,
    read_until,
)
from tests.support.testdriver import Lab

pytestmark = pytest.mark.bus

VM = "busy"  # running, uid 1000's: root acts on it with manage-others


def kdlabd_rss_kib(lab: Lab) -> int:
    status = Path(f"/proc/{lab.daemon.pid}/status").read_text()
    (line,) = [ln for ln in status.splitlines() if ln.startswith("VmRSS:")]
    return int(line.split()[1])


@pytest.mark.usefixtures("guest")
def test_exec_prints_both_streams_and_exits_with_the_status(ctl: Ctl) -> None:
    done = ctl("exec", VM, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "out\n", "err\n")


@pytest.mark.usefixtures("guest")
def test_a_command_that_closes_its_output_runs_to_its_own_end(ctl: Ctl) -> None:
    # Its output ends (kdlabd closes both pipes) while it runs on, longer than
    # kdlabd takes to look for a caller that went away: the caller is still
    # there, waiting for its status.
    done = ctl("exec", VM, "--", "sh", "-c", "exec >&- 2>&-; sleep 2.5; exit 3")
    assert (done.returncode, done.stderr) == (3, "")


@pytest.mark.usefixtures("guest")
def test_a_command_whose_caller_died_is_killed(bus: PrivateBus) -> None:
    script = "echo $$; exec sleep 60"
    argv = kdlabctl_argv(bus.address, "exec", VM, "--", "sh", "-c", script)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, env=client_env()) as caller:
        assert caller.stdout is not None
        command = int(caller.stdout.readline())
        caller.kill()  # no signal forwarded: only its closed pipes tell kdlabd
    deadline = time.monotonic() + 30
    while Path(f"/proc/{command}").exists():
        assert time.monotonic() < deadline, "the command outlived its caller"
        time.sleep(0.2)


@pytest.mark.usefixtures("guest")
def test_exec_carries_64_mib_of_binary_output_intact(bus: PrivateBus) -> None:
    script = (
        "head -c 67108864 /dev/urandom > /tmp/kdlab-exec-$$; "
        "sha256sum < /tmp/kdlab-exec-$$ >&2; cat /tmp/kdlab-exec-$$; "
        "rm /tmp/kdlab-exec-$$"
    )
    done = subprocess.run(
        kdlabctl_argv(bus.address, "exec", VM, "--", "sh", "-c", script),
        capture_output=True,
        env=client_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == 64 << 20
    assert done.stderr.split()[0].decode() == hashlib.sha256(done.stdout).hexdigest()


@pytest.mark.usefixtures("guest")
def test_exec_feeds_stdin_from_a_pipe_and_from_a_file(
    bus: PrivateBus, tmp_path: Path
) -> None:
    data = os.urandom(8 << 20)
    argv = kdlabctl_argv(bus.address, "exec", VM, "--", "sha256sum")
    piped = subprocess.run(
        argv, input=data, capture_output=True, env=client_env(), timeout=60, check=False
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    file = tmp_path / "input"
    file.write_bytes(data[:12345])
    with file.open("rb") as stdin:
        from_file = subprocess.run(
            argv,
            stdin=stdin,
            capture_output=True,
            env=client_env(),
            timeout=60,
            check=False,
        )
    assert from_file.returncode == 0, from_file.stderr
    expected = hashlib.sha256(data[:12345]).hexdigest()
    assert from_file.stdout.split()[0].decode() == expected


@pytest.mark.usefixtures("guest")
def test_eight_execs_run_at_once(bus: PrivateBus) -> None:
    started = [
        subprocess.Popen(
            kdlabctl_argv(
                bus.address, "exec", VM, "--", "sh", "-c", f"sleep 1; echo {i}"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=client_env(),
        )
        for i in range(8)
    ]
    outputs = [p.communicate(timeout=60) for p in started]
    assert [p.returncode for p in started] == [0] * 8
    assert [out.decode() for out, _ in outputs] == [f"{i}\n" for i in range(8)]


@pytest.mark.usefixtures("guest")
def test_a_timeout_kills_the_command_and_says_so(ctl: Ctl) -> None:
    done = ctl("exec", VM, "--timeout", "1", "--", "sleep", "100")
    assert done.returncode == EXIT_TIMEOUT, done.stderr
    assert "ran past --timeout 1 and was killed" in done.stderr


@pytest.mark.usefixtures("guest")
def test_ctrl_c_is_delivered_to_the_command(bus: PrivateBus) -> None:
    script = (
        "trap 'echo interrupted; exit 3' INT; echo ready; while :; do sleep 0.1; done"
    )
    running = subprocess.Popen(
        kdlabctl_argv(bus.address, "exec", VM, "--", "sh", "-c", script),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=client_env(),
    )
    assert running.stdout is not None
    assert running.stdout.readline() == b"ready\n"
    running.send_signal(signal.SIGINT)
    out, err = running.communicate(timeout=30)
    assert (running.returncode, out) == (3, b"interrupted\n"), err


@pytest.mark.usefixtures("guest")
def test_a_missing_command_is_exec_failed_with_the_guests_words(ctl: Ctl) -> None:
    done = ctl("exec", VM, "--", "/no/such/program")
    assert done.returncode == ExecFailed.exit_code
    assert "/no/such/program" in done.stderr
    assert "No such file or directory" in done.stderr


@pytest.mark.usefixtures("kdlabd")
def test_without_an_agent_exec_is_no_agent_and_says_what_to_do(ctl: Ctl) -> None:
    done = ctl("exec", VM, "--", "true")
    assert done.returncode == NoAgent.exit_code, done.stderr
    assert "exec channel" in done.stderr or "agent" in done.stderr


@pytest.mark.usefixtures("guest")
def test_exec_refuses_what_cannot_run(ctl: Ctl) -> None:
    paused = ctl("exec", "frozen", "--", "true")
    assert paused.returncode == InvalidState.exit_code
    assert "paused" in paused.stderr
    stopped = ctl("exec", "idle", "--", "true")
    assert stopped.returncode == InvalidState.exit_code
    bad_env = ctl("exec", VM, "--env", "NOEQUALS", "--", "true")
    assert bad_env.returncode == InvalidArgument.exit_code
    no_command = ctl("exec", VM)
    assert no_command.returncode == InvalidArgument.exit_code


@pytest.mark.usefixtures("guest")
def test_env_and_cwd_reach_the_command(ctl: Ctl) -> None:
    done = ctl(
        "exec",
        VM,
        "--env",
        "KDLAB_X=a b",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo "$KDLAB_X"; pwd',
    )
    assert (done.returncode, done.stdout) == (0, "a b\n/tmp\n"), done.stderr


def test_a_caller_that_does_not_read_stalls_only_its_own_command(
    kdlabd: Lab, guest: GuestAgent, bus: PrivateBus, ctl: Ctl
) -> None:
    """Back-pressure: 1 GiB offered to a caller that reads nothing stays in
    the guest; kdlabd holds a window of it, and serves others meanwhile."""
    before = kdlabd_rss_kib(kdlabd)
    read_end, write_end = os.pipe()
    stalled = subprocess.Popen(
        kdlabctl_argv(bus.address, "exec", VM, "--", "head", "-c", "1G", "/dev/zero"),
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=client_env(),
    )
    os.close(write_end)
    try:
        time.sleep(3)  # let it push what it can
        other = ctl("exec", VM, "--", "echo", "meanwhile")
        assert (other.returncode, other.stdout) == (0, "meanwhile\n")
        grown = kdlabd_rss_kib(kdlabd) - before
        assert grown < 32 * 1024, f"kdlabd grew by {grown} KiB for an unread stream"
        assert stalled.poll() is None, "the command waits for its reader"
    finally:
        os.close(read_end)  # the reader leaves: SIGPIPE, as in a local pipe
        stalled.wait(timeout=30)
    assert stalled.returncode == 128 + signal.SIGPIPE
    assert guest.pids, "the agent lives on"


def test_process_object_reports_the_end_and_refuses_strangers(
    guest: GuestAgent, client: BusClient, bus: PrivateBus
) -> None:
    reply = client.call(
        client.vm_path(VM),
        VM_INTERFACE,
        "Exec",
        "asa{sv}",
        [["sleep", "100"], {}],
    )
    assert reply.error_name is None, reply.body
    stdout, stderr, path = reply.body
    for index in (stdout, stderr):
        os.close(reply.unix_fds[index])

    def prop(name: str) -> object:
        (value,) = client.ok(path, PROPERTIES, "Get", "ss", [PROCESS_INTERFACE, name])
        return value.value

    assert prop("State") == "running"
    assert prop("Argv") == ["sleep", "100"]
    assert prop("Pid") in guest_children(guest)
    refused = subprocess.run(
        [
            *NOBODY.setpriv(),
            "gdbus",
            "call",
            "--address",
            bus.address,
            "--dest",
            "org.kdlab.Kdlab1",
            "--object-path",
            path,
            "--method",
            f"{PROCESS_INTERFACE}.Kill",
        ],
        capture_output=True,
        text=True,
        env=client_env(),
        timeout=30,
        check=False,
    )
    assert refused.returncode != 0
    assert NotAuthorized.dbus_name() in refused.stderr
    assert prop("State") == "running"
    client.ok(path, PROCESS_INTERFACE, "Signal", "i", [signal.SIGTERM])
    client.wait_until(lambda: prop("State") == "exited", timeout=15)
    assert (prop("How"), prop("ExitSignal")) == ("signaled", signal.SIGTERM)


def guest_children(guest: GuestAgent) -> set[int]:
    """Processes the agents started (their pids, as the guest sees them)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if ppid in guest.pids:
                found.add(int(entry.name))
    return found


@pytest.mark.usefixtures("guest")
def test_a_terminal_for_the_command_and_ctrl_c_typed_on_it(bus: PrivateBus) -> None:
    """``-t``: the command has a terminal of its own, of kdlabctl's size;
    Ctrl-C typed on kdlabctl's (raw) terminal interrupts it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    script = (
        "tty; stty size; trap 'echo got-INT; exit 5' INT; echo ready; "
        "while :; do sleep 0.1; done"
    )
    proc = subprocess.Popen(
        kdlabctl_argv(bus.address, "exec", VM, "-t", "--", "sh", "-c", script),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=client_env(),
        start_new_session=True,
    )
    os.close(follower)
    try:
        seen = read_until(leader, "ready", 30)
        assert "/dev/pts/" in seen
        assert "33 101" in seen
        os.write(leader, b"\x03")
        seen += read_until(leader, "got-INT", 30)
        assert proc.wait(timeout=30) == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


@pytest.mark.usefixtures("guest")
def test_a_terminal_without_one_of_kdlabctls_own(ctl: Ctl) -> None:
    """``-t`` with kdlabctl's stdio not a terminal: the command still gets
    one, of 24x80."""
    done = ctl("exec", VM, "-t", "--", "sh", "-c", "tty; stty size")
    assert done.returncode == 0, done.stderr
    assert "/dev/pts/" in done.stdout
    assert "24 80" in done.stdout
