"""The method call being served: who sent it and which descriptors came with it.

dbus-next gives a method handler neither the sender nor the message. A
message handler records both in a ContextVar before dispatch; dbus-next then
starts the (async) method in a task that copies the context.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.aio.message_bus import _MessageWriter
from dbus_next.service import ServiceInterface

from kdlab.wire import MANAGER_PATH


@dataclass(frozen=True)
class Call:
    """One incoming method call.

    *fds_lost*: the call came with descriptors that kdlabd could not receive
    (its descriptor table was full): the kernel dropped them.
    """

    sender: str
    unix_fds: list[int] = field(default_factory=list)
    fds_lost: bool = False

    def close_fds(self) -> None:
        """Close the descriptors that arrived with the call; kdlabd owns them."""
        for fd in self.unix_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


CURRENT_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "kdlab_current_call", default=None
)


class _Receiver:
    """The bus socket as dbus-next's unmarshaller reads it, noting lost descriptors.

    When the receiver's descriptor table is full, the kernel drops the
    descriptors of SCM_RIGHTS it cannot install and sets MSG_CTRUNC. dbus-next
    0.2.3 ignores the flag and hands the method None for each lost ``h``,
    which read as "the client sent no descriptor".
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.truncated = False

    def recvmsg(self, *args: Any) -> tuple[bytes, list[Any], int, Any]:
        data, ancdata, flags, address = self._sock.recvmsg(*args)
        if flags & socket.MSG_CTRUNC:
            self.truncated = True
        return data, ancdata, flags, address


_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class KdlabBus(MessageBus):
    """A MessageBus that records each call's sender and hands over returned descriptors.

    A descriptor returned by a method (type ``h``) is the caller's from then
    on: kdlabd closes its own copy once the reply has been written. It also
    works around dbus-next 0.2.3's flaws, each explained where it is fixed.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._writer = _PatientWriter(self)
        self.add_message_handler(self._record_call)
        self._dispatched: set[int] = set()

    def _create_unmarshaller(self) -> Any:
        unmarshaller = super()._create_unmarshaller()
        if unmarshaller.sock is not None:
            unmarshaller.sock = _Receiver(unmarshaller.sock)
        return unmarshaller

    def _record_call(self, msg: Message) -> None:
        """Before dispatch: who sent the call, and what came with it."""
        if msg.message_type is MessageType.METHOD_CALL:
            # The unmarshaller that read *msg* is replaced only after this.
            receiver = getattr(self._unmarshaller, "sock", None)
            lost = isinstance(receiver, _Receiver) and receiver.truncated
            CURRENT_CALL.set(Call(msg.sender or "", list(msg.unix_fds), lost))

    def _make_method_handler(self, interface: Any, method: Any) -> Any:
        handler = super()._make_method_handler(interface, method)

        def dispatch(msg: Message, send_reply: Any) -> None:
            self._dispatched.add(id(msg))
            handler(msg, send_reply)

        return dispatch

    def _process_message(self, msg: Message) -> None:
        """Close the descriptors of calls no kdlab method receives.

        dbus-next answers some calls itself (unknown member or signature,
        Introspect, Peer); descriptors sent with them would otherwise stay
        open in kdlabd for ever. A kdlab method's boundary closes its own.
        """
        try:
            super()._process_message(msg)
        finally:
            if msg.unix_fds and id(msg) not in self._dispatched:
                Call("", list(msg.unix_fds)).close_fds()
            self._dispatched.discard(id(msg))

    def _default_get_managed_objects_handler(
        self, msg: Message, send_reply: Any
    ) -> None:
        """GetManagedObjects in one pass over the exported objects.

        dbus-next 0.2.3 checks after every interface whether the whole reply
        is complete, walking every object again: quadratic in the number of
        VMs (building the reply for 1000 VMs took 219 ms, now 102 ms; see
        bench/README.md). kdlab's properties are plain attributes, so their
        values are all at hand at once.
        """
        prefix = msg.path.rstrip("/") + "/"
        objects = {
            path: {iface.name: _property_variants(iface) for iface in interfaces}
            for path, interfaces in self._path_exports.items()
            if path.startswith(prefix)
        }
        send_reply(Message.new_method_return(msg, "a{oa{sa{sv}}}", [objects]))

    def _send_reply(self, msg: Message) -> _ReplyThatHandles:
        return _ReplyThatHandles(super()._send_reply(msg))

    def _call(self, msg: Message, callback: Any) -> None:
        """A call on a lost connection fails at once.

        dbus-next 0.2.3 registers the reply handler after the connection is
        gone and waits for ever: kdlabd would hang at start-up instead of
        exiting when the bus dies under it.
        """
        if self._disconnected:
            raise ConnectionError("the D-Bus connection is closed")
        super()._call(msg, callback)

    def send(self, msg: Message):  # type: ignore[no-untyped-def]
        if msg.interface == _OBJECT_MANAGER and msg.path.startswith(MANAGER_PATH + "/"):
            # dbus-next 0.2.3 sends InterfacesAdded/Removed from the object's own
            # path; the spec (and GDBusObjectManagerClient) listen on the object
            # manager's, as sd-bus does since systemd PR #641.
            msg.path = MANAGER_PATH
        future = super().send(msg)
        if msg.unix_fds and msg.message_type is MessageType.METHOD_RETURN:
            fds = list(msg.unix_fds)
            future.add_done_callback(lambda _f: Call("", fds).close_fds())
        return future


class _PatientWriter(_MessageWriter):
    """dbus-next 0.2.3's writer takes a full socket buffer (EAGAIN) for a lost
    connection and drops the bus (python-dbus-next issue 153): a burst of
    signals, such as exporting 1000 VMs at start-up, left kdlabd connected to
    nothing. This one waits until the socket is writable again.
    """

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
    """The readable properties of *interface*, as GetAll would return them."""
    return {
        prop.name: Variant(
            prop.signature, getattr(interface, prop.prop_getter.__name__)
        )
        for prop in ServiceInterface._get_properties(interface)
        if not prop.disabled and prop.access.readable()
    }


class _ReplyThatHandles:
    """dbus-next 0.2.3's reply context sends the error reply for an exception
    raised by an async method but then lets the exception escape (its
    ``__exit__`` drops ``_exit``'s result), so asyncio logs a traceback for
    every error reply. This wrapper reports the exception as handled.
    """

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
