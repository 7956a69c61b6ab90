"""A D-Bus client that takes replies as bytes: the server's share of a call.

A dbus-next client spends longer decoding a large reply than kdlabd spends
sending it (about 94 ms for GetManagedObjects of 1000 VMs, in pure Python), so
a round trip through it measures the client. :class:`RawClient` speaks the
protocol on a plain socket: it sends a call and waits for the last byte of the
reply, which it neither decodes nor checks beyond its header. What a client
pays to decode the reply is measured on its own (:func:`decode_seconds`).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import time

from dbus_next import Message, MessageType
from dbus_next._private.unmarshaller import Unmarshaller

from bench.lab import BenchError
from bench.measure import seconds

_FIXED_HEADER = (
    16  # endianness, type, flags, version, body length, serial, fields length
)
_CHUNK = 1 << 20


def _socket_path(address: str) -> str:
    """The socket of a ``unix:path=...`` or ``unix:abstract=...`` bus address."""
    kind, _, rest = address.partition(":")
    params = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
    if kind == "unix" and "path" in params:
        return params["path"]
    if kind == "unix" and "abstract" in params:
        return "\0" + params["abstract"]
    raise BenchError(f"unsupported bus address {address!r}")


class RawClient:
    """One connection to the bus at *address*, authenticated as this uid."""

    def __init__(self, address: str, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(_socket_path(address))
        self._buffer = bytearray()
        self._serial = 0
        uid = str(os.getuid()).encode().hex()
        self._sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        line = self._sock.recv(4096)
        if not line.startswith(b"OK "):
            raise BenchError(f"the bus refused authentication: {line!r}")
        self._sock.sendall(b"BEGIN\r\n")
        self.call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "Hello",
        )

    def close(self) -> None:
        self._sock.close()

    def call(self, destination: str, path: str, interface: str, member: str) -> bytes:
        """Call *member* (no arguments); the whole reply, as it came."""
        return self.timed(destination, path, interface, member)[1]

    def timed(
        self, destination: str, path: str, interface: str, member: str
    ) -> tuple[float, bytes]:
        """Seconds from sending the call to the reply's last byte, and the reply."""
        self._serial += 1
        request = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            serial=self._serial,
        )._marshall()
        start = time.perf_counter()
        self._sock.sendall(request)
        while True:
            reply = self._message()
            kind = reply[1]
            if kind in (MessageType.METHOD_RETURN.value, MessageType.ERROR.value):
                break  # one call at a time: the reply is the one to it
        took = time.perf_counter() - start
        if kind == MessageType.ERROR.value:
            raise BenchError(f"{member} failed: {decode(reply).body}")
        return took, reply

    def _message(self) -> bytes:
        """The next whole message on the connection."""
        self._fill(_FIXED_HEADER)
        order = "<" if self._buffer[0] == ord("l") else ">"
        body, fields = struct.unpack_from(order + "I4xI", self._buffer, 4)
        header = _FIXED_HEADER + fields + (-fields % 8)
        size = header + body
        self._fill(size)
        message = bytes(self._buffer[:size])
        del self._buffer[:size]
        return message

    def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = self._sock.recv(_CHUNK)
            if not chunk:
                raise BenchError("the bus closed the connection")
            self._buffer += chunk


def decode(data: bytes) -> Message:
    """*data* decoded as a dbus-next client decodes a message it receives."""
    unmarshaller = Unmarshaller(io.BytesIO(data))
    message = unmarshaller.unmarshall()
    if message is None:
        raise BenchError("an incomplete message")
    return message


def decode_seconds(data: bytes) -> float:
    """What a dbus-next client spends decoding the message *data*."""
    return seconds(lambda: decode(data))
