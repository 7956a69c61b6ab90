"""kdlabctl.client's logic: records from properties, options, and a Watch's
rule that a signal older than the read is dropped.

The Watch runs here against a stand-in for the bus (messages made by hand);
tests/bus/test_kdlabctl.py shows the same against kdlabd on a real bus.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from dbus_next import Message, MessageType, Variant

from kdlab.states import JobState, StopCause, VMState
from kdlab.wire import BUS_NAME, CREATE_OPTIONS, JOB_INTERFACE, MANAGER_PATH, job_path
from kdlabctl import output
from kdlabctl.asyncbus import GONE, Watch
from kdlabctl.client import (
    DBUS_NAME,
    OBJECT_MANAGER,
    PROPERTIES,
    VM,
    Image,
    Job,
    RemoteError,
)
from kdlabctl.options import VMOptions, variants
from kdlabctl.records import snake

# --- names and records -------------------------------------------------------------

SNAKE = [
    ("UUID", "uuid"),
    ("GdbStub", "gdb_stub"),
    ("APIRevision", "api_revision"),
    ("Name", "name"),
    ("State", "state"),
    ("Owner", "owner"),
    ("Cmdline", "cmdline"),
    ("Accel", "accel"),
    ("Created", "created"),
    ("OpenGdb", "open_gdb"),
    ("VMNew", "vm_new"),
    ("MemoryMiB", "memory_mib"),
    ("VCPUs", "vcpus"),
    ("UsedBy", "used_by"),
    ("WaitingForDebugger", "waiting_for_debugger"),
]


@pytest.mark.parametrize(("name", "expected"), SNAKE)
def test_snake(name: str, expected: str) -> None:
    assert snake(name) == expected


VM_PROPERTIES: dict[str, Any] = {
    "Name": "linux-6.9",
    "State": "paused",
    "UUID": "u",
    "Owner": 1000,
    "Cmdline": "console=ttyS0 nokaslr",
    "MemoryMiB": 512,
    "VCPUs": 2,
    "Accel": "tcg",
    "Created": 1_700_000_000_000_000,
    "GdbStub": "unix",
    "WaitingForDebugger": True,
    "KernelRelease": "6.9.0",
    "Vmlinux": "",
    "KernelPath": "/src/arch/x86/boot/bzImage",
    "Tree": "",
    "Diagnosis": ["", "", "", ""],
    "Booted": 1_700_000_000_500_000,
    "LastStop": "",
    "OnPanic": "dump-and-stop",
    "LatestDump": "/",
    "Checkpoints": [["ready", 1, 1 << 28, 7, "ab"]],
    "Run": "replay",
    "RunRecording": "/org/kdlab/Kdlab1/recording/linux_2d6_2e9_2drace",
    "Shares": {"src": "/src", "b": "/home/dev/b"},
    "Initramfs": "userspace",
}


def test_a_vm_record_has_the_properties_typed() -> None:
    vm = VM.from_properties(VM_PROPERTIES)
    assert vm.state is VMState.PAUSED
    assert vm.memory_mib == 512
    assert vm.waiting_for_debugger is True
    assert vm.diagnosis == ("", "", "", "")
    assert vm.last_stop is StopCause.NONE
    assert vm.checkpoints == (["ready", 1, 1 << 28, 7, "ab"],)
    # by tag, so that a record compares and hashes
    assert vm.shares == (("b", "/home/dev/b"), ("src", "/src"))


def test_a_job_and_an_image_record() -> None:
    job = Job.from_properties(
        {
            "Id": 3,
            "Kind": "import",
            "Target": "base",
            "Owner": 0,
            "Progress": 0.5,
            "Status": "uploading",
            "State": "failed",
            "Error": "org.kdlab.Kdlab1.Error.InvalidArgument",
        }
    )
    assert job.state is JobState.FAILED
    image = Image.from_properties(
        {
            "Name": "base",
            "Format": "qcow2",
            "Capacity": 1,
            "Allocation": 1,
            "Owner": 0,
            "UsedBy": ["a", "b"],
        }
    )
    assert image.used_by == ("a", "b")


def test_a_record_without_its_state_is_refused() -> None:
    """A state has no "nothing" value: every kdlabd has it."""
    incomplete = dict(VM_PROPERTIES)
    del incomplete["State"]
    with pytest.raises(KeyError, match="state"):
        VM.from_properties(incomplete)


def test_json_is_the_properties_in_snake_case() -> None:
    shown = json.loads(json.dumps(output.as_json(VM.from_properties(VM_PROPERTIES))))
    assert shown == {
        **{snake(key): value for key, value in VM_PROPERTIES.items()},
        "diagnosis": None,
    }


def test_options_leave_out_what_keeps_kdlabds_default() -> None:
    options = VMOptions(
        cmdline="", memory_mib=0, extra_disks=(1, 2), gdb=False, on_panic="ignore"
    )
    sent = variants({**options.__dict__, "kernel": 0}, CREATE_OPTIONS)
    assert {key: (v.signature, v.value) for key, v in sent.items()} == {
        "on_panic": ("s", "ignore"),
        "cmdline": ("s", ""),
        "memory_mib": ("u", 0),
        "extra_disks": ("at", [1, 2]),
        "gdb": ("b", False),
        "kernel": ("h", 0),
    }


# --- a Watch on a stand-in bus -----------------------------------------------------

KDLABD = ":1.7"  # kdlabd's unique name
PATH = job_path(3)
READ_SERIAL = 100  # kdlabd's serial of its reply to the Watch's read
JOB: dict[str, Any] = {
    "Id": 3,
    "Kind": "import",
    "Target": "base",
    "Owner": 0,
    "Progress": 0.25,
    "Status": "uploading",
    "State": "running",
    "Error": "",
}


class StandInBus:
    """What a Watch uses of dbus-next's MessageBus."""

    def __init__(self) -> None:
        self.handlers: list[Callable[[Message], Any]] = []
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add_message_handler(self, handler: Callable[[Message], Any]) -> None:
        self.handlers.append(handler)

    def remove_message_handler(self, handler: Callable[[Message], Any]) -> None:
        self.handlers.remove(handler)

    async def wait_for_disconnect(self) -> None:
        await self.lost

    def deliver(self, msg: Message) -> None:
        for handler in list(self.handlers):
            assert handler(msg) is None, "a handler must not swallow messages"


class StandInClient:
    """kdlabd answering the Watch's read of the job; the messages *ahead*
    reach the connection before the reply does."""

    def __init__(self, ahead: Sequence[Message] = ()) -> None:
        self.bus = StandInBus()
        self.rules: list[str] = []
        self.rules_at_read: list[str] = []
        self.ahead = ahead

    async def add_match(self, rule: str) -> None:
        self.rules.append(rule)

    async def remove_match(self, rule: str) -> None:
        self.rules.remove(rule)

    async def reply(self, *_call: Any) -> Message:
        self.rules_at_read = list(self.rules)
        for msg in self.ahead:
            self.bus.deliver(msg)
        body = [{key: Variant(_TYPES[key], value) for key, value in JOB.items()}]
        return Message(
            message_type=MessageType.METHOD_RETURN,
            reply_serial=1,
            sender=KDLABD,
            serial=READ_SERIAL,
            signature="a{sv}",
            body=body,
        )


_TYPES = {"Id": "u", "Owner": "u", "Progress": "d"} | dict.fromkeys(
    ("Kind", "Target", "Status", "State", "Error"), "s"
)


def progressed(serial: int, progress: float, sender: str = KDLABD) -> Message:
    """kdlabd's PropertiesChanged of the job's Progress."""
    return Message(
        message_type=MessageType.SIGNAL,
        path=PATH,
        interface=PROPERTIES,
        member="PropertiesChanged",
        sender=sender,
        serial=serial,
        signature="sa{sv}as",
        body=[JOB_INTERFACE, {"Progress": Variant("d", progress)}, []],
    )


def signal(sender: str, path: str, interface: str, member: str, *body: Any) -> Message:
    signature = {"Completed": "bs", "NameOwnerChanged": "sss"}.get(member, "oas")
    return Message(
        message_type=MessageType.SIGNAL,
        path=path,
        interface=interface,
        member=member,
        sender=sender,
        serial=READ_SERIAL + 50,
        signature=signature,
        body=list(body),
    )


def watch(client: StandInClient) -> Watch[Job]:
    return Watch(client, PATH, JOB_INTERFACE, Job, "Completed")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ahead", "expected"),
    [
        # Sent before kdlabd answered the read (which says 0.25): older.
        ([progressed(READ_SERIAL - 1, 0.1)], 0.25),
        # Sent after it, though the bus delivers it ahead of the reply.
        ([progressed(READ_SERIAL - 1, 0.1), progressed(READ_SERIAL + 1, 0.5)], 0.5),
        ([progressed(READ_SERIAL + 1, 0.5, sender=":1.99")], 0.25),  # not kdlabd
    ],
    ids=["older", "newer", "someone-else"],
)
def test_a_signal_counts_when_it_is_newer_than_the_read(
    ahead: list[Message], expected: float
) -> None:
    async def test() -> None:
        client = StandInClient(ahead)
        async with watch(client) as job:
            assert job.current.progress == expected
            client.bus.deliver(progressed(READ_SERIAL + 2, 0.75, sender=":1.99"))
            assert job.current.progress == expected, "someone else's signal"
            client.bus.deliver(progressed(READ_SERIAL + 3, 1.0))
            await job.changed(timeout=0)
            assert job.current.progress == 1.0
            assert not job.ended
        assert len(client.rules_at_read) == 3, "the rules come before the read"
        assert client.rules == [], "and go with the watch"
        assert client.bus.handlers == []

    asyncio.run(test())


@pytest.mark.parametrize(
    "end",
    [
        signal(KDLABD, PATH, JOB_INTERFACE, "Completed", False, "cancelled"),
        signal(KDLABD, MANAGER_PATH, OBJECT_MANAGER, "InterfacesRemoved", PATH, []),
    ],
    ids=["completed", "removed"],
)
def test_the_watch_ends_with_the_object(end: Message) -> None:
    async def test() -> None:
        client = StandInClient()
        async with watch(client) as job:
            other = job_path(4)
            client.bus.deliver(
                signal(
                    KDLABD, MANAGER_PATH, OBJECT_MANAGER, "InterfacesRemoved", other, []
                )
            )
            assert not job.ended, "another object went"
            client.bus.deliver(end)
            await job.changed(timeout=0)
            assert job.ended

    asyncio.run(test())


@pytest.mark.parametrize("how", ["name-lost", "disconnected"])
def test_a_watch_says_when_kdlabd_cannot_be_heard(how: str) -> None:
    async def test() -> None:
        client = StandInClient()
        async with watch(client) as job:
            if how == "name-lost":
                restarted = signal(
                    DBUS_NAME, "/", DBUS_NAME, "NameOwnerChanged", BUS_NAME, ":1.3", ""
                )
                client.bus.deliver(restarted)  # an old owner's: not ours
                await job.changed(timeout=0)
                lost = signal(
                    DBUS_NAME, "/", DBUS_NAME, "NameOwnerChanged", BUS_NAME, KDLABD, ""
                )
                client.bus.deliver(lost)
            else:
                client.bus.lost.set_exception(EOFError())
            with pytest.raises(RemoteError) as raised:
                await job.changed(timeout=1)
            assert raised.value.name == GONE

    asyncio.run(test())


def test_an_older_kdlabd_without_newer_properties_still_reads() -> None:
    """kdlabctl upgraded before kdlabd restarted: the properties kdlabd does not
    have yet read as nothing, not as a traceback."""
    older = {key: value for key, value in VM_PROPERTIES.items() if key == "State"}
    vm = VM.from_properties(older | {"Name": "old"})
    assert (vm.name, vm.state, vm.owner, vm.diagnosis) == (
        "old",
        VMState.PAUSED,
        0,
        ("", "", "", ""),
    )
    assert vm.waiting_for_debugger is False
