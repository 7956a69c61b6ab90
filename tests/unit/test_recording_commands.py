"""kdlabctl's record, replay and recording commands: command lines, the
options sent to kdlabd, how recordings are shown, and what an older kdlabd or
a missing recording is told as.

kdlabd answers here through a stand-in connection (calls in, replies out);
the daemon's side and real recordings are the bus and vm tiers'.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest

from kdlab.errors import NoSuchRecording, exit_code_for
from kdlab.wire import (
    MANAGER_PATH,
    RECORDING_INTERFACE,
    VM_INTERFACE,
    recording_path,
    vm_path,
)
from kdlabctl import recordings
from kdlabctl.cli import build_parser, cmd_record, cmd_replay, parse_args, run_fields
from kdlabctl.client import UNKNOWN_METHOD, Client, RemoteError
from kdlabctl.quickbus import Call, Reply, Variant
from kdlabctl.records import Recording
from tests.unit.test_client import VM_PROPERTIES
from tests.unit.test_notify import VMLINUX

RACE = recording_path("linux-6.9-race")
RACE_PROPERTIES: dict[str, Any] = {
    "Id": "linux-6.9-race",
    "VM": "linux-6.9",
    "VMUUID": "5f0c",
    "Owner": 0,
    "KernelRelease": "6.9.0",
    "Cmdline": "console=ttyS0 nokaslr",
    "Qemu": "7.2.0 (sha256 ab12)",
    "Instructions": 1_480_000_000,
    "Seconds": 12.25,
    "Ended": "panic",
    "Truncated": False,
    "Created": 1_700_000_000_000_000,
    "Size": 3 << 20,
    "State": "complete",
}


class StandIn:
    """kdlabd as a :class:`kdlabctl.client.Connection`: it answers GetVM,
    GetManagedObjects, GetAll and APIRevision, and *refuse* (a member's name
    to an error name) for the rest; every call is kept."""

    def __init__(self, refuse: dict[str, str] | None = None, revision: int = 8):
        self.calls: list[Call] = []
        self.refuse = refuse or {}
        self.revision = revision
        self.objects: dict[str, dict[str, dict[str, Variant]]] = {
            vm_path("linux-6.9"): {VM_INTERFACE: variants(VM_PROPERTIES)},
            RACE: {RECORDING_INTERFACE: variants(RACE_PROPERTIES)},
        }

    async def call(
        self,
        call: Call,
        *,
        unix_fds: Sequence[int] = (),  # noqa: ARG002 (the Connection's signature)
        no_autostart: bool = False,  # noqa: ARG002
    ) -> Reply:
        self.calls.append(call)
        if call.member in self.refuse:
            raise RemoteError(self.refuse[call.member], f"{call.member} refused")
        return Reply(self.answer(call), serial=len(self.calls))

    def answer(self, call: Call) -> list[Any]:
        if call.member == "GetAll":
            if call.path not in self.objects:
                raise RemoteError(
                    "org.freedesktop.DBus.Error.UnknownObject", "no interfaces"
                )
            return [self.objects[call.path][str(call.body[0])]]
        if call.member == "GetVM":
            return [vm_path(str(call.body[0]))]
        if call.member == "Replay":
            return [call.body[0]]
        return {
            "GetManagedObjects": [self.objects],
            "Get": [Variant("u", self.revision)],
            "Record": [RACE],
        }.get(call.member, [])

    def disconnect(self) -> None:
        pass

    def sent(self, member: str) -> Call:
        (found,) = [call for call in self.calls if call.member == member]
        return found


def variants(props: dict[str, Any]) -> dict[str, Variant]:
    return {key: Variant("?", value) for key, value in props.items()}


def options(call: Call, at: int = 0) -> dict[str, tuple[str, Any]]:
    """The a{sv} argument *at* of *call*: each key's type and value."""
    return {key: (v.signature, v.value) for key, v in call.body[at].items()}


def run(work: Any) -> Any:
    return asyncio.run(work)


# command lines


def test_record_takes_its_options_and_gdbs_after_attach() -> None:
    argv = ["record", "linux-6.9", "--as", "race", "--paused", "--single-cpu"]
    args = parse_args(build_parser(), [*argv, "--attach", "--", "-ex", "bt"])
    assert args.func is cmd_record
    assert (args.name, args.recording, args.paused, args.single_cpu) == (
        "linux-6.9",
        "race",
        True,
        True,
    )
    assert (args.attach, args.gdb_args) == (True, ["-ex", "bt"])


def test_replay_takes_a_recording_and_an_interval() -> None:
    args = parse_args(
        build_parser(), ["replay", "linux-6.9", "race", "--snapshot-interval", "0.5"]
    )
    assert args.func is cmd_replay
    assert (args.name, args.recording, args.snapshot_interval) == (
        "linux-6.9",
        "race",
        0.5,
    )
    args = parse_args(build_parser(), ["replay", "linux-6.9", "race"])
    assert args.snapshot_interval is None, "kdlabd's default"


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "vm", "race", "--snapshot-interval", "-1"],
        ["replay", "vm", "race", "--snapshot-interval", "nan"],
        ["replay", "vm", "race", "--snapshot-interval", "inf"],
        ["replay", "vm"],  # REC is needed
        ["record", "vm", "--", "-ex", "bt"],  # gdb's arguments without --attach
        ["recording", "delete"],
        ["recording", "show", "a", "b"],
    ],
)
def test_recording_command_mistakes_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(build_parser(), argv)
    assert exited.value.code == 2


def test_recording_group_commands() -> None:
    args = parse_args(build_parser(), ["recording", "list", "linux-6.9", "--json"])
    assert (args.func, args.name, args.json, args.plain) == (
        recordings.cmd_list,
        "linux-6.9",
        True,
        True,
    )
    args = parse_args(build_parser(), ["recording", "delete", "a", "b"])
    assert (args.func, args.recordings) == (recordings.cmd_delete, ["a", "b"])
    args = parse_args(build_parser(), ["recording", "show", "a"])
    assert (args.func, args.recording) == (recordings.cmd_show, "a")


# what kdlabd is sent


def test_record_sends_only_what_was_asked() -> None:
    bus = StandIn()
    path = run(Client(bus).record("linux-6.9"))
    assert path == RACE
    call = bus.sent("Record")
    assert (call.path, call.interface, call.signature) == (
        vm_path("linux-6.9"),
        VM_INTERFACE,
        "a{sv}",
    )
    assert options(call) == {}, "kdlabd's defaults: its name, not paused, refused"
    bus = StandIn()
    run(Client(bus).record("linux-6.9", recording_name="r", paused=True))
    assert options(bus.sent("Record")) == {"name": ("s", "r"), "paused": ("b", True)}
    bus = StandIn()
    run(Client(bus).record("linux-6.9", single_cpu=True))
    assert options(bus.sent("Record")) == {"single_cpu": ("b", True)}


def test_replay_sends_the_recordings_path_and_the_interval() -> None:
    bus = StandIn()
    run(Client(bus).replay("linux-6.9", "linux-6.9-race", snapshot_interval=0.0))
    call = bus.sent("Replay")
    assert (call.signature, call.body[0]) == ("oa{sv}", RACE)
    assert options(call, 1) == {"snapshot_interval": ("d", 0.0)}, "0: no snapshots"
    bus = StandIn()
    run(Client(bus).replay("linux-6.9", "linux-6.9-race"))
    assert options(bus.sent("Replay"), 1) == {}


# What a test calls on the client: a method's name and the call.
Calling = Callable[[Client], Coroutine[Any, Any, object]]
RECORD: Calling = lambda client: client.record("linux-6.9")  # noqa: E731
REPLAY: Calling = lambda client: client.replay("linux-6.9", "r")  # noqa: E731


@pytest.mark.parametrize(("member", "call"), [("Record", RECORD), ("Replay", REPLAY)])
def test_an_older_kdlabd_is_told_to_be_restarted(member: str, call: Calling) -> None:
    """kdlabd of APIRevision 7 (before recordings) answers UnknownMethod."""
    client = Client(StandIn(refuse={member: UNKNOWN_METHOD}, revision=7))
    with pytest.raises(RemoteError) as raised:
        run(call(client))
    message = raised.value.message
    assert f"kdlabd has no VM.{member}" in message
    assert "APIRevision 7" in message
    assert "systemctl restart kdlabd" in message


def test_an_unknown_method_of_a_current_kdlabd_is_its_own() -> None:
    client = Client(StandIn(refuse={"Record": UNKNOWN_METHOD}, revision=8))
    with pytest.raises(RemoteError, match="Record refused"):
        run(RECORD(client))


@pytest.mark.parametrize(
    ("call", "refused"),
    [
        # GetAll at a path with no object
        (lambda c: c.recording("nosuch"), "org.freedesktop.DBus.Error.UnknownObject"),
        # a method at a path with no object
        (lambda c: c.delete_recording("nosuch"), UNKNOWN_METHOD),
    ],
    ids=["show", "delete"],
)
def test_a_missing_recording_is_no_such_recording(call: Calling, refused: str) -> None:
    client = Client(StandIn(refuse={"Delete": refused}))
    with pytest.raises(RemoteError) as raised:
        run(call(client))
    assert raised.value.name == NoSuchRecording.dbus_name()
    assert exit_code_for(raised.value.name) == NoSuchRecording.exit_code
    assert "kdlabctl recording list" in raised.value.message


def test_recordings_are_completed_from_the_managed_objects() -> None:
    bus = StandIn()
    bus.objects[recording_path("a b")] = {RECORDING_INTERFACE: {}}
    assert run(Client(bus).names("recordings")) == ["a b", "linux-6.9-race"]
    assert bus.calls[-1].path == MANAGER_PATH


# how recordings are shown


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1K"),
        (12_345, "12.3K"),
        (999_499, "999K"),
        (999_999, "1M"),
        (1_480_000_000, "1.48G"),
        (7 * 10**15, "7000T"),
    ],
)
def test_instructions_are_counted_in_powers_of_1000(n: int, shown: str) -> None:
    assert recordings.count(n) == shown


def recording(**changes: object) -> Recording:
    return Recording.from_properties(RACE_PROPERTIES).replace(**changes)


def test_a_listing_row() -> None:
    assert recordings.row(recording()) == [
        "linux-6.9-race",
        "linux-6.9",
        "complete",
        "panic",
        "1.48G",
        "12.2",
        "3M",
        "2023-11-14 22:13:20 UTC",
    ]
    running = recording(state="recording", ended="", instructions=0, seconds=0.0)
    assert recordings.row(running)[2:6] == ["recording", "-", "0", "0.0"]
    truncated = recording(ended="limit", truncated=True)
    assert recordings.ended(truncated) == "limit (truncated)"


def test_list_filters_by_vm(capsys: pytest.CaptureFixture[str]) -> None:
    bus = StandIn()
    other = dict(RACE_PROPERTIES, Id="other", VM="other", Created=1)
    bus.objects[recording_path("other")] = {RECORDING_INTERFACE: variants(other)}
    args = argparse.Namespace(name=None, json=False)
    run(recordings.cmd_list(Client(bus), args))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == recordings.HEADERS
    assert [line.split()[0] for line in lines[1:]] == ["other", "linux-6.9-race"]
    args = argparse.Namespace(name="linux-6.9", json=False)
    run(recordings.cmd_list(Client(bus), args))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["linux-6.9-race"]


def test_show_prints_every_property(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(recording="linux-6.9-race", json=False)
    run(recordings.cmd_show(Client(StandIn()), args))
    shown = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert {key: value.strip() for key, value in shown.items()} == {
        "Id": "linux-6.9-race",
        "VM": "linux-6.9 (5f0c)",
        "Owner": "root (0)",
        "State": "complete",
        "Ended": "panic",
        "Kernel": "6.9.0",
        "Cmdline": "console=ttyS0 nokaslr",
        "QEMU": "7.2.0 (sha256 ab12)",
        "Instructions": "1.48G (1480000000)",
        "Seconds": "12.2",
        "Size": "3M",
        "Created": "2023-11-14 22:13:20 UTC",
    }


def test_delete_deletes_each_recording_named() -> None:
    bus = StandIn()
    args = argparse.Namespace(recordings=["a", "linux-6.9-race"])
    run(recordings.cmd_delete(Client(bus), args))
    deleted = [(c.path, c.interface) for c in bus.calls if c.member == "Delete"]
    assert deleted == [
        (recording_path("a"), RECORDING_INTERFACE),
        (RACE, RECORDING_INTERFACE),
    ]


def test_show_of_a_vm_tells_its_run_only_when_it_records_or_replays() -> None:
    assert run_fields(VMLINUX) == []
    replaying = VMLINUX.replace(run="replay", run_recording=RACE)
    assert run_fields(replaying) == [
        ("Run", "replay"),
        ("Recording", "linux-6.9-race"),
    ]


def test_the_hints_name_the_next_commands() -> None:
    told = recordings.record_hint("vm", "race", paused=False)
    assert "kdlabctl stop vm" in told
    assert "kdlabctl replay vm race" in told
    assert "kdlabctl gdb vm" in recordings.record_hint("vm", "race", paused=True)
    told = recordings.replay_hint("vm", "race")
    assert "paused before its first instruction" in told
    assert "kdlabctl gdb vm" in told
    assert "reverse-stepi" in told
