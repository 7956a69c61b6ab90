"""A small synchronous-looking D-Bus client for kdlabd (dbus-next under asyncio).

Calls are made with explicit signatures, no introspection round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from kdlab.wire import (
    BUS_NAME,
    MANAGER_INTERFACE,
    MANAGER_PATH,
    VM_INTERFACE,
    bus_address,
)

T = TypeVar("T")

PROPERTIES = "org.freedesktop.DBus.Properties"
CONNECT_TIMEOUT = 25.0
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class RemoteError(Exception):
    """An error reply from kdlabd (or the bus), by D-Bus error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class Client:
    """A connection to kdlabd over the bus named by ``--bus``."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus

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

    async def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        unix_fds: list[int] | None = None,
        with_fds: bool = False,
    ) -> Any:
        """Call a method; return its body (and received descriptors with *with_fds*)."""
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
                unix_fds=unix_fds or [],
            )
        )
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            raise RemoteError(reply.error_name or "", str(text))
        if with_fds:
            return reply.body, list(reply.unix_fds)
        return reply.body

    async def manager(
        self,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        unix_fds: list[int] | None = None,
    ) -> Any:
        return await self.call(
            MANAGER_PATH, MANAGER_INTERFACE, member, signature, body, unix_fds=unix_fds
        )

    async def vm_path(self, name: str) -> str:
        (path,) = await self.manager("GetVM", "s", [name])
        return str(path)

    async def vm_call(
        self, name: str, member: str, signature: str = "", body: list[Any] | None = None
    ) -> Any:
        return await self.call(
            await self.vm_path(name), VM_INTERFACE, member, signature, body
        )

    async def properties(
        self, path: str, interface: str = VM_INTERFACE
    ) -> dict[str, Any]:
        (props,) = await self.call(path, PROPERTIES, "GetAll", "s", [interface])
        return {key: variant.value for key, variant in props.items()}

    async def vm_properties(self, path: str) -> dict[str, Any]:
        return await self.properties(path, VM_INTERFACE)

    async def objects(self, interface: str = VM_INTERFACE) -> list[dict[str, Any]]:
        """The properties of every object with *interface*, in one round trip."""
        (objects,) = await self.call(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects")
        found = []
        for interfaces in objects.values():
            if interface in interfaces:
                props = interfaces[interface]
                found.append({key: variant.value for key, variant in props.items()})
        return sorted(found, key=lambda p: str(p["Name"]))

    async def vms(self) -> list[dict[str, Any]]:
        return await self.objects(VM_INTERFACE)


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


def variant_options(**options: tuple[str, Any] | None) -> dict[str, Variant]:
    """``a{sv}`` options from ``key=(signature, value)``, dropping None."""
    return {key: Variant(*spec) for key, spec in options.items() if spec is not None}
