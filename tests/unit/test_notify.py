"""What ``kdlabctl notify`` tells, and how it knows it told it already."""

from __future__ import annotations

import sys

import pytest

from kdlab.states import JobState, StopCause, VMState
from kdlabctl.notify import (
    CRITICAL,
    NORMAL,
    Event,
    Seen,
    action_argv,
    job_event,
    vm_events,
)
from kdlabctl.records import VM, Job

PANIC = ("kernel-panic", "error", "kernel panic", "its owner reads the report")
VMLINUX = VM(
    name="linux",
    state=VMState.RUNNING,
    uuid="5f0c",
    owner=1000,
    cmdline="console=ttyS0",
    memory_mib=256,
    vcpus=1,
    accel="tcg",
    created=1,
    gdb_stub="unix",
    waiting_for_debugger=False,
    kernel_release="6.1",
    vmlinux="",
    kernel_path="",
    tree="",
    diagnosis=("", "", "", ""),
    booted=1_700_000_000_000_000,
    last_stop=StopCause.NONE,
    on_panic="dump-and-stop",
    latest_dump="/",
    checkpoints=(),
    run="",
    run_recording="/",
    initramfs="",
    shares=(),
)


def vm(**changes: object) -> VM:
    return VMLINUX.replace(**changes)


def test_a_healthy_vm_tells_nothing() -> None:
    assert vm_events(vm()) == []
    warned = ("kernel-warning", "warning", "the kernel warned", "")
    assert vm_events(vm(diagnosis=warned)) == []


def test_a_panic_is_critical_names_the_vm_and_offers_console_gdb_page() -> None:
    (event,) = vm_events(vm(diagnosis=PANIC))
    assert event.key == ("diagnosis", "5f0c", "1700000000000000", "kernel-panic")
    assert event.summary == "linux: kernel panic"
    assert "kernel-panic" in event.body
    assert event.urgency == CRITICAL
    assert event.actions == ("console", "gdb", "page")


def test_a_boot_error_is_told_without_gdb_when_there_is_no_stub() -> None:
    root = ("root-device-missing", "error", "the root device does not exist", "fix")
    (event,) = vm_events(vm(diagnosis=root, gdb_stub="off"))
    assert event.urgency == NORMAL
    assert event.actions == ("console", "page")


@pytest.mark.parametrize("how", ["guest", "crashed", "killed", "unknown"])
def test_a_stop_nobody_asked_for_is_told(how: str) -> None:
    (event,) = vm_events(vm(state=VMState.STOPPED, last_stop=StopCause(how)))
    assert event.key == ("stop", "5f0c", "1700000000000000", how)
    assert event.summary == "linux stopped unexpectedly"
    assert event.actions == ("page",), "an off VM has no console"


def test_a_requested_stop_is_not_told() -> None:
    assert vm_events(vm(state=VMState.STOPPED, last_stop=StopCause.REQUESTED)) == []


def test_one_event_per_vm_boot_and_code() -> None:
    """The same panic seen again (kdlabd restarted, the diagnosis came back)
    is the same event; the next boot's panic, or another VM's, is another."""
    seen = Seen()
    (first,) = vm_events(vm(diagnosis=PANIC))
    assert seen.first_time(first)
    assert not seen.first_time(vm_events(vm(diagnosis=PANIC, state=VMState.PAUSED))[0])
    assert seen.first_time(vm_events(vm(diagnosis=PANIC, booted=VMLINUX.booted + 1))[0])
    assert seen.first_time(vm_events(vm(diagnosis=PANIC, uuid="other"))[0])
    oops = ("kernel-oops", "error", "kernel oops", "")
    assert seen.first_time(vm_events(vm(diagnosis=oops))[0])


JOB = Job(
    id=3,
    kind="build",
    target="bookworm",
    owner=1000,
    progress=1.0,
    status="built bookworm",
    state=JobState.SUCCEEDED,
    error="",
)


def test_a_job_is_told_when_it_ends_keyed_by_the_kdlabd_that_ran_it() -> None:
    assert job_event(JOB.replace(state=JobState.RUNNING), ":1.5") is None
    done = job_event(JOB, ":1.5")
    assert done is not None
    assert (done.summary, done.body) == ("image bookworm: build done", "built bookworm")
    failed = JOB.replace(
        state=JobState.FAILED, error="org.kdlab.Kdlab1.Error.HypervisorError"
    )
    told = job_event(failed, ":1.5", "mke2fs failed")
    assert told is not None
    assert told.body == "mke2fs failed (org.kdlab.Kdlab1.Error.HypervisorError)"
    assert told.urgency == CRITICAL
    # Job numbers start again with each kdlabd: job 3 of the next is new.
    again = job_event(JOB, ":1.9")
    assert again is not None
    assert again.key != done.key


def argv(action: str, env: dict[str, str]) -> list[str] | None:
    event = Event(("k",), "s", "b", vm="linux")
    return action_argv(action, event, bus="system", page_url="http://h/kdlab", env=env)


def test_actions_run_a_terminal_or_xdg_open() -> None:
    # --host= : the bus given is the one to use ($KDLAB_HOST would send it on).
    ctl = [sys.executable, "-m", "kdlabctl", "--bus", "system", "--host="]
    assert argv("console", {"TERMINAL": "foot --app-id kdlab"}) == [
        "foot", "--app-id", "kdlab", "-e", *ctl, "console", "linux"
    ]  # fmt: skip
    assert argv("gdb", {}) == ["x-terminal-emulator", "-e", *ctl, "gdb", "linux"]
    page = ["xdg-open", "http://h/kdlab#/vm/linux"]
    assert argv("page", {}) == page
    assert argv("default", {}) == page
    assert argv("bogus", {}) is None
