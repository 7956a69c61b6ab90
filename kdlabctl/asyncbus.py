"""kdlabctl's dbus-next connection: descriptors, signals and asyncio.

Commands that pass descriptors (create, console, gdb) or follow an object
(start and stop waiting for a state, jobs) run here; plain calls take
:mod:`kdlabctl.quickbus` instead, which starts in a fraction of the time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from dbus_next import Message, MessageFlag, MessageType
from dbus_next.aio import MessageBus

from kdlab.wire import BUS_NAME, MANAGER_PATH, bus_address
from kdlabctl.client import OBJECT_MANAGER, PROPERTIES, Client, unwrapped
from kdlabctl.quickbus import DBUS_NAME, DBUS_PATH, Call, RemoteError, Reply
from kdlabctl.records import Record

T = TypeVar("T")
R = TypeVar("R", bound=Record)

# What kdlabctl reports when kdlabd leaves the bus under a watch (exit 69).
GONE = "org.freedesktop.DBus.Error.NameHasNoOwner"
DISCONNECTED = "org.freedesktop.DBus.Error.Disconnected"


class Connection:
    """A dbus-next bus as a :class:`kdlabctl.client.Connection`."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

    async def call(
        self,
        call: Call,
        *,
        unix_fds: Sequence[int] = (),
        no_autostart: bool = False,
    ) -> Reply:
        message = Message(
            destination=call.destination,
            path=call.path,
            interface=call.interface,
            member=call.member,
            signature=call.signature,
            body=list(call.body),
            unix_fds=list(unix_fds),
            flags=MessageFlag.NO_AUTOSTART if no_autostart else MessageFlag.NONE,
        )
        # dbus-next 0.2.3 waits for ever for the reply to a call made once
        # the connection was lost (a host's ssh that died, a bus that quit).
        if not self.bus.connected:
            raise RemoteError(DISCONNECTED, "the bus connection closed")
        try:
            reply = await self.bus.call(message)
        except (EOFError, OSError):  # how dbus-next says it was lost meanwhile
            raise RemoteError(DISCONNECTED, "the bus connection closed") from None
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise RemoteError(reply.error_name or "", str(text))
        return Reply(reply.body, reply.serial, reply.sender, reply.unix_fds)

    def disconnect(self) -> None:
        self.bus.disconnect()


async def connect(bus: str, timeout: float) -> Connection:
    """Connect to *bus*; any way that fails is "not reachable" (exit 69).

    A bus may refuse a client in many ways (no socket, authentication
    rejected, the connection closed during the handshake, a full bus that
    never answers): each is one sentence for the user, never a traceback.
    """
    try:
        address = bus_address(bus)
        connecting = MessageBus(bus_address=address, negotiate_unix_fd=True)
        return Connection(await asyncio.wait_for(connecting.connect(), timeout))
    except TimeoutError:
        reason = f"no answer within {timeout:g} s"
    except Exception as err:  # any failure to connect means the same
        reason = str(err) or type(err).__name__
    raise RemoteError(
        "org.freedesktop.DBus.Error.NoServer",
        f"cannot connect to the {bus} bus: {reason}",
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
        self._props = unwrapped(reply.body[0])
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
            self._props.update(unwrapped(msg.body[1]))
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
