"""The method call being served: who sent it and which descriptors came with it.

dbus-next gives a method handler neither the sender nor the message. A
message handler records both in a ContextVar before dispatch; dbus-next then
starts the (async) method in a task that copies the context.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Any

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from kdlabd.wire import MANAGER_PATH


@dataclass(frozen=True)
class Call:
    """One incoming method call."""

    sender: str
    unix_fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Close the descriptors that arrived with the call; kdlabd owns them."""
        for fd in self.unix_fds:
            with contextlib.suppress(OSError):
                os.close(fd)


CURRENT_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "kdlab_current_call", default=None
)


def _record_call(msg: Message) -> None:
    if msg.message_type is MessageType.METHOD_CALL:
        CURRENT_CALL.set(Call(msg.sender or "", list(msg.unix_fds)))


_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class KdlabBus(MessageBus):
    """A MessageBus that records each call's sender and hands over returned descriptors.

    A descriptor returned by a method (type ``h``) is the caller's from then
    on: kdlabd closes its own copy once the reply has been written.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.add_message_handler(_record_call)
        self._dispatched: set[int] = set()

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

    def _send_reply(self, msg: Message) -> _ReplyThatHandles:
        return _ReplyThatHandles(super()._send_reply(msg))

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
