"""kdlabd in polkit mode, against a mock polkit authority that records every request.

The mock is a dbus-next service owning org.freedesktop.PolicyKit1 on a private
bus of its own (kdlab's shipped policy, plus a policy that lets root own that
name and anyone call it). It answers CheckAuthorization as the test says: yes,
no, a challenge, an error, or never. kdlabd chooses polkit mode when it
starts, so it starts after the mock owns its name.

The bus has a reply timeout (``REPLY_TIMEOUT_MS``), as a system bus may: a
call unanswered that long gets ``Error.NoReply`` from the bus, which kdlabd
must take as a no.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus
from lxml import etree

from kdlab.errors import HypervisorError, NotAuthorized
from kdlab.wire import MANAGER_PATH, dump_path, image_path, recording_path, vm_path
from kdlabd.bus.auth import Action
from tests.bus.contract import DUMP, IMAGE, JOB, MANAGER, PROCESS, RECORDING, VM
from tests.bus.guestagent import running_command
from tests.bus.test_security import INSPECT_METHODS, Walk, calls_as, method_walks
from tests.support import figures
from tests.support.bus import (
    DBUS_NAME,
    DBUS_PATH,
    PROPERTIES,
    SHIPPED_POLICY,
    BusClient,
    PrivateBus,
)
from tests.support.clients import NOBODY
from tests.support.testdriver import DUMPS, RECORDINGS, VMS, Lab

pytestmark = pytest.mark.bus

POLKIT_NAME = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY = "org.freedesktop.PolicyKit1.Authority"
REPLY_TIMEOUT_MS = 1500
ALLOW_USER_INTERACTION = 1
NOT_AUTHORIZED = NotAuthorized.dbus_name()
NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
NEVER_WAIT = 3.0  # how long a caller waits for kdlabd when polkit never answers
ALL_BUT_OTHERS = {action.value: action is not Action.MANAGE_OTHERS for action in Action}

REPLIES = figures.ErrorReplies()


@pytest.fixture(scope="module", autouse=True)
def _traceback_figure() -> Iterator[None]:
    yield
    assert REPLIES.record("tests/bus/test_polkit.py").met


def polkit_policy(
    directory: Path, reply_timeout_ms: int | None = REPLY_TIMEOUT_MS
) -> Path:
    """kdlab's shipped policy, plus: root owns polkit's name, anyone calls it."""
    config = etree.Element("busconfig")
    etree.SubElement(config, "include").text = str(SHIPPED_POLICY)
    root = etree.SubElement(config, "policy", user="root")
    etree.SubElement(root, "allow", own=POLKIT_NAME)
    default = etree.SubElement(config, "policy", context="default")
    etree.SubElement(default, "allow", send_destination=POLKIT_NAME)
    if reply_timeout_ms is not None:
        limit = etree.SubElement(config, "limit", name="reply_timeout")
        limit.text = str(reply_timeout_ms)
    path = directory / "polkit-mock.conf"
    path.write_bytes(etree.tostring(config))
    return path


# --- the mock authority ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One CheckAuthorization as the mock received it."""

    kind: str
    subject: dict[str, Any]
    action: str
    flags: int
    uid: int  # whose bus name the subject is, as the bus daemon tells the mock


class MockPolkit:
    """A polkit authority on an event loop thread of its own, answering
    CheckAuthorization((sa{sv})sa{ss}us) -> (bba{ss}).

    ``mode``: "yes", "no", "challenge" (not authorized, but an authentication
    agent could change that), "error" (a D-Bus error), "never" (no reply), or
    a dict from action id to yes/no.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.mode: str | dict[str, bool] = "yes"
        self.requests: list[Request] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._bus: MessageBus | None = None
        self._release = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> MockPolkit:
        self._thread.start()
        self._run(self._connect())
        return self

    def stop(self) -> None:
        """Answer what is held (with an error), leave the bus, end the thread."""
        self._run(self._disconnect(release=True))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def crash(self) -> None:
        """Leave the bus at once, answering nothing that is held."""
        self._run(self._disconnect(release=False))

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _connect(self) -> None:
        self._bus = await MessageBus(bus_address=self.address).connect()
        self._bus.add_message_handler(self._dispatch)
        await self._bus.request_name(POLKIT_NAME)

    async def _disconnect(self, *, release: bool) -> None:
        if release:
            self._release.set()
            await asyncio.sleep(0)
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    def _dispatch(self, msg: Message) -> bool | None:
        """Take CheckAuthorization calls; the answer is sent when it is decided."""
        if (msg.message_type, msg.path, msg.interface, msg.member) != (
            MessageType.METHOD_CALL,
            AUTHORITY_PATH,
            AUTHORITY,
            "CheckAuthorization",
        ):
            return None
        task = self._loop.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _answer(self, msg: Message) -> None:
        (kind, fields), action, _details, flags, _cancellation = msg.body
        subject = {key: variant.value for key, variant in fields.items()}
        uid = await self._uid(subject.get("name"))
        self.requests.append(Request(kind, subject, action, flags, uid))
        mode = self.mode
        if mode == "never":
            await self._release.wait()
            return
        assert self._bus is not None
        if mode == "error":
            reply = Message.new_error(
                msg, f"{POLKIT_NAME}.Error.Failed", "the mock polkit failed"
            )
        else:
            allowed = (
                mode.get(action, False) if isinstance(mode, dict) else mode == "yes"
            )
            reply = Message.new_method_return(
                msg, "(bba{ss})", [[allowed, mode == "challenge", {}]]
            )
        await self._bus.send(reply)

    async def _uid(self, name: str | None) -> int:
        assert self._bus is not None
        reply = await self._bus.call(
            Message(destination=DBUS_NAME, path=DBUS_PATH, interface=DBUS_NAME,
                    member="GetConnectionUnixUser", signature="s", body=[name or ""])
        )  # fmt: skip
        ok = reply is not None and reply.message_type is MessageType.METHOD_RETURN
        return int(reply.body[0]) if ok and reply is not None else -1


# --- fixtures: the bus, the mock, kdlabd, a root client -------------------------------


@pytest.fixture(scope="module")
def polkit_bus(public_dir: Path) -> Iterator[PrivateBus]:
    directory = public_dir / "polkit-bus"
    directory.mkdir(mode=0o755)
    bus = PrivateBus(directory, polkit_policy(directory)).start()
    yield bus
    bus.stop()


@dataclass
class PolkitLab:
    """kdlabd in polkit mode, the mock it asks, and a root client."""

    bus: PrivateBus
    polkit: MockPolkit
    lab: Lab
    root: BusClient
    scratch: Path

    def asked(self, walk: Walk) -> tuple[str, list[str]]:
        """Make *walk* as root: the outcome and the actions polkit was asked about."""
        before = len(self.polkit.requests)
        result = call(self.root, walk)
        return result, [request.action for request in self.polkit.requests[before:]]

    def state(self, name: str) -> str:
        """The VM's State property (Properties.Get: no polkit involved)."""
        (state,) = self.root.ok(vm_path(name), PROPERTIES, "Get", "ss", [VM, "State"])
        return str(state.value)

    def vm(self, name: str, member: str) -> Walk:
        """A VM method call with default options (Stop: force)."""
        path = vm_path(name)  # GetVM would ask polkit too
        if member not in ("Start", "Stop"):
            return Walk(path, VM, member, "", [])
        options = {"force": Variant("b", True)} if member == "Stop" else {}
        return Walk(path, VM, member, "a{sv}", [options])


@pytest.fixture
def pk(polkit_bus: PrivateBus, workdir: Path) -> Iterator[PolkitLab]:
    """The mock owns polkit's name first; kdlabd starts then, on the fleet."""
    mock = MockPolkit(polkit_bus.address).start()
    lab = Lab(polkit_bus, workdir)
    lab.populate()
    try:
        lab.start()
        assert '"polkit": true' in lab.daemon.log(), "kdlabd chose no polkit mode"
        root = BusClient(polkit_bus.address)
        try:
            yield PolkitLab(polkit_bus, mock, lab, root, workdir)
        finally:
            root.close()
    finally:
        mock.stop()
        if lab.daemon.started:
            lab.stop_cleanly()


def call(client: BusClient, walk: Walk) -> str:
    """Make *walk* as *client*: "return" or the error name."""
    fds = [os.open(f, os.O_RDONLY) for f in walk.files]
    reply = client.call(walk.path, walk.interface, walk.member, walk.signature,
                        walk.body, unix_fds=fds)  # fmt: skip
    for fd in fds + list(reply.unix_fds):
        os.close(fd)
    return REPLIES.outcome(reply)


DEBUG_METHODS = {
    "OpenGdb",
    "OpenConsole",
    "OpenConsoleLog",
    "GetDiagnosis",
    "TakeDump",  # reads the guest's memory
    "Open",  # a dump: the guest's memory
    "GetHeadline",  # a dump's: the console's line
    "Replay",  # runs the recording again, for gdb
    "Exec",  # a command in the guest: debugging, as gdb and consoles are
    "Signal",  # a command's: debug-vms, as Exec
    "SetTerminalSize",
    "Kill",
}


def expected_action(member: str) -> Action:
    """The action the architecture gives each method: reading is inspect, gdb,
    consoles and the full diagnosis (it quotes the console) are debug-vms, every
    other method manages."""
    if member in INSPECT_METHODS:
        return Action.INSPECT
    return Action.DEBUG_VMS if member in DEBUG_METHODS else Action.MANAGE_VMS


@pytest.fixture
def targets(pk: PolkitLab, kernels: dict[str, Path]) -> Iterator[dict[str, list[str]]]:
    """An object of every interface (made while polkit says yes); requests cleared.

    The VM, the dump and the command are root's own (the command runs in
    "busy", uid 1000's, through the real agent): only each method's action
    is asked.
    """
    root = pk.root
    command, agent = running_command(root, pk.lab)
    image = root.ok(MANAGER_PATH, MANAGER, "CreateImage", "sta{sv}",
                    ["base", 64 << 20, {}])[0]  # fmt: skip
    fd = os.open(kernels["text"], os.O_RDONLY)  # any file is a raw image
    try:
        (job,) = root.ok(MANAGER_PATH, MANAGER, "ImportImage", "sha{sv}",
                         ["imported", 0, {}], unix_fds=[fd])  # fmt: skip
    finally:
        os.close(fd)
    root.wait_until(lambda: root.managed_objects()[job][JOB]["State"] != "running")
    pk.polkit.requests.clear()
    yield {
        MANAGER: [MANAGER_PATH],
        VM: [vm_path("linux-6.9-rc1")],
        IMAGE: [str(image)],
        JOB: [str(job)],
        DUMP: [dump_path(d.id) for d in DUMPS if d.vm.owner == 0],
        RECORDING: [recording_path(r.id) for r in RECORDINGS if r.vm.owner == 0],
        PROCESS: [command],
    }
    agent.close()


# --- the tests ------------------------------------------------------------------------


def test_figure_polkit_says_no_and_every_method_asked_its_action(
    pk: PolkitLab, targets: dict[str, list[str]], kernels: dict[str, Path]
) -> None:
    """Polkit says no: root is refused too, by every method, after exactly one
    request for the method's action about root's unique bus name; nothing changes."""
    pk.polkit.mode = "no"
    before = pk.root.managed_objects()
    walks = method_walks(targets, kernels["bzImage"])
    wrong = []
    for walk in walks:
        result, asked_about = pk.asked(walk)
        expected = [expected_action(walk.member).value]
        if result != NOT_AUTHORIZED or asked_about != expected:
            wrong.append(f"{walk.member}: {result}, asked {asked_about}")
    assert pk.root.managed_objects() == before
    for request in pk.polkit.requests:
        assert request.kind == "system-bus-name"
        assert request.subject == {"name": pk.root.bus.unique_name}  # never a pid
        assert request.uid == 0
        assert request.flags == ALLOW_USER_INTERACTION
    figure = figures.record(
        "methods that leaked with polkit saying no",
        len(wrong),
        "== 0",
        detail=f"{len(walks)} methods called as root; " + "; ".join(wrong),
    )
    assert figure.met


def test_polkit_is_asked_on_every_call(pk: PolkitLab) -> None:
    list_vms = Walk(MANAGER_PATH, MANAGER, "ListVMs", "", [])
    for _ in range(3):
        assert pk.asked(list_vms) == ("return", [Action.INSPECT.value])


@pytest.mark.parametrize(
    ("vm", "member", "action"),
    [
        ("booted", "OpenConsoleLog", Action.DEBUG_VMS),  # nobody's VM
        ("idle", "Start", Action.MANAGE_VMS),  # uid 1000's
        ("busy", "Stop", Action.MANAGE_VMS),
        ("idle", "Delete", Action.MANAGE_VMS),
    ],
)
def test_another_uids_vm_needs_manage_others(
    pk: PolkitLab, vm: str, member: str, action: Action
) -> None:
    assert VMS[vm].owner != 0
    walk = pk.vm(vm, member)
    pk.polkit.mode = ALL_BUT_OTHERS
    before = pk.root.managed_objects()
    refused = (NOT_AUTHORIZED, [action.value, Action.MANAGE_OTHERS.value])
    assert pk.asked(walk) == refused
    assert pk.root.managed_objects() == before
    pk.polkit.mode = "yes"
    assert pk.asked(walk) == ("return", [action.value, Action.MANAGE_OTHERS.value])


@pytest.mark.parametrize(
    ("member", "signature", "body", "allowed"),
    [
        ("Delete", "", [], "return"),
        # Past authorization; the test driver cannot resize volumes.
        ("Resize", "ta{sv}", [32 << 20, {}], HypervisorError.dbus_name()),
    ],
)
def test_another_uids_image_needs_manage_others(
    pk: PolkitLab, member: str, signature: str, body: list[Any], allowed: str
) -> None:
    """An image nobody made: root changes it only with manage-others; its own
    image needs no more than manage-vms."""
    pk.polkit.mode = "yes"
    theirs = Walk(MANAGER_PATH, MANAGER, "CreateImage", "sta{sv}",
                  ["theirs", 16 << 20, {}])  # fmt: skip
    assert calls_as(pk.bus.address, NOBODY, [theirs], pk.scratch) == [("return", "")]
    pk.root.ok(MANAGER_PATH, MANAGER, "CreateImage", "sta{sv}", ["mine", 16 << 20, {}])
    pk.polkit.mode = ALL_BUT_OTHERS
    walk = Walk(image_path("theirs"), IMAGE, member, signature, body)
    before = pk.root.managed_objects()
    manage = Action.MANAGE_VMS.value
    assert pk.asked(walk) == (NOT_AUTHORIZED, [manage, Action.MANAGE_OTHERS.value])
    assert pk.root.managed_objects() == before
    own = Walk(image_path("mine"), IMAGE, member, signature, body)
    assert pk.asked(own) == (allowed, [manage])
    pk.polkit.mode = "yes"
    assert pk.asked(walk) == (allowed, [manage, Action.MANAGE_OTHERS.value])


def test_own_vm_and_inspecting_need_no_manage_others(pk: PolkitLab) -> None:
    pk.polkit.mode = ALL_BUT_OTHERS
    own = pk.vm("linux-6.9-rc1", "Start")
    assert pk.asked(own) == ("return", [Action.MANAGE_VMS.value])
    inspect = Walk(MANAGER_PATH, MANAGER, "GetVM", "s", ["idle"])
    assert pk.asked(inspect) == ("return", [Action.INSPECT.value])


@pytest.mark.parametrize("mode", ["error", "challenge"])
def test_polkit_failure_is_a_no(pk: PolkitLab, mode: str) -> None:
    """An error, or a challenge nobody answered: refused, root included."""
    pk.polkit.mode = mode
    before = pk.root.managed_objects()
    list_vms = Walk(MANAGER_PATH, MANAGER, "ListVMs", "", [])
    assert call(pk.root, list_vms) == NOT_AUTHORIZED
    assert call(pk.root, pk.vm("linux-6.9-rc1", "Start")) == NOT_AUTHORIZED
    assert pk.root.managed_objects() == before


def test_polkit_that_does_not_answer_is_a_no(pk: PolkitLab) -> None:
    """No answer within the bus's reply timeout: the bus tells kdlabd NoReply and
    kdlabd refuses. (The caller's own call, sent first, times out first.)"""
    pk.polkit.mode = "never"
    reply = pk.root.call(*astuple(pk.vm("linux-6.9-rc1", "Start"))[:5])
    assert reply.error_name == NO_REPLY
    pk.root.wait_until(lambda: "auth.denied" in pk.lab.daemon.log())
    failed = [
        json.loads(line[line.index("{") :])
        for line in pk.lab.daemon.log().splitlines()
        if "auth.polkit_failed" in line
    ]
    assert [(f["action"], f["error"]) for f in failed] == [
        (Action.MANAGE_VMS.value, NO_REPLY)
    ]
    assert pk.state("linux-6.9-rc1") == "defined"


def test_polkit_that_never_answers_is_a_no_within_kdlabds_own_timeout(
    public_dir: Path, workdir: Path
) -> None:
    """The bus has no reply timeout here: kdlabd's own (polkit_timeout) denies."""
    directory = public_dir / "polkit-bus-no-timeout"
    directory.mkdir(mode=0o755)
    bus = PrivateBus(directory, polkit_policy(directory, reply_timeout_ms=None))
    bus.start()
    mock = MockPolkit(bus.address).start()
    mock.mode = "never"
    lab = Lab(bus, workdir)
    lab.daemon.config_text += "polkit_timeout = 1.0\n"
    try:
        lab.populate()
        lab.start()
        root = BusClient(bus.address)
        try:
            message = Message(destination="org.kdlab.Kdlab1", path=MANAGER_PATH,
                              interface=MANAGER, member="ListVMs")  # fmt: skip
            reply = root.run(root.bus.call(message), timeout=NEVER_WAIT)
        finally:
            root.close()
        assert reply is not None
        assert reply.error_name == NOT_AUTHORIZED
    finally:
        mock.stop()
        if lab.daemon.started:
            lab.daemon.kill()
        bus.stop()


def test_polkit_gone_is_a_no_not_a_fallback(pk: PolkitLab) -> None:
    """polkit dies with a request pending, and stays away: kdlabd keeps asking it
    (the bus answers that no one has its name) rather than falling back to the
    group rule, which would let root in."""
    pk.polkit.mode = "never"
    threading.Timer(0.3, pk.polkit.crash).start()
    assert call(pk.root, pk.vm("linux-6.9-rc1", "Start")) == NOT_AUTHORIZED
    list_vms = Walk(MANAGER_PATH, MANAGER, "ListVMs", "", [])
    assert call(pk.root, list_vms) == NOT_AUTHORIZED
    assert pk.state("linux-6.9-rc1") == "defined"


def test_polkit_yes_lets_an_outsider_through(
    pk: PolkitLab, kernels: dict[str, Path]
) -> None:
    """Not root, not in group kdlab: polkit decides, and it says yes."""
    pk.polkit.mode = "yes"
    kernel = (str(kernels["bzImage"]),)
    options = {"kernel": Variant("h", 0)}
    create = Walk(MANAGER_PATH, MANAGER, "CreateVM", "sa{sv}", ["new", options], kernel)
    walks = [
        Walk(MANAGER_PATH, MANAGER, "ListVMs", "", []),
        pk.vm("idle", "Start"),  # uid 1000's VM
        create,
    ]
    replies = calls_as(pk.bus.address, NOBODY, walks, pk.scratch)
    # Past authorization; the test driver cannot upload the kernel.
    assert [name for name, _ in replies] == [
        "return",
        "return",
        HypervisorError.dbus_name(),
    ]
    assert pk.state("idle") == "running"
    assert [r.action for r in pk.polkit.requests] == [
        Action.INSPECT.value,
        Action.MANAGE_VMS.value,
        Action.MANAGE_OTHERS.value,
        Action.MANAGE_VMS.value,
    ]
    assert {(r.kind, r.uid) for r in pk.polkit.requests} == {
        ("system-bus-name", NOBODY.uid)
    }
