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
import time

from dbus_next import Message
from dbus_next._private.unmarshaller import Unmarshaller

from bench.lab import BenchError
from bench.measure import seconds
from kdlabctl.quickbus import Call, QuickBus, RemoteError


class RawClient:
    """One connection to the bus at *address*, authenticated as this uid
    (kdlabctl's own plain connection, whose replies it takes as bytes)."""

    def __init__(self, address: str, timeout: float) -> None:
        try:
            self._bus = QuickBus.connect(address, timeout)
        except RemoteError as err:
            raise BenchError(str(err)) from None

    def close(self) -> None:
        self._bus.close()

    def call(self, destination: str, path: str, interface: str, member: str) -> bytes:
        """Call *member* (no arguments); the whole reply, as it came."""
        return self.timed(destination, path, interface, member)[1]

    def timed(
        self, destination: str, path: str, interface: str, member: str
    ) -> tuple[float, bytes]:
        """Seconds from sending the call to the reply's last byte, and the reply."""
        call = Call(destination, path, interface, member)
        start = time.perf_counter()
        reply = self._bus.reply_to(self._bus.send(call))
        took = time.perf_counter() - start
        if reply[1] == ERROR:
            raise BenchError(f"{member} failed: {decode(reply).body}")
        return took, reply


ERROR = 3  # the message type of an error reply


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
