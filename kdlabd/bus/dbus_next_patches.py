"""Every patch kdlabd makes to dbus-next's internals, in this one module.

kdlabd pins dbus-next 0.2.3 (pyproject.toml), whose upstream is no longer
maintained. What kdlabd needs and 0.2.3 does not do right is fixed here by
overriding private members of its ``MessageBus`` (or replacing a private
class); the day dbus-next is replaced or fixed, this module is the work. Each
patch below names its reason, the upstream report where there is one, and
the test that fails without it:

1. The caller of a method: dbus-next tells a method neither its sender nor
   its message. A message handler records the call
   (:data:`kdlabd.bus.calls.CURRENT_CALL`) before dispatch, in the context
   dbus-next copies into the method's task (``_record_call``; reads
   ``_unmarshaller``). Without it every kdlab method fails for want of a
   sender: tests/bus/test_policy.py (every call).
2. Lost descriptors: with a full descriptor table the kernel drops a call's
   SCM_RIGHTS descriptors and sets MSG_CTRUNC; dbus-next ignores the flag and
   hands the method None for each ``h``, "no descriptor sent"
   (``_create_unmarshaller``, :class:`_Receiver`).
   tests/bus/test_descriptors.py.
3. Descriptors of calls dbus-next answers itself (unknown member or
   signature, Introspect, Peer) stay open for ever: anyone could fill
   kdlabd's table (``_make_method_handler``, ``_process_message``; upstream
   python-dbus-next issue 162). tests/bus/test_security.py::
   test_descriptors_sent_by_anyone_with_unserved_calls_are_closed.
4. A descriptor a method returns (``h``) stays open in kdlabd after the
   reply went out: one leaked per OpenConsole, OpenGdb, OpenConsoleLog
   (``send``; the same upstream issue 162). tests/bus/test_dbus_next_patches.py::
   test_returned_descriptors_are_not_kept.
5. Error replies logged as crashes: the reply context sends the error reply
   of an async method's exception, then lets the exception escape (its
   ``__exit__`` drops ``_exit``'s result), and asyncio logs a traceback for
   every error reply (``_send_reply``, :class:`_ReplyThatHandles`; fixed in
   the dbus-fast fork, Bluetooth-Devices/dbus-fast PR 127).
   tests/bus/test_dbus_next_patches.py::test_an_error_reply_logs_no_traceback.
6. GetManagedObjects re-reads and re-marshals every property of every object
   on each call, and dbus-next's own handler is quadratic besides: after
   every interface it walks every object again to see whether the reply is
   complete (``_default_get_managed_objects_handler``, reading
   ``_path_exports`` and ``ServiceInterface._get_properties``). kdlabd keeps
   each object's part of the reply marshalled (:class:`_ManagedObjects`) and
   drops it when the object is exported or unexported or announces a change
   (``PropertiesChanged``, seen in ``send``): a reply is the kept parts put
   together. Every kdlab property changes only with its announcement
   (:func:`kdlabd.bus.properties.announce_changes`), which clients rely on
   as much. Measured: bench ``scale:GetManagedObjects_p50`` (bench/README.md);
   that the reply is complete and current: tests/bus/test_contract.py::
   test_managed_objects_are_every_vm_with_every_property and
   test_managed_objects_follow_every_change, tests/bus/test_scale.py,
   tests/unit/test_marshalled.py.
7. InterfacesAdded and InterfacesRemoved are sent from the object's own
   path; the D-Bus specification (and GDBusObjectManagerClient) wants them
   from the object manager's, as sd-bus does since systemd issue 2986
   (``send``). tests/bus/test_signals.py::
   test_interfaces_removed_comes_from_the_object_manager.
8. A call on a lost connection registers its reply handler after the
   connection is gone and waits for ever: kdlabd would hang at start-up
   instead of exiting when the bus dies under it (``_call``, reading
   ``_disconnected``). tests/bus/test_bus_loss.py::
   test_a_call_on_a_lost_connection_fails_at_once.
9. The writer takes a full socket buffer (EAGAIN) for a lost connection and
   drops the bus: a burst of signals, such as exporting 1000 VMs at start-up,
   left kdlabd connected to nothing (``_writer``, :class:`_PatientWriter`
   replacing ``_MessageWriter``; upstream python-dbus-next issue 153, PR 154
   not merged). tests/bus/test_scale.py.
10. A reply kept marshalled: dbus-next marshals every body it sends. A method
   (or patch 6) may answer with a :class:`Marshalled` body, whose bytes are
   sent as they are (``send``, :class:`_MarshalledReply`). ListVMs keeps its
   answer so until a VM comes or goes (bench ``scale:ListVMs_p50``);
   tests/unit/test_marshalled.py shows the bytes are dbus-next's own.
"""

from __future__ import annotations

import array
import asyncio
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dbus_next import Message, MessageType, Variant
from dbus_next._private.constants import LITTLE_ENDIAN, PROTOCOL_VERSION, HeaderField
from dbus_next._private.marshaller import Marshaller
from dbus_next.aio import MessageBus
from dbus_next.aio.message_bus import _MessageWriter
from dbus_next.service import ServiceInterface

from kdlab.wire import MANAGER_PATH
from kdlabd.bus.calls import CURRENT_CALL, Call, close_fds

_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
_PROPERTIES = "org.freedesktop.DBus.Properties"
MANAGED_OBJECTS = "a{oa{sa{sv}}}"


class KdlabBus(MessageBus):
    """dbus-next's asyncio ``MessageBus`` with kdlabd's patches (see the module).

    It records each incoming call (patch 1), and a descriptor returned by a
    method is the caller's from then on: kdlabd closes its own copy once the
    reply has been written (patch 4).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._writer = _PatientWriter(self)  # patch 9
        self.add_message_handler(self._record_call)
        self._dispatched: set[int] = set()
        self._managed = _ManagedObjects()  # patch 6

    def export(self, path: str, interface: ServiceInterface) -> None:
        """Patch 6: the object's part of GetManagedObjects is made again."""
        self._managed.forget(path)
        super().export(path, interface)

    def unexport(self, path: str, interface: Any = None) -> None:
        """Patch 6: the object's part of GetManagedObjects goes or is made again."""
        self._managed.forget(path)
        super().unexport(path, interface)

    def _create_unmarshaller(self) -> Any:
        """Patch 2: read the socket through a receiver that notes MSG_CTRUNC."""
        unmarshaller = super()._create_unmarshaller()
        if unmarshaller.sock is not None:
            unmarshaller.sock = _Receiver(unmarshaller.sock)
        return unmarshaller

    def _record_call(self, msg: Message) -> None:
        """Patch 1: before dispatch, who sent the call and what came with it."""
        if msg.message_type is MessageType.METHOD_CALL:
            # The unmarshaller that read *msg* is replaced only after this.
            receiver = getattr(self._unmarshaller, "sock", None)
            lost = isinstance(receiver, _Receiver) and receiver.truncated
            CURRENT_CALL.set(
                Call(
                    sender=msg.sender or "",
                    method=f"{msg.interface}.{msg.member}",
                    path=msg.path,
                    unix_fds=list(msg.unix_fds),
                    fds_lost=lost,
                )
            )

    def _make_method_handler(self, interface: Any, method: Any) -> Any:
        """Patch 3: note which calls reach a kdlab method (which closes their
        descriptors itself)."""
        handler = super()._make_method_handler(interface, method)

        def dispatch(msg: Message, send_reply: Any) -> None:
            self._dispatched.add(id(msg))
            handler(msg, send_reply)

        return dispatch

    def _process_message(self, msg: Message) -> None:
        """Patch 3: close the descriptors of calls no kdlab method receives."""
        try:
            super()._process_message(msg)
        finally:
            if msg.unix_fds and id(msg) not in self._dispatched:
                close_fds(msg.unix_fds)
            self._dispatched.discard(id(msg))

    def _default_get_managed_objects_handler(
        self, msg: Message, send_reply: Any
    ) -> None:
        """Patch 6: GetManagedObjects put together from each object's kept part."""
        prefix = msg.path.rstrip("/") + "/"
        body = self._managed.reply(
            (path, interfaces)
            for path, interfaces in self._path_exports.items()
            if path.startswith(prefix)
        )
        send_reply(Message.new_method_return(msg, MANAGED_OBJECTS, [body]))

    def _send_reply(self, msg: Message) -> _ReplyThatHandles:
        """Patch 5."""
        return _ReplyThatHandles(super()._send_reply(msg))

    def _call(self, msg: Message, callback: Any) -> None:
        """Patch 8: a call on a lost connection fails at once."""
        if self._disconnected:
            raise ConnectionError("the D-Bus connection is closed")
        super()._call(msg, callback)

    def send(self, msg: Message):  # type: ignore[no-untyped-def]
        """Patch 7: ObjectManager signals from the manager's path. Patch 4:
        returned descriptors are closed once the reply is written. Patch 6:
        an object that announces a change is marshalled again. Patch 10:
        a reply's :class:`Marshalled` body goes out as it is."""
        if msg.message_type is MessageType.SIGNAL and (msg.interface, msg.member) == (
            _PROPERTIES,
            "PropertiesChanged",
        ):
            self._managed.forget(msg.path)
        if msg.interface == _OBJECT_MANAGER and msg.path.startswith(MANAGER_PATH + "/"):
            msg.path = MANAGER_PATH
        if len(msg.body) == 1 and isinstance(msg.body[0], Marshalled):
            msg = _MarshalledReply(msg, msg.body[0])
        future = super().send(msg)
        if msg.unix_fds and msg.message_type is MessageType.METHOD_RETURN:
            fds = list(msg.unix_fds)
            future.add_done_callback(lambda _f: close_fds(fds))
        return future


@dataclass(frozen=True)
class Marshalled:
    """Patch 10: a reply's body, marshalled already (little-endian, as its
    message's body starts: at an offset aligned to 8)."""

    signature: str
    data: bytes


def marshal(signature: str, body: list[Any]) -> Marshalled:
    """*body* marshalled as dbus-next marshals a message's body of *signature*."""
    marshaller = Marshaller(signature, body)
    marshaller.marshall()
    return Marshalled(signature, bytes(marshaller.buffer))


class _MarshalledReply(Message):
    """Patch 10: a method return whose body is sent as marshalled already.

    Its header is dbus-next's for a method return (``Message._marshall``):
    the reply serial, the destination, the signature.
    """

    def __init__(self, reply: Message, body: Marshalled) -> None:
        if reply.message_type is not MessageType.METHOD_RETURN:
            raise ValueError(f"a marshalled body in a {reply.message_type.name}")
        if reply.signature != body.signature or reply.unix_fds:
            raise ValueError(
                f"a reply of signature {reply.signature!r} given a marshalled "
                f"body of {body.signature!r}"
            )
        super().__init__(
            message_type=MessageType.METHOD_RETURN,
            flags=reply.flags,
            reply_serial=reply.reply_serial,
            destination=reply.destination,
            signature=body.signature,
            serial=reply.serial,
        )
        self._data = body.data

    def _marshall(self, negotiate_unix_fd: bool = False) -> bytes:
        fields = [[HeaderField.REPLY_SERIAL.value, Variant("u", self.reply_serial)]]
        if self.destination:
            fields.append(
                [HeaderField.DESTINATION.value, Variant("s", self.destination)]
            )
        fields.append([HeaderField.SIGNATURE.value, Variant("g", self.signature)])
        header = Marshaller(
            "yyyyuua(yv)",
            [
                LITTLE_ENDIAN,
                self.message_type.value,
                self.flags.value,
                PROTOCOL_VERSION,
                len(self._data),
                self.serial,
                fields,
            ],
        )
        header.marshall()
        header.align(8)
        return bytes(header.buffer) + self._data


# Zero bytes that align a dict entry's end to 8, by its length modulo 8.
_PADDING = [b"\0" * (-n % 8) for n in range(8)]


class _ManagedObjects:
    """Patch 6: each exported object's part of the GetManagedObjects reply, kept
    marshalled until :meth:`forget` (a change, an export or unexport).

    A part is one dict entry ``{o a{sa{sv}}}`` of the reply's array. Entries
    are aligned to 8 and nothing in them to more, so an entry marshalled on
    its own from offset 0 has the bytes it has anywhere in the reply.
    """

    def __init__(self) -> None:
        self._entries: dict[str, bytes] = {}

    def forget(self, path: str) -> None:
        self._entries.pop(path, None)

    def reply(
        self, objects: Iterable[tuple[str, list[ServiceInterface]]]
    ) -> Marshalled:
        """The reply's body for *objects* (path, interfaces), in their order."""
        pieces = [b"", b"\0" * 4]  # the array's length, padding to its first entry
        for path, interfaces in objects:
            entry = self._entries.get(path)
            if entry is None:
                entry = self._entries[path] = _entry(path, interfaces)
            pieces += (entry, _PADDING[len(entry) % 8])
        if len(pieces) > 2:
            pieces.pop()  # the array ends with its last entry, unpadded
        pieces[0] = struct.pack("<I", sum(map(len, pieces)) - 4)
        return Marshalled(MANAGED_OBJECTS, b"".join(pieces))


def _entry(path: str, interfaces: list[ServiceInterface]) -> bytes:
    """The marshalled ``{o a{sa{sv}}}`` of the object at *path*."""
    values = {interface.name: _property_variants(interface) for interface in interfaces}
    return marshal("(oa{sa{sv}})", [[path, values]]).data


class _Receiver:
    """Patch 2: the bus socket as dbus-next's unmarshaller reads it, noting
    when the kernel dropped descriptors (MSG_CTRUNC)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.truncated = False

    def recvmsg(self, *args: Any) -> tuple[bytes, list[Any], int, Any]:
        data, ancdata, flags, address = self._sock.recvmsg(*args)
        if flags & socket.MSG_CTRUNC:
            self.truncated = True
        return data, ancdata, flags, address


class _PatientWriter(_MessageWriter):
    """Patch 9: a writer that waits until a full socket is writable again,
    instead of taking EAGAIN for a lost connection."""

    buf: memoryview | None
    offset: int
    unix_fds: list[int] | None
    fut: asyncio.Future[None] | None

    def write_callback(self) -> None:
        try:
            while (buf := self._next_message()) is not None:
                try:
                    self.offset += self._send(buf[self.offset :])
                except BlockingIOError:
                    return  # the loop calls again once the socket drains
                if self.offset < len(buf):
                    return
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except Exception as err:
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(err)
            self.bus._finalize(err)

    def _next_message(self) -> memoryview | None:
        """The message being written; None (and the socket unwatched) if none is."""
        if self.buf is None:
            if self.messages.empty():
                self.loop.remove_writer(self.fd)
                return None
            data, self.unix_fds, self.fut = self.messages.get_nowait()
            self.buf, self.offset = memoryview(data), 0
        return self.buf

    def _send(self, data: memoryview) -> int:
        """Send what the socket takes of *data*; descriptors go with the first byte."""
        if not (self.unix_fds and self.negotiate_unix_fd):
            return int(self.sock.send(data))
        rights = [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))
        ]
        sent = int(self.sock.sendmsg([data], rights))
        self.unix_fds = None
        return sent


def _property_variants(interface: ServiceInterface) -> dict[str, Variant]:
    """Patch 6: the readable properties of *interface*, as GetAll returns them.

    Read when its part of the reply is made again: after the change it
    announced has been made (an announcement is sent before its new values are
    kept, but nothing reads them in between).
    """
    return {
        prop.name: Variant(
            prop.signature, getattr(interface, prop.prop_getter.__name__)
        )
        for prop in ServiceInterface._get_properties(interface)
        if not prop.disabled and prop.access.readable()
    }


class _ReplyThatHandles:
    """Patch 5: dbus-next's reply context, reporting an exception it turned
    into an error reply as handled."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __enter__(self) -> _ReplyThatHandles:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, tb: Any) -> bool:
        return bool(self._inner._exit(exc_type, exc_value, tb))

    def __call__(self, reply: Message) -> None:
        self._inner(reply)

    def send_error(self, exc: Exception) -> None:
        self._inner.send_error(exc)
