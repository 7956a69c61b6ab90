"""kdlabd's API as typed calls: the one module of kdlabctl that speaks D-Bus.

Every member, signature and option type kdlabctl uses is written here once.
Commands call methods such as :meth:`Client.create_vm` or :meth:`Client.stop`
and get records back (:class:`VM`, :class:`Image`, :class:`Job`) whose states
are :mod:`kdlab.states`' enums. Calls name their signatures: no introspection
round trip.

Changes are followed by signals, never by asking again (the API promises that
clients never poll): a :class:`Watch` adds match rules for an object's signals,
then reads the object once; what kdlabd signalled before that read is dropped
by its serial, so no change is missed and none is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import re
import typing
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from dbus_next import Message, MessageFlag, MessageType, Variant
from dbus_next.aio import MessageBus

from kdlab.states import JobState, VMState
from kdlab.wire import (
    BUILD_OPTIONS,
    BUS_NAME,
    CREATE_OPTIONS,
    IMAGE_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    START_OPTIONS,
    STOP_OPTIONS,
    VM_INTERFACE,
    bus_address,
    unescape_path_label,
)

T = TypeVar("T")

CONNECT_TIMEOUT = 25.0
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
# What kdlabctl reports when kdlabd leaves the bus under a watch (exit 69).
GONE = "org.freedesktop.DBus.Error.NameHasNoOwner"


class RemoteError(Exception):
    """An error reply from kdlabd (or the bus), by D-Bus error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


# --- records --------------------------------------------------------------------------

# A record's fields are its D-Bus properties in snake_case (``MemoryMiB`` is
# ``memory_mib``): ``--json`` prints them under these names.
# A word is a plural acronym (VCPUs), a capitalised word that may end in one
# capital (MemoryMiB: Memory, MiB), or an acronym (UUID, APIRevision: API).
_WORD = re.compile(
    r"[A-Z]+s(?![a-z])|[A-Z]?[a-z0-9]+(?:[A-Z](?![a-z]))?|[A-Z]+(?![a-z])"
)


def snake(name: str) -> str:
    """``MemoryMiB`` -> ``memory_mib``: a D-Bus property name as a field name."""
    return "_".join(_WORD.findall(name)).lower()


class Record:
    """Base of the records: made from an object's properties."""

    @classmethod
    def from_properties(cls, props: Mapping[str, Any]) -> Self:
        """The record of *props* (values unwrapped): enums for states, tuples
        for arrays and structs."""
        values = {snake(key): value for key, value in props.items()}
        return cls(**{name: kind(values[name]) for name, kind in _kinds(cls).items()})


_KINDS: dict[type[Record], dict[str, Callable[[Any], Any]]] = {}


def _kinds(record: type[Record]) -> dict[str, Callable[[Any], Any]]:
    """How each field of *record* is made from its property's value."""
    if record in _KINDS:
        return _KINDS[record]
    hints = typing.get_type_hints(record)
    kinds: dict[str, Callable[[Any], Any]] = {}
    for field in dataclasses.fields(record):  # type: ignore[arg-type]
        hint = hints[field.name]
        if isinstance(hint, enum.EnumType):
            kinds[field.name] = hint
        elif typing.get_origin(hint) is tuple:
            kinds[field.name] = tuple
        else:
            kinds[field.name] = _same
    _KINDS[record] = kinds
    return kinds


def _same(value: T) -> T:
    return value


# The Diagnosis property: (code, severity, cause, fix); four "" when nothing.
Diagnosis = tuple[str, str, str, str]


@dataclass(frozen=True)
class VM(Record):
    """An ``org.kdlab.Kdlab1.VM`` object's properties."""

    name: str
    state: VMState
    uuid: str
    owner: int
    cmdline: str
    memory_mib: int
    vcpus: int
    accel: str
    created: int
    gdb_stub: str
    waiting_for_debugger: bool
    kernel_release: str
    vmlinux: str
    kernel_path: str
    tree: str
    diagnosis: Diagnosis


@dataclass(frozen=True)
class Image(Record):
    """An ``org.kdlab.Kdlab1.Image`` object's properties."""

    name: str
    format: str
    capacity: int
    allocation: int
    owner: int
    used_by: tuple[str, ...]


@dataclass(frozen=True)
class Job(Record):
    """An ``org.kdlab.Kdlab1.Job`` object's properties."""

    id: int
    kind: str
    target: str
    owner: int
    progress: float
    status: str
    state: JobState
    error: str  # the D-Bus error name of a failure, else ""


R = TypeVar("R", bound=Record)

# What :meth:`Client.names` lists.
Listing = typing.Literal["vms", "images"]


# --- what callers send -------------------------------------------------------------


@dataclass(frozen=True)
class VMOptions:
    """CreateVM's options but the files; None (or empty) keeps kdlabd's default."""

    cmdline: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    gdb: bool | None = None
    gdb_tcp_port: int | None = None
    vmlinux: str | None = None
    kernel_path: str | None = None
    tree: str | None = None
    image: str | None = None
    disk_size: int | None = None
    extra_disks: tuple[int, ...] = ()


@dataclass(frozen=True)
class BootFiles:
    """Descriptors of the files a new VM boots, opened by the caller as the user."""

    kernel: int
    initrd: int | None = None


@dataclass(frozen=True)
class ImageBuild:
    """BuildImage's options; None (or empty) keeps kdlabd's default."""

    suite: str
    size: int | None = None
    packages: tuple[str, ...] = ()
    ssh_key: str | None = None


def _options(values: Mapping[str, Any], types: Mapping[str, str]) -> dict[str, Variant]:
    """``a{sv}`` options, each value with its key's D-Bus type; None and empty
    arrays are left out (kdlabd's default)."""
    return {
        key: Variant(types[key], list(value) if isinstance(value, tuple) else value)
        for key, value in values.items()
        if value is not None and value != ()
    }


def _unwrapped(props: Mapping[str, Variant]) -> dict[str, Any]:
    return {key: variant.value for key, variant in props.items()}


# --- the client ----------------------------------------------------------------------


class Client:
    """A connection to kdlabd over the bus named by ``--bus``."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self._vm_paths: dict[str, str] = {}

    @classmethod
    async def connect(cls, bus: str) -> Client:
        """Connect to *bus*; any way that fails is "not reachable" (exit 69).

        A bus may refuse a client in many ways (no socket, authentication
        rejected, the connection closed during the handshake, a full bus that
        never answers): each is one sentence for the user, never a traceback.
        """
        try:
            address = bus_address(bus)
            connecting = MessageBus(bus_address=address, negotiate_unix_fd=True)
            return cls(await asyncio.wait_for(connecting.connect(), CONNECT_TIMEOUT))
        except TimeoutError:
            reason = f"no answer within {CONNECT_TIMEOUT:g} s"
        except Exception as err:  # any failure to connect means the same
            reason = str(err) or type(err).__name__
        raise RemoteError(
            "org.freedesktop.DBus.Error.NoServer",
            f"cannot connect to the {bus} bus: {reason}",
        )

    async def reply(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        unix_fds: Sequence[int] = (),
        destination: str = BUS_NAME,
        flags: MessageFlag = MessageFlag.NONE,
    ) -> Message:
        """Call a method; its reply (an error reply raises :class:`RemoteError`)."""
        reply = await self.bus.call(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                unix_fds=list(unix_fds),
                flags=flags,
            )
        )
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise RemoteError(reply.error_name or "", str(text))
        return reply

    async def _manager(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        unix_fds: Sequence[int] = (),
    ) -> Any:
        """The single value a Manager method returns."""
        reply = await self.reply(
            MANAGER_PATH, MANAGER_INTERFACE, member, signature, body, unix_fds=unix_fds
        )
        return reply.body[0] if reply.body else None

    async def _objects(self, interface: str, record: type[R]) -> list[R]:
        """Every object with *interface*, in one round trip, sorted by name."""
        reply = await self.reply(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects")
        found = [
            record.from_properties(_unwrapped(interfaces[interface]))
            for interfaces in reply.body[0].values()
            if interface in interfaces
        ]
        return sorted(found, key=lambda found: str(getattr(found, "name", "")))

    async def _properties(self, path: str, interface: str) -> dict[str, Any]:
        reply = await self.reply(path, PROPERTIES, "GetAll", "s", [interface])
        return _unwrapped(reply.body[0])

    async def names(self, listing: Listing) -> list[str]:
        """The names of kdlabd's VMs or images, sorted, from the object paths of
        ListVMs or ListImages alone (for shell completion: one short call).

        A kdlabd that is not running is not started for it.
        """
        member = {"vms": "ListVMs", "images": "ListImages"}[listing]
        reply = await self.reply(
            MANAGER_PATH, MANAGER_INTERFACE, member, flags=MessageFlag.NO_AUTOSTART
        )
        return sorted(
            unescape_path_label(path.rpartition("/")[2]) for path in reply.body[0]
        )

    # VMs

    async def vm_path(self, name: str) -> str:
        """The object path of VM *name* (NoSuchVM if there is none)."""
        if name not in self._vm_paths:
            self._vm_paths[name] = str(await self._manager("GetVM", "s", [name]))
        return self._vm_paths[name]

    async def _vm(
        self,
        name: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        unix_fds: Sequence[int] = (),
    ) -> Message:
        path = await self.vm_path(name)
        return await self.reply(
            path, VM_INTERFACE, member, signature, body, unix_fds=unix_fds
        )

    async def create_vm(self, name: str, options: VMOptions, files: BootFiles) -> str:
        """Create VM *name* booting *files*; returns its object path."""
        # Descriptors travel out of band; the options hold their index in unix_fds.
        fds = [files.kernel] if files.initrd is None else [files.kernel, files.initrd]
        values = {
            **dataclasses.asdict(options),
            "kernel": 0,
            "initrd": 1 if files.initrd is not None else None,
        }
        body = [name, _options(values, CREATE_OPTIONS)]
        return str(await self._manager("CreateVM", "sa{sv}", body, fds))

    async def list_vms(self) -> list[VM]:
        return await self._objects(VM_INTERFACE, VM)

    async def vm(self, name: str) -> VM:
        path = await self.vm_path(name)
        return VM.from_properties(await self._properties(path, VM_INTERFACE))

    async def start(
        self, name: str, *, paused: bool = False, kernel: int | None = None
    ) -> None:
        """Boot *name*; *kernel* is a descriptor of a bzImage to boot from now on."""
        values = {"paused": paused or None, "kernel": 0 if kernel is not None else None}
        fds = [] if kernel is None else [kernel]
        await self._vm(name, "Start", "a{sv}", [_options(values, START_OPTIONS)], fds)

    async def stop(
        self, name: str, *, force: bool = False, timeout: int | None = None
    ) -> None:
        options = _options({"force": force or None, "timeout": timeout}, STOP_OPTIONS)
        await self._vm(name, "Stop", "a{sv}", [options])

    async def delete(self, name: str) -> None:
        await self._vm(name, "Delete")

    async def diagnosis(self, name: str) -> Diagnosis:
        """The VM's diagnosis in the console's words (GetDiagnosis, debug-vms)."""
        (found,) = (await self._vm(name, "GetDiagnosis")).body
        code, severity, cause, fix = found[:4]
        return code, severity, cause, fix

    async def _open(self, name: str, member: str) -> int:
        return int((await self._vm(name, member)).unix_fds[0])

    async def open_gdb(self, name: str) -> int:
        """A stream connected to the VM's gdbstub."""
        return await self._open(name, "OpenGdb")

    async def open_console(self, name: str) -> int:
        """A stream on the VM's serial console."""
        return await self._open(name, "OpenConsole")

    async def open_console_log(self, name: str) -> int:
        """A read-only descriptor of the console log of the current or last boot."""
        return await self._open(name, "OpenConsoleLog")

    @contextlib.asynccontextmanager
    async def watch_vm(self, name: str) -> AsyncIterator[Watch[VM]]:
        """VM *name*, followed by its signals (:class:`Watch`)."""
        async with Watch(self, await self.vm_path(name), VM_INTERFACE, VM) as watch:
            yield watch

    # images

    async def _image(
        self, name: str, member: str, signature: str = "", body: Sequence[Any] = ()
    ) -> None:
        path = await self._manager("GetImage", "s", [name])
        await self.reply(path, IMAGE_INTERFACE, member, signature, body)

    async def list_images(self) -> list[Image]:
        return await self._objects(IMAGE_INTERFACE, Image)

    async def create_image(self, name: str, size: int) -> str:
        return str(await self._manager("CreateImage", "sta{sv}", [name, size, {}]))

    async def import_image(self, name: str, file: int) -> str:
        """Import the image on descriptor *file*; returns the job's path."""
        body = [name, 0, {}]
        return str(await self._manager("ImportImage", "sha{sv}", body, [file]))

    async def build_image(self, name: str, build: ImageBuild) -> str:
        """Build a Debian image; returns the job's path."""
        options = _options(dataclasses.asdict(build), BUILD_OPTIONS)
        return str(await self._manager("BuildImage", "sa{sv}", [name, options]))

    async def delete_image(self, name: str) -> None:
        await self._image(name, "Delete")

    async def resize_image(self, name: str, size: int) -> None:
        await self._image(name, "Resize", "ta{sv}", [size, {}])

    # jobs

    @contextlib.asynccontextmanager
    async def watch_job(self, path: str) -> AsyncIterator[Watch[Job]]:
        """The job at *path*, followed by its signals until it ends (Completed)."""
        async with Watch(self, path, JOB_INTERFACE, Job, "Completed") as watch:
            yield watch

    async def cancel_job(self, path: str) -> None:
        await self.reply(path, JOB_INTERFACE, "Cancel")

    # the bus itself

    async def add_match(self, rule: str) -> None:
        await self.reply(
            DBUS_PATH, DBUS_NAME, "AddMatch", "s", [rule], destination=DBUS_NAME
        )

    async def remove_match(self, rule: str) -> None:
        await self.reply(
            DBUS_PATH, DBUS_NAME, "RemoveMatch", "s", [rule], destination=DBUS_NAME
        )


class Watch(Generic[R]):
    """One object of kdlabd's, kept current by its signals.

    ``async with watch:`` adds match rules for the object's signals, its
    removal and kdlabd leaving the bus, then reads the object once;
    :attr:`current` is then always its newest state and :meth:`changed` waits
    for the next change. kdlabd numbers what it sends: signals up to the
    read's reply are older than the read and dropped.
    """

    def __init__(
        self,
        client: Client,
        path: str,
        interface: str,
        record: type[R],
        ends_with: str = "",
    ) -> None:
        self.path = path
        self.interface = interface
        self.ended = False  # the object signalled *ends_with*, or went away
        self._client = client
        self._record = record
        self._ends_with = ends_with
        self._props: dict[str, Any] = {}
        self._early: list[Message] | None = []  # signals before the read's reply
        self._owner = ""  # kdlabd's unique name, as it answered the read
        self._read_serial = 0
        self._gone = ""  # why kdlabd cannot be heard any more
        self._changed = asyncio.Event()
        self._disconnect: asyncio.Future[None] | None = None
        self._rules = (
            f"type='signal',sender='{BUS_NAME}',path='{path}'",
            f"type='signal',sender='{BUS_NAME}',path='{MANAGER_PATH}',"
            f"interface='{OBJECT_MANAGER}',member='InterfacesRemoved'",
            f"type='signal',sender='{DBUS_NAME}',path='{DBUS_PATH}',"
            f"interface='{DBUS_NAME}',member='NameOwnerChanged',arg0='{BUS_NAME}'",
        )

    @property
    def current(self) -> R:
        """The object as its last signal (or the read) left it."""
        return self._record.from_properties(self._props)

    async def __aenter__(self) -> Self:
        bus = self._client.bus
        bus.add_message_handler(self._receive)
        try:
            await asyncio.gather(*map(self._client.add_match, self._rules))
            reply = await self._client.reply(
                self.path, PROPERTIES, "GetAll", "s", [self.interface]
            )
        except BaseException:
            await self._stop()
            raise
        self._props = _unwrapped(reply.body[0])
        self._owner, self._read_serial = reply.sender or "", reply.serial
        early, self._early = self._early or [], None
        for msg in early:
            self._apply(msg)
        self._disconnect = asyncio.ensure_future(bus.wait_for_disconnect())
        self._disconnect.add_done_callback(self._disconnected)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        self._client.bus.remove_message_handler(self._receive)
        if self._disconnect is not None:
            self._disconnect.remove_done_callback(self._disconnected)
            self._disconnect.cancel()
        if self._gone:
            return
        with contextlib.suppress(Exception):  # the connection ends with kdlabctl anyway
            await asyncio.gather(*map(self._client.remove_match, self._rules))

    async def changed(self, timeout: float | None = None) -> None:
        """Wait for the next change (at most *timeout* seconds).

        Raises :class:`RemoteError` when kdlabd has left the bus or the bus
        connection closed: nothing would change any more.
        """
        if not self._changed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()
        if self._gone:
            raise RemoteError(GONE, self._gone)

    def _receive(self, msg: Message) -> None:
        """dbus-next's handler of every message: keeps this object's signals.

        Returns None, so dbus-next and other handlers see every message too.
        """
        if msg.message_type is not MessageType.SIGNAL:
            return
        if self._early is not None:
            self._early.append(msg)
        else:
            self._apply(msg)

    def _apply(self, msg: Message) -> None:
        if msg.sender == DBUS_NAME and msg.member == "NameOwnerChanged":
            if msg.body[0] != BUS_NAME or msg.body[1] != self._owner:
                return
            self._gone = "kdlabd left the bus"
        elif msg.sender != self._owner or msg.serial <= self._read_serial:
            return  # someone else's, or older than the read
        elif msg.path == self.path and msg.interface == PROPERTIES:
            if msg.body[0] != self.interface:
                return
            self._props.update(_unwrapped(msg.body[1]))
        elif msg.path == self.path and msg.interface == self.interface:
            self.ended = self.ended or msg.member == self._ends_with
        elif msg.member == "InterfacesRemoved" and msg.body[0] == self.path:
            self.ended = True
        else:
            return
        self._changed.set()

    def _disconnected(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: the reason is the same sentence
            self._gone = "the bus connection closed"
            self._changed.set()


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run one client coroutine to completion.

    asyncio reports errors nobody awaited (dbus-next's reader, when a bus
    closes the connection during the handshake) with a traceback on stderr;
    kdlabctl has already said what went wrong in one sentence.
    """

    async def quietly() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, _ctx: None)
        return await work

    return asyncio.run(quietly())
