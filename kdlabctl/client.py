"""kdlabd's API as typed calls: the one module of kdlabctl that speaks to kdlabd.

Every member, signature and option type kdlabctl uses is written here once.
Commands call methods such as :meth:`Client.create_vm` or :meth:`Client.stop`
and get records back (:class:`VM`, :class:`Image`, :class:`Job`) whose states
are :mod:`kdlab.states`' enums. Calls name their signatures: no introspection
round trip.

A client runs on one of two connections. :func:`kdlabctl.asyncbus.connect`
(dbus-next on asyncio) passes descriptors and follows signals: changes are
followed by signals, never by asking again (the API promises that clients
never poll; :class:`kdlabctl.asyncbus.Watch`). :meth:`Client.plain` (the
standard library's :mod:`kdlabctl.quickbus`) only calls, and costs a fraction
of dbus-next's start-up: ``list``, ``show`` and ``image list`` use it.
"""

from __future__ import annotations

import contextlib

from kdlab.errors import NoSuchRecording
from kdlab.wire import (
    BUILD_OPTIONS,
    BUS_NAME,
    CREATE_OPTIONS,
    DUMP_INTERFACE,
    EXEC_OPTIONS,
    IMAGE_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    PROCESS_INTERFACE,
    RECORD_OPTIONS,
    RECORDING_INTERFACE,
    REPLAY_OPTIONS,
    RESTORE_CHECKPOINT_OPTIONS,
    START_OPTIONS,
    STOP_OPTIONS,
    TAKE_DUMP_OPTIONS,
    VM_INTERFACE,
    recording_path,
    unescape_path_label,
)
from kdlabctl.quickbus import (
    DBUS_NAME,
    DBUS_PATH,
    Call,
    QuickBus,
    RemoteError,
    Reply,
)
from kdlabctl.records import VM, Diagnosis, Dump, Image, Job, Record, Recording

TYPE_CHECKING = False  # importing typing costs more than a listing
if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
    from typing import Any, Literal, Protocol, TypeVar

    from dbus_next.aio import MessageBus

    from kdlabctl.asyncbus import Watch
    from kdlabctl.options import BootFiles, ImageBuild, VMOptions

    T = TypeVar("T")
    R = TypeVar("R", bound=Record)
    # What :meth:`Client.names` lists.
    Listing = Literal["vms", "images", "recordings"]

    class Connection(Protocol):
        """What a :class:`Client` calls through (:mod:`kdlabctl.quickbus`, or
        dbus-next in :mod:`kdlabctl.asyncbus`)."""

        async def call(
            self,
            call: Call,
            *,
            unix_fds: Sequence[int] = (),
            no_autostart: bool = False,
        ) -> Reply:
            """The reply; an error reply raises :class:`RemoteError`."""
            ...

        def disconnect(self) -> None: ...


__all__ = ["VM", "Diagnosis", "Dump", "Image", "Job", "Recording", "RemoteError"]

CONNECT_TIMEOUT = 25.0
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
# What dbus-next answers for a path kdlabd exports nothing at: a method call
# is an UnknownMethod, a GetAll an UnknownObject.
NO_OBJECT = (UNKNOWN_METHOD, "org.freedesktop.DBus.Error.UnknownObject")
# The APIRevision that brought recordings (VM.Record, VM.Replay).
RECORDINGS_REVISION = 8


def _variants(values: Mapping[str, Any], types: Mapping[str, str]) -> dict[str, Any]:
    """:func:`kdlabctl.options.variants`, imported with dbus-next when a call
    sends options."""
    from kdlabctl import options

    return options.variants(values, types)


def unwrapped(props: Mapping[str, Any]) -> dict[str, Any]:
    """Properties' values out of their variants."""
    return {key: variant.value for key, variant in props.items()}


# --- the client ----------------------------------------------------------------------


class _Plain:
    """A :class:`QuickBus` as a :class:`Connection`: its calls never wait on
    anything but the socket, so a command's coroutine runs to its end in one
    step (:func:`settle`), with no event loop."""

    def __init__(self, bus: QuickBus) -> None:
        self._bus = bus

    async def call(
        self,
        call: Call,
        *,
        unix_fds: Sequence[int] = (),
        no_autostart: bool = False,
    ) -> Reply:
        if unix_fds:
            raise ValueError(f"{call.member} passes descriptors: use dbus-next")
        return self._bus.call(call, no_autostart=no_autostart)

    def disconnect(self) -> None:
        self._bus.close()


def settle(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (a command on :meth:`Client.plain`)."""
    try:
        work.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    work.close()
    raise RuntimeError("a command on a plain connection waited for a signal")


class Client:
    """kdlabd's API over one connection to the bus named by ``--bus``."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._vm_paths: dict[str, str] = {}

    @classmethod
    async def connect(cls, bus: str) -> Client:
        """A client on dbus-next: descriptors and signals (exit 69 when the bus
        cannot be reached)."""
        from kdlabctl import asyncbus

        return cls(await asyncbus.connect(bus, CONNECT_TIMEOUT))

    @classmethod
    def plain(cls, bus: str, timeout: float = CONNECT_TIMEOUT) -> Client:
        """A client that only calls, on the standard library (exit 69 when the
        bus cannot be reached); each step waits *timeout* seconds at most."""
        return cls(_Plain(QuickBus.connect(bus, timeout)))

    @property
    def bus(self) -> MessageBus:
        """The dbus-next connection (for :class:`kdlabctl.asyncbus.Watch`)."""
        bus: MessageBus = getattr(self.connection, "bus")  # noqa: B009
        return bus

    def disconnect(self) -> None:
        self.connection.disconnect()

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
        no_autostart: bool = False,
    ) -> Reply:
        """Call a method; its reply (an error reply raises :class:`RemoteError`)."""
        return await self.connection.call(
            Call(destination, path, interface, member, signature=signature, body=body),
            unix_fds=unix_fds,
            no_autostart=no_autostart,
        )

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
            record.from_properties(unwrapped(interfaces[interface]))
            for interfaces in reply.body[0].values()
            if interface in interfaces
        ]
        return sorted(found, key=lambda found: str(getattr(found, "name", "")))

    async def _properties(self, path: str, interface: str) -> dict[str, Any]:
        reply = await self.reply(path, PROPERTIES, "GetAll", "s", [interface])
        return unwrapped(reply.body[0])

    async def names(self, listing: Listing) -> list[str]:
        """The names of kdlabd's VMs, images or recordings, sorted, from object
        paths alone: ListVMs' or ListImages', the recordings' of
        GetManagedObjects (there is no ListRecordings). For shell completion:
        one short call.

        A kdlabd that is not running is not started for it.
        """
        if listing == "recordings":
            reply = await self.reply(
                MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects", no_autostart=True
            )
            objects = reply.body[0]
            paths = [path for path in objects if RECORDING_INTERFACE in objects[path]]
        else:
            member = {"vms": "ListVMs", "images": "ListImages"}[listing]
            reply = await self.reply(
                MANAGER_PATH, MANAGER_INTERFACE, member, no_autostart=True
            )
            paths = reply.body[0]
        return sorted(unescape_path_label(path.rpartition("/")[2]) for path in paths)

    async def _manager_property(self, name: str) -> Any:
        reply = await self.reply(
            MANAGER_PATH, PROPERTIES, "Get", "ss", [MANAGER_INTERFACE, name]
        )
        return reply.body[0].value

    async def api_revision(self) -> int:
        """kdlabd's APIRevision (the Manager's property)."""
        return int(await self._manager_property("APIRevision"))

    async def version(self) -> str:
        """kdlabd's Version (the Manager's property), for people."""
        return str(await self._manager_property("Version"))

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
    ) -> Reply:
        path = await self.vm_path(name)
        return await self.reply(
            path, VM_INTERFACE, member, signature, body, unix_fds=unix_fds
        )

    async def create_vm(self, name: str, options: VMOptions, files: BootFiles) -> str:
        """Create VM *name* booting *files*; returns its object path."""
        # Descriptors travel out of band; the options hold their index in unix_fds.
        fds = [files.kernel] if files.initrd is None else [files.kernel, files.initrd]
        values = {
            **options.fields(),
            "kernel": 0,
            "initrd": 1 if files.initrd is not None else None,
        }
        body = [name, _variants(values, CREATE_OPTIONS)]
        return str(await self._manager("CreateVM", "sa{sv}", body, fds))

    async def list_vms(self) -> list[VM]:
        return await self._objects(VM_INTERFACE, VM)

    async def vm(self, name: str) -> VM:
        path = await self.vm_path(name)
        return VM.from_properties(await self._properties(path, VM_INTERFACE))

    async def start(
        self,
        name: str,
        *,
        paused: bool = False,
        kernel: int | None = None,
        initrd: int | None = None,
        checkpoint: str = "",
    ) -> None:
        """Boot *name*; *kernel* and *initrd* are descriptors of a bzImage and an
        initramfs to boot from now on; *checkpoint*: start in that checkpoint's
        state."""
        fds = [fd for fd in (kernel, initrd) if fd is not None]
        values = {
            "paused": paused or None,
            "kernel": fds.index(kernel) if kernel is not None else None,
            "initrd": fds.index(initrd) if initrd is not None else None,
            "checkpoint": checkpoint or None,
        }
        await self._vm(name, "Start", "a{sv}", [_variants(values, START_OPTIONS)], fds)

    async def stop(
        self, name: str, *, force: bool = False, timeout: int | None = None
    ) -> None:
        options = _variants({"force": force or None, "timeout": timeout}, STOP_OPTIONS)
        await self._vm(name, "Stop", "a{sv}", [options])

    async def delete(self, name: str) -> None:
        await self._vm(name, "Delete")

    async def save_checkpoint(self, name: str, tag: str) -> str:
        """Save VM *name*'s state as *tag*; returns the job's path."""
        return str(
            (await self._vm(name, "SaveCheckpoint", "sa{sv}", [tag, {}])).body[0]
        )

    async def restore_checkpoint(self, name: str, tag: str, *, paused: bool) -> str:
        """Return VM *name* to checkpoint *tag*; returns the job's path."""
        options = _variants({"paused": paused or None}, RESTORE_CHECKPOINT_OPTIONS)
        reply = await self._vm(name, "RestoreCheckpoint", "sa{sv}", [tag, options])
        return str(reply.body[0])

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        await self._vm(name, "DeleteCheckpoint", "s", [tag])

    async def diagnosis(self, name: str) -> Diagnosis:
        """The VM's diagnosis in the console's words (GetDiagnosis, debug-vms)."""
        (found,) = (await self._vm(name, "GetDiagnosis")).body
        code, severity, cause, fix = found[:4]
        return code, severity, cause, fix

    async def serve_shares(self, name: str) -> dict[str, int]:
        """Listening sockets for the shares of *name*, by tag, to serve before
        its start (the caller's to close)."""
        reply = await self._vm(name, "ServeShares")
        return {tag: int(reply.unix_fds[i]) for tag, i in reply.body[0].items()}

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
        from kdlabctl.asyncbus import Watch

        async with Watch(self, await self.vm_path(name), VM_INTERFACE, VM) as watch:
            yield watch

    # commands in guests

    async def exec(
        self,
        name: str,
        argv: Sequence[str],
        options: Mapping[str, Any],
        stdin: int | None = None,
    ) -> tuple[int, int, str]:
        """Run *argv* in VM *name*'s guest: the read ends of its stdout and
        stderr, and its object's path. *stdin* is a pipe or socket to feed it."""
        values = {**options, "stdin": None if stdin is None else 0}
        body = [list(argv), _variants(values, EXEC_OPTIONS)]
        fds = [] if stdin is None else [stdin]
        reply = await self._vm(name, "Exec", "asa{sv}", body, fds)
        stdout, stderr, path = reply.body
        return reply.unix_fds[stdout], reply.unix_fds[stderr], str(path)

    async def signal_process(self, path: str, signo: int) -> None:
        await self.reply(path, PROCESS_INTERFACE, "Signal", "i", [signo])

    async def resize_process(self, path: str, rows: int, cols: int) -> None:
        await self.reply(path, PROCESS_INTERFACE, "SetTerminalSize", "qq", [rows, cols])

    async def process(self, path: str) -> dict[str, Any]:
        """The properties of the command at *path*."""
        return await self._properties(path, PROCESS_INTERFACE)

    # dumps

    async def take_dump(self, name: str, *, compress: bool = False) -> tuple[str, str]:
        """Dump VM *name*'s memory; the dump's and the job's object paths."""
        options = _variants({"compress": compress or None}, TAKE_DUMP_OPTIONS)
        reply = await self._vm(name, "TakeDump", "a{sv}", [options])
        return str(reply.body[0]), str(reply.body[1])

    async def dump_path(self, dump_id: str) -> str:
        """The object path of dump *dump_id* (NoSuchDump if there is none)."""
        return str(await self._manager("GetDump", "s", [dump_id]))

    async def dump_at(self, path: str) -> Dump:
        return Dump.from_properties(await self._properties(path, DUMP_INTERFACE))

    async def list_dumps(self) -> list[Dump]:
        """Every dump, oldest first."""
        dumps = await self._objects(DUMP_INTERFACE, Dump)
        return sorted(dumps, key=lambda dump: (dump.created, dump.id))

    async def open_dump(self, path: str) -> int:
        """A read-only, seekable descriptor of the dump at *path*."""
        return int((await self.reply(path, DUMP_INTERFACE, "Open")).unix_fds[0])

    async def delete_dump(self, dump_id: str) -> None:
        await self.reply(await self.dump_path(dump_id), DUMP_INTERFACE, "Delete")

    # recordings

    async def _vm_since(
        self, revision: int, name: str, member: str, signature: str, body: list[Any]
    ) -> Reply:
        """Call VM method *member*, which came with APIRevision *revision*: a
        kdlabd older than that (upgraded, not yet restarted) is told as such
        rather than as dbus-next's UnknownMethod."""
        try:
            return await self._vm(name, member, signature, body)
        except RemoteError as err:
            if err.name != UNKNOWN_METHOD:
                raise
            running = await self.api_revision()
            if running >= revision:
                raise
            raise RemoteError(
                err.name,
                f"kdlabd has no VM.{member}: it runs APIRevision {running}, older "
                f"than this kdlabctl ({member} came with {revision}); restart "
                "kdlabd (systemctl restart kdlabd) to run the installed kdlab",
            ) from None

    async def record(
        self,
        name: str,
        *,
        recording_name: str = "",
        paused: bool = False,
        single_cpu: bool = False,
    ) -> str:
        """Start VM *name* recording; returns the recording's path."""
        values = {
            "name": recording_name or None,
            "paused": paused or None,
            "single_cpu": single_cpu or None,
        }
        body = [_variants(values, RECORD_OPTIONS)]
        reply = await self._vm_since(RECORDINGS_REVISION, name, "Record", "a{sv}", body)
        return str(reply.body[0])

    async def replay(
        self, name: str, recording_id: str, *, snapshot_interval: float | None = None
    ) -> str:
        """Start VM *name* replaying *recording_id*, paused before its first
        instruction; returns the recording's path."""
        values = {"snapshot_interval": snapshot_interval}
        body = [recording_path(recording_id), _variants(values, REPLAY_OPTIONS)]
        reply = await self._vm_since(
            RECORDINGS_REVISION, name, "Replay", "oa{sv}", body
        )
        return str(reply.body[0])

    async def _recording(
        self,
        recording_id: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
    ) -> Reply:
        """Call *member* on recording *recording_id*: there is no GetRecording,
        so a recording that does not exist is the bus library's answer for an
        object that does not, told as NoSuchRecording."""
        path = recording_path(recording_id)
        try:
            return await self.reply(path, interface, member, signature, body)
        except RemoteError as err:
            if err.name not in NO_OBJECT:
                raise
            raise RemoteError(
                NoSuchRecording.dbus_name(),
                f"no recording is named {recording_id}: kdlabctl recording list "
                "shows them",
            ) from None

    async def recording(self, recording_id: str) -> Recording:
        reply = await self._recording(
            recording_id, PROPERTIES, "GetAll", "s", [RECORDING_INTERFACE]
        )
        return Recording.from_properties(unwrapped(reply.body[0]))

    async def list_recordings(self) -> list[Recording]:
        """Every recording, oldest first."""
        found = await self._objects(RECORDING_INTERFACE, Recording)
        return sorted(found, key=lambda recording: (recording.created, recording.id))

    async def delete_recording(self, recording_id: str) -> None:
        await self._recording(recording_id, RECORDING_INTERFACE, "Delete")

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
        options = _variants(build.fields(), BUILD_OPTIONS)
        return str(await self._manager("BuildImage", "sa{sv}", [name, options]))

    async def delete_image(self, name: str) -> None:
        await self._image(name, "Delete")

    async def resize_image(self, name: str, size: int) -> None:
        await self._image(name, "Resize", "ta{sv}", [size, {}])

    # jobs

    @contextlib.asynccontextmanager
    async def watch_job(self, path: str) -> AsyncIterator[Watch[Job]]:
        """The job at *path*, followed by its signals until it ends (Completed)."""
        from kdlabctl.asyncbus import Watch

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
