"""``kdlabctl notify``: desktop notifications of the caller's own VMs and jobs.

A per-user agent of the graphical session. It follows kdlabd's signals on the
system bus (the ObjectManager's InterfacesAdded and InterfacesRemoved,
PropertiesChanged, a job's Completed; never a poll) for the VMs and jobs whose
Owner is the caller's uid, and sends ``org.freedesktop.Notifications`` on the
session bus when a kernel panics or oopses, when a boot is diagnosed with an
error, when a VM stops that nobody asked kdlab to stop (LastStop), and when an
image build or import ends. Each notification offers actions: the serial
console or gdb in a terminal, and the VM's Cockpit page.

One event, one notification: an event is keyed by what it is about
(:func:`vm_events`: the VM's UUID, its boot's ``Booted`` mark and the
diagnosis code or how it stopped; a job by kdlabd's unique bus name and the
job's number). What the agent finds when it starts is old news: it is only
remembered. When kdlabd leaves the bus and comes back, the agent reads
everything again and announces only what it has not seen (a panic during
kdlabd's restart, say), never what it already announced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

from kdlab.errors import EXIT_UNAVAILABLE
from kdlab.states import JobState
from kdlab.wire import BUS_NAME, JOB_INTERFACE, MANAGER_PATH, VM_INTERFACE
from kdlabctl import caller
from kdlabctl.asyncbus import Connection
from kdlabctl.client import OBJECT_MANAGER, PROPERTIES, Client, unwrapped
from kdlabctl.quickbus import DBUS_NAME, DBUS_PATH, RemoteError, Reply
from kdlabctl.records import VM, Job

NOTIFICATIONS = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"
APP_NAME = "kdlab"
# The urgencies of the notification specification's "urgency" hint.
NORMAL, CRITICAL = 1, 2
# Diagnosis codes of a crash of the kernel: critical, whatever their severity.
CRASHES = frozenset({"kernel-panic", "kernel-oops"})
NO_SERVER = "org.freedesktop.DBus.Error.NoServer"
# One agent per session: the name it owns there (RequestName's flag and answer).
AGENT_NAME = "org.kdlab.Notify"
DO_NOT_QUEUE, PRIMARY_OWNER = 4, 1

Key = tuple[str, ...]


# --- what is worth a notification (pure) ---------------------------------------


@dataclass(frozen=True)
class Event:
    """One thing to tell the user, once: *key* says which thing it is."""

    key: Key
    summary: str
    body: str
    urgency: int = NORMAL
    vm: str = ""
    """The VM it is about (its actions open its console, gdb, page); "" for a job."""
    actions: tuple[str, ...] = ("page",)


# An action's key (what ActionInvoked names) and its label.
ACTION_LABELS = {
    "console": "Console",
    "gdb": "Debug with gdb",
    "page": "Show page",
}


def vm_events(vm: VM) -> list[Event]:
    """What *vm*'s properties tell that is worth a notification now.

    A diagnosis is keyed by the VM's UUID, its boot (``Booted``: the same
    after kdlabd restarts, new at each Start) and the code: a diagnosis that
    comes and goes within a boot is one event, the same panic in the next boot
    another. A stop nobody asked for is keyed by the boot and how it ended.
    """
    boot = (vm.uuid, str(vm.booted))
    runs = vm.state.active
    actions = tuple(
        action
        for action, offered in (
            ("console", runs),
            ("gdb", runs and vm.gdb_stub != "off"),
            ("page", True),
        )
        if offered
    )
    events = []
    code, severity, cause, fix = vm.diagnosis
    if code in CRASHES or severity == "error":
        events.append(
            Event(
                ("diagnosis", *boot, code),
                f"{vm.name}: {cause}",
                f"{fix} ({code})" if fix else code,
                CRITICAL if code in CRASHES else NORMAL,
                vm.name,
                actions,
            )
        )
    if vm.last_stop.unexpected:
        how = {
            "guest": "the guest powered itself off",
            "crashed": "QEMU or the guest crashed",
            "killed": "another libvirt client pulled the plug",
        }.get(vm.last_stop, "it went off without kdlabctl stop")
        events.append(
            Event(
                ("stop", *boot, vm.last_stop.value),
                f"{vm.name} stopped unexpectedly",
                f"{how}; kdlabctl logs {vm.name} shows its last boot",
                CRITICAL if vm.last_stop == "crashed" else NORMAL,
                vm.name,
                actions,
            )
        )
    return events


def job_event(job: Job, daemon: str, message: str = "") -> Event | None:
    """The notification of *job*'s end; None while it runs.

    Job numbers start again with each kdlabd: the key holds *daemon*, the
    unique bus name of the kdlabd that ran it.
    """
    if job.state is JobState.RUNNING:
        return None
    what = "build" if job.kind == "build" else "import"
    told = message or job.status
    if job.state is JobState.SUCCEEDED:
        summary = f"image {job.target}: {what} done"
    elif job.state is JobState.CANCELLED:
        summary = f"image {job.target}: {what} cancelled"
    else:
        summary = f"image {job.target}: {what} failed"
        told = f"{told} ({job.error})" if job.error else told
    urgency = CRITICAL if job.state is JobState.FAILED else NORMAL
    return Event(("job", daemon, str(job.id)), summary, told, urgency)


class Seen:
    """The keys of the events already told (or found when the agent started)."""

    def __init__(self) -> None:
        self._keys: set[Key] = set()

    def first_time(self, event: Event) -> bool:
        """Whether *event* is new; it is not, from now on."""
        if event.key in self._keys:
            return False
        self._keys.add(event.key)
        return True


# --- the session's notification server ----------------------------------------------


class Notifier:
    """``org.freedesktop.Notifications`` on the session bus: sends, and hears
    which action of which notification the user chose."""

    def __init__(
        self, bus: MessageBus, on_action: Callable[[Event, str], None]
    ) -> None:
        self.bus = bus
        self.session = Client(Connection(bus))
        self._on_action = on_action
        self._shown: dict[int, Event] = {}
        bus.add_message_handler(self._receive)

    @classmethod
    async def connect(cls, on_action: Callable[[Event, str], None]) -> Notifier:
        """The session bus's notification server; a clear error when there is
        no session bus or nobody serves notifications on it."""
        if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
            raise RemoteError(
                NO_SERVER,
                "no session bus: DBUS_SESSION_BUS_ADDRESS is not set (run "
                "kdlabctl notify in the graphical session, or as the user unit "
                "kdlab-notify)",
            )
        try:
            bus = await MessageBus(bus_type=BusType.SESSION).connect()
        except Exception as err:  # any failure to connect means the same
            raise RemoteError(
                NO_SERVER, f"cannot connect to the session bus: {err}"
            ) from None
        notifier = cls(bus, on_action)
        # Asked once: a server started by D-Bus activation starts now.
        try:
            await notifier._call("GetServerInformation")
        except RemoteError as err:
            bus.disconnect()
            raise RemoteError(
                NO_SERVER,
                f"no notification server on the session bus ({NOTIFICATIONS}: "
                f"{err.name}): start the desktop's, or one such as dunst or mako",
            ) from None
        rule = f"type='signal',interface='{NOTIFICATIONS}',path='{NOTIFICATIONS_PATH}'"
        await notifier.session.add_match(rule)
        return notifier

    async def _call(
        self, member: str, signature: str = "", body: Sequence[Any] = ()
    ) -> Reply:
        """Call the notification server (an error reply raises RemoteError)."""
        return await self.session.reply(
            NOTIFICATIONS_PATH,
            NOTIFICATIONS,
            member,
            signature,
            body,
            destination=NOTIFICATIONS,
        )

    async def claim(self) -> bool:
        """Take the agent's name on the session bus: False if another agent
        of this session (the user unit, or the autostart file) has it."""
        reply = await self.session.reply(
            DBUS_PATH,
            DBUS_NAME,
            "RequestName",
            "su",
            [AGENT_NAME, DO_NOT_QUEUE],
            destination=DBUS_NAME,
        )
        return bool(reply.body == [PRIMARY_OWNER])

    async def show(self, event: Event) -> None:
        actions = [part for a in event.actions for part in (a, ACTION_LABELS[a])]
        if event.vm:
            # What a click on the notification itself does, where servers offer it.
            actions += ["default", ACTION_LABELS["page"]]
        hints = {
            "urgency": Variant("y", event.urgency),
            "desktop-entry": Variant("s", "kdlab-notify"),
        }
        try:
            reply = await self._call(
                "Notify",
                "susssasa{sv}i",
                [
                    APP_NAME,
                    0,
                    "computer",
                    event.summary,
                    event.body,
                    actions,
                    hints,
                    -1,
                ],
            )
        except RemoteError as err:  # told, and the agent goes on
            print(f"kdlabctl notify: {err.name}: {err}", file=sys.stderr)
            return
        self._shown[int(reply.body[0])] = event

    def _receive(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or msg.interface != NOTIFICATIONS:
            return
        if msg.member == "ActionInvoked":
            event = self._shown.get(msg.body[0])
            if event is not None:
                self._on_action(event, str(msg.body[1]))
        elif msg.member == "NotificationClosed":
            self._shown.pop(msg.body[0], None)


# --- the actions ---------------------------------------------------------------------


def action_argv(
    action: str, event: Event, *, bus: str, page_url: str, env: Mapping[str, str]
) -> list[str] | None:
    """The command line that carries out *action* of *event*; None: nothing to do.

    The console and gdb run in a terminal: ``$TERMINAL`` (a command line)
    if set, else Debian's ``x-terminal-emulator``; both take ``-e COMMAND``.
    The page opens with ``xdg-open``.
    """
    if action in ("page", "default"):
        anchor = f"#/vm/{event.vm}" if event.vm else ""
        return ["xdg-open", page_url + anchor]
    if action not in ("console", "gdb") or not event.vm:
        return None
    terminal = shlex.split(env.get("TERMINAL", "")) or ["x-terminal-emulator"]
    # --host= (this machine): *bus* is already the one to use, a host's bridge
    # included; $KDLAB_HOST must not send it to a host again.
    kdlabctl = [sys.executable, "-m", "kdlabctl", "--bus", bus, "--host="]
    return [*terminal, "-e", *kdlabctl, action, event.vm]


# --- following kdlabd ----------------------------------------------------------------


class Agent:
    """Follows kdlabd's objects of one uid and notifies what is new."""

    def __init__(
        self,
        client: Client,
        notifier: Notifier,
        uid: int,
    ) -> None:
        self.client = client
        self.notifier = notifier
        self.uid = uid
        self.seen = Seen()
        self._vms: dict[str, dict[str, Any]] = {}
        self._jobs: dict[str, dict[str, Any]] = {}
        self._owner = ""  # kdlabd's unique name, as it answered the last read
        self._read_serial = 0
        self._signals: asyncio.Queue[Message] = asyncio.Queue()
        sender = f"sender='{BUS_NAME}'"
        self._rules = (
            f"type='signal',{sender},interface='{OBJECT_MANAGER}',path='{MANAGER_PATH}'",
            f"type='signal',{sender},interface='{PROPERTIES}',"
            f"member='PropertiesChanged',path_namespace='{MANAGER_PATH}'",
            f"type='signal',{sender},interface='{JOB_INTERFACE}',member='Completed'",
            f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',"
            f"interface='{DBUS_NAME}',member='NameOwnerChanged',arg0='{BUS_NAME}'",
        )

    async def start(self) -> None:
        """Subscribe, then read what is there now: old news, only remembered."""
        self.client.bus.add_message_handler(self._receive)
        await asyncio.gather(*map(self.client.add_match, self._rules))
        await self._read(announce=False)

    async def follow(self) -> None:
        """Follow kdlabd until cancelled."""
        while True:
            msg = await self._signals.get()
            if msg.member == "NameOwnerChanged" and msg.sender == DBUS_NAME:
                await self._owner_changed(str(msg.body[2]))
            elif msg.sender == self._owner and msg.serial > self._read_serial:
                await self._apply(msg)

    def _receive(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL:
            self._signals.put_nowait(msg)

    @property
    def running(self) -> bool:
        """Whether kdlabd answered the last read."""
        return bool(self._owner)

    async def _owner_changed(self, owner: str) -> None:
        if not owner:  # kdlabd left: what it said stays seen
            self._owner, self._vms, self._jobs = "", {}, {}
        else:
            await self._read(announce=True)

    async def _read(self, *, announce: bool) -> None:
        """Every object, as kdlabd has it now (none if it is not running);
        signals up to the reply are older than the read and dropped."""
        try:
            reply = await self.client.reply(
                MANAGER_PATH,
                OBJECT_MANAGER,
                "GetManagedObjects",
                no_autostart=True,
            )
        except RemoteError:
            self._owner, self._vms, self._jobs = "", {}, {}
            return  # not running: its NameOwnerChanged will come
        self._owner, self._read_serial = reply.sender or "", reply.serial
        self._vms, self._jobs = {}, {}
        for path, interfaces in reply.body[0].items():
            for interface, props in interfaces.items():
                await self._take(path, interface, unwrapped(props), announce)

    async def _take(
        self, path: str, interface: str, props: dict[str, Any], announce: bool
    ) -> None:
        if props.get("Owner") != self.uid:
            return
        if interface == VM_INTERFACE:
            self._vms[path] = props
            await self._tell(vm_events(VM.from_properties(props)), announce)
        elif interface == JOB_INTERFACE:
            self._jobs[path] = props
            event = job_event(Job.from_properties(props), self._owner)
            await self._tell([event] if event else [], announce)

    async def _apply(self, msg: Message) -> None:
        if msg.member == "InterfacesAdded":
            path, interfaces = msg.body
            for interface, props in interfaces.items():
                await self._take(path, interface, unwrapped(props), True)
        elif msg.member == "InterfacesRemoved":
            self._vms.pop(msg.body[0], None)
            self._jobs.pop(msg.body[0], None)
        elif msg.member == "PropertiesChanged" and msg.body[0] == VM_INTERFACE:
            props = self._vms.get(msg.path or "")
            if props is not None:
                props.update(unwrapped(msg.body[1]))
                await self._tell(vm_events(VM.from_properties(props)), True)
        elif msg.member == "PropertiesChanged" and msg.body[0] == JOB_INTERFACE:
            job = self._jobs.get(msg.path or "")
            if job is not None:
                job.update(unwrapped(msg.body[1]))
        elif msg.member == "Completed":
            job = self._jobs.get(msg.path or "")
            if job is not None:
                ended = Job.from_properties(job)
                # Completed may pass the State change: it says the job ended.
                if ended.state is JobState.RUNNING:
                    state = JobState.SUCCEEDED if msg.body[0] else JobState.FAILED
                    ended = Job.from_properties({**job, "State": state.value})
                event = job_event(ended, self._owner, str(msg.body[1]))
                await self._tell([event] if event else [], True)

    async def _tell(self, events: Iterable[Event], announce: bool) -> None:
        for event in events:
            if self.seen.first_time(event) and announce:
                await self.notifier.show(event)


# --- the command ---------------------------------------------------------------------


async def serve(client: Client, *, bus: str, page_url: str) -> int:
    """Run the agent until SIGINT or SIGTERM; 0 then."""
    loop = asyncio.get_running_loop()
    children: set[asyncio.Task[None]] = set()

    def act(event: Event, action: str) -> None:
        argv = action_argv(action, event, bus=bus, page_url=page_url, env=os.environ)
        if argv is not None:
            task = loop.create_task(_spawn(argv))
            children.add(task)
            task.add_done_callback(children.discard)

    notifier = await Notifier.connect(act)
    if not await notifier.claim():
        notifier.bus.disconnect()
        print("kdlabctl notify: already running in this session", file=sys.stderr)
        return 0
    following = Agent(client, notifier, caller.uid())
    await following.start()
    print(
        f"kdlabctl notify: following kdlabd for uid {following.uid}"
        + ("" if following.running else " (not running now)"),
        file=sys.stderr,
        flush=True,
    )
    agent = loop.create_task(following.follow())
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ended = loop.create_task(client.bus.wait_for_disconnect())
    session_ended = loop.create_task(notifier.bus.wait_for_disconnect())
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait(
            {agent, ended, session_ended, stopping},
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        for task in (agent, ended, session_ended, stopping):
            task.cancel()
        notifier.bus.disconnect()
    if agent.done() and not agent.cancelled():
        await agent  # its error, if it failed
    if not stop.is_set():
        which = "session" if session_ended.done() else "system"
        print(f"kdlabctl notify: the {which} bus connection closed", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


async def _spawn(argv: list[str]) -> None:
    """Run *argv* in a session of its own, its output to ours; reap it."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
    except OSError as err:
        print(f"kdlabctl notify: cannot run {argv[0]}: {err}", file=sys.stderr)
        return
    with contextlib.suppress(asyncio.CancelledError):
        await proc.wait()
