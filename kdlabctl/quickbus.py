"""A blocking D-Bus connection for commands that make a few plain calls.

``kdlabctl list`` is one call and a table, and a person waits for it. Through
dbus-next it costs about 60 ms of imports (asyncio, ssl, the GLib glue,
introspection) before the call is even sent, several times what the call and
the table cost together. Commands that only call methods, pass no
descriptors and follow no signals (``list``, ``show``, ``image list``, shell
completion) use this connection instead: the standard library's socket and
struct, one call at a time, replies decoded by readers compiled once per
signature. Everything else keeps dbus-next (signals, descriptors, asyncio).

The protocol is the D-Bus specification's, little-endian, with the
authentication kdlabd's buses accept (EXTERNAL, by the caller's uid). Calls
return the reply's arguments as Python values; variants are :class:`Variant`
(``signature`` and ``value``, as dbus-next spells them), so the typed client
reads both connections' replies the same way. An error reply raises
:class:`RemoteError`.
"""

from __future__ import annotations

import _socket  # socket.py's enums and selectors cost more than this call
import os
import struct

from kdlab.wire import bus_address

TYPE_CHECKING = False  # importing typing costs more than the call

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    Reader = Callable[[bytes, int], tuple[Any, int]]

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
METHOD_CALL, METHOD_RETURN, _ERROR = 1, 2, 3
# Header field codes (the specification's table).
_PATH, _INTERFACE, _MEMBER, _ERROR_NAME, REPLY_SERIAL = 1, 2, 3, 4, 5
_DESTINATION, _SENDER, _SIGNATURE, UNIX_FDS = 6, 7, 8, 9
_NO_AUTO_START = 0x2
_MAX_MESSAGE = 1 << 27  # the specification's limit: 128 MiB
_CHUNK = 1 << 16


class RemoteError(Exception):
    """An error reply, or a bus that cannot be reached, by D-Bus error name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message

    def __str__(self) -> str:
        return self.message


class Reply:
    """A method's reply: its arguments, and what a watch orders signals by."""

    __slots__ = ("body", "sender", "serial", "unix_fds")

    def __init__(
        self,
        body: list[Any],
        serial: int,
        sender: str | None = None,
        unix_fds: list[int] | None = None,
    ) -> None:
        self.body = body
        self.serial = serial
        self.sender = sender
        self.unix_fds = unix_fds or []


class Variant:
    """A decoded ``v``: its signature and its value."""

    __slots__ = ("signature", "value")

    def __init__(self, signature: str, value: Any) -> None:
        self.signature = signature
        self.value = value

    def __repr__(self) -> str:
        return f"Variant({self.signature!r}, {self.value!r})"


# --- reading ---------------------------------------------------------------------

_FIXED = {
    "y": (1, struct.Struct("<B")),
    "n": (2, struct.Struct("<h")),
    "q": (2, struct.Struct("<H")),
    "i": (4, struct.Struct("<i")),
    "u": (4, struct.Struct("<I")),
    "h": (4, struct.Struct("<I")),
    "x": (8, struct.Struct("<q")),
    "t": (8, struct.Struct("<Q")),
    "d": (8, struct.Struct("<d")),
}
_UINT32 = struct.Struct("<I")
_HEAD = struct.Struct("<III")  # body length, serial, header fields' length
_ALIGNMENT = {"b": 4, "s": 4, "o": 4, "g": 1, "v": 1, "a": 4, "(": 8, "{": 8}
_ALIGNMENT.update({code: size for code, (size, _) in _FIXED.items()})


def _split(signature: str) -> list[str]:
    """The single complete types *signature* is made of."""
    types, start = [], 0
    while start < len(signature):
        end = _type_end(signature, start)
        types.append(signature[start:end])
        start = end
    return types


def _type_end(signature: str, start: int) -> int:
    code = signature[start]
    if code == "a":
        return _type_end(signature, start + 1)
    if code in "({":
        closing, depth, at = {"(": ")", "{": "}"}[code], 0, start
        while True:
            if signature[at] == code:
                depth += 1
            elif signature[at] == closing:
                depth -= 1
                if depth == 0:
                    return at + 1
            at += 1
            if at >= len(signature):
                raise ValueError(f"unbalanced signature {signature!r}")
    return start + 1


def _pad(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)


_readers: dict[str, Reader] = {}


def reader(signature: str) -> Reader:
    """A function that reads one value of the single complete type *signature*."""
    found = _readers.get(signature)
    if found is None:
        found = _readers[signature] = _compile(signature)
    return found


def _compile(signature: str) -> Reader:
    code = signature[0]
    if code in _FIXED:
        size, unpack = _FIXED[code][0], _FIXED[code][1].unpack_from

        def fixed(data: bytes, at: int) -> tuple[Any, int]:
            at += -at % size
            return unpack(data, at)[0], at + size

        return fixed
    if code == "b":

        def boolean(data: bytes, at: int) -> tuple[Any, int]:
            at += -at % 4
            return _UINT32.unpack_from(data, at)[0] != 0, at + 4

        return boolean
    if code in "so":

        def string(data: bytes, at: int) -> tuple[Any, int]:
            at += -at % 4
            (length,) = _UINT32.unpack_from(data, at)
            at += 4
            return data[at : at + length].decode(), at + length + 1

        return string
    if code == "g":
        return _signature_value
    if code == "v":
        return _variant
    if code == "a":
        return _array(signature[1:])
    if code in "({":
        members = [reader(part) for part in _split(signature[1:-1])]
        dict_entry = code == "{"

        def struct_(data: bytes, at: int) -> tuple[Any, int]:
            at += -at % 8
            values = []
            for read in members:
                value, at = read(data, at)
                values.append(value)
            return (tuple(values) if dict_entry else values), at

        return struct_
    raise ValueError(f"unknown type code {code!r} in {signature!r}")


def _signature_value(data: bytes, at: int) -> tuple[Any, int]:
    length = data[at]
    return data[at + 1 : at + 1 + length].decode(), at + 2 + length


def _variant(data: bytes, at: int) -> tuple[Any, int]:
    signature, at = _signature_value(data, at)
    value, at = reader(signature)(data, at)
    return Variant(signature, value), at


def _array(element: str) -> Reader:
    alignment = _ALIGNMENT[element[0]]
    read = reader(element)
    if element[0] == "{":
        key, value = (reader(part) for part in _split(element[1:-1]))

        def mapping(data: bytes, at: int) -> tuple[Any, int]:
            at += -at % 4
            (length,) = _UINT32.unpack_from(data, at)
            at += 4 + (-(at + 4) % 8)
            end, found = at + length, {}
            while at < end:
                at += -at % 8
                name, at = key(data, at)
                found[name], at = value(data, at)
            return found, end

        return mapping

    def array(data: bytes, at: int) -> tuple[Any, int]:
        at += -at % 4
        (length,) = _UINT32.unpack_from(data, at)
        at += 4
        at += -at % alignment
        end, found = at + length, []
        while at < end:
            item, at = read(data, at)
            found.append(item)
        return found, end

    return array


def read_body(signature: str, data: bytes) -> list[Any]:
    """The arguments of a message body of *signature*."""
    values, at = [], 0
    for part in _split(signature):
        value, at = reader(part)(data, at)
        values.append(value)
    return values


# --- writing ---------------------------------------------------------------------


def _write(out: bytearray, signature: str, value: Any) -> None:
    """Append *value* of the single complete type *signature* (the basic types,
    arrays and structs: what kdlabctl's plain calls send)."""
    code = signature[0]
    out.extend(b"\0" * (-len(out) % _ALIGNMENT[code]))
    if code in _FIXED:
        out.extend(_FIXED[code][1].pack(value))
    elif code == "b":
        out.extend(_UINT32.pack(1 if value else 0))
    elif code in "so":
        encoded = value.encode()
        out.extend(_UINT32.pack(len(encoded)) + encoded + b"\0")
    elif code == "g":
        encoded = value.encode()
        out.extend(bytes([len(encoded)]) + encoded + b"\0")
    elif code == "v":
        _write(out, "g", value.signature)
        _write(out, value.signature, value.value)
    elif code == "a":
        at = len(out)
        out.extend(b"\0\0\0\0")
        out.extend(b"\0" * (-len(out) % _ALIGNMENT[signature[1]]))
        start = len(out)
        items = value.items() if signature[1] == "{" else value
        for item in items:
            _write(out, signature[1:], item)
        out[at : at + 4] = _UINT32.pack(len(out) - start)
    elif code in "({":
        for part, item in zip(_split(signature[1:-1]), value, strict=True):
            _write(out, part, item)
    else:
        raise ValueError(f"cannot write type code {code!r}")


class Call:
    """A method call: whom, which method, and its arguments."""

    __slots__ = ("body", "destination", "interface", "member", "path", "signature")

    def __init__(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        *,
        signature: str = "",
        body: Sequence[Any] = (),
    ) -> None:
        self.destination = destination
        self.path = path
        self.interface = interface
        self.member = member
        self.signature = signature
        self.body = body


def message(serial: int, call: Call, *, no_autostart: bool = False) -> bytes:
    """*call* as a message, ready to send."""
    fields = [
        (_PATH, Variant("o", call.path)),
        (_INTERFACE, Variant("s", call.interface)),
        (_MEMBER, Variant("s", call.member)),
        (_DESTINATION, Variant("s", call.destination)),
    ]
    flags = _NO_AUTO_START if no_autostart else 0
    return _assemble(METHOD_CALL, flags, serial, fields, (call.signature, call.body))


def error_reply(
    serial: int, reply_serial: int, name: str, text: str, fields: dict[int, Any]
) -> bytes:
    """An error reply *name* (*text*) to the message *reply_serial*; of the
    header *fields* given (by code), the destination and sender are kept."""
    kept = [
        (code, Variant("s", fields[code]))
        for code in (_DESTINATION, _SENDER)
        if code in fields
    ]
    header = [
        (REPLY_SERIAL, Variant("u", reply_serial)),
        (_ERROR_NAME, Variant("s", name)),
        *kept,
    ]
    return _assemble(_ERROR, 0, serial, header, ("s", [text]))


def _assemble(
    kind: int,
    flags: int,
    serial: int,
    fields: list[tuple[int, Variant]],
    arguments: tuple[str, Sequence[Any]],
) -> bytes:
    """A message of *kind*: header *fields*, and (signature, values)."""
    signature, body = arguments
    payload = bytearray()
    for part, value in zip(_split(signature), body, strict=True):
        _write(payload, part, value)
    if signature:
        fields = [*fields, (_SIGNATURE, Variant("g", signature))]
    header = bytearray(b"l" + bytes([kind, flags, 1]))
    header.extend(struct.pack("<II", len(payload), serial))
    _write(header, "a(yv)", fields)
    header.extend(b"\0" * (-len(header) % 8))
    return bytes(header + payload)


# --- the connection --------------------------------------------------------------

_HELLO = Call(DBUS_NAME, DBUS_PATH, DBUS_NAME, "Hello")


class QuickBus:
    """One authenticated connection to a bus; calls block, one at a time."""

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._serial = 0

    @classmethod
    def connect(cls, bus: str, timeout: float) -> QuickBus:
        """Connect to the bus *bus* names (as ``--bus`` does) and say Hello; any
        failure is one :class:`RemoteError` (``NoServer``), never a traceback."""
        sock = open_socket(bus, timeout)
        try:
            bus_ = cls(sock)
            bus_.call(_HELLO)
            return bus_
        except (OSError, RemoteError) as err:
            sock.close()
            raise _no_server(bus, err) from None

    def close(self) -> None:
        self._sock.close()

    def send(self, call: Call, *, no_autostart: bool = False) -> int:
        """Send *call*; its serial, which its reply names."""
        self._serial += 1
        self._sock.sendall(message(self._serial, call, no_autostart=no_autostart))
        return self._serial

    def reply_to(self, serial: int) -> bytes:
        """The reply (a return or an error) to the call *serial*, as it came;
        messages before it (the bus's NameAcquired after Hello) are skipped."""
        while True:
            head = self._read(16)
            data = head + self._read(message_length(head) - 16)
            if data[1] not in (METHOD_RETURN, _ERROR):
                continue
            if parsed(data)[2].get(REPLY_SERIAL) == serial:
                return data

    def call(self, call: Call, *, no_autostart: bool = False) -> Reply:
        """The reply; an error reply raises :class:`RemoteError`."""
        data = self.reply_to(self.send(call, no_autostart=no_autostart))
        kind, serial, fields, payload = parsed(data)
        if fields.get(UNIX_FDS):
            raise RemoteError(
                "org.kdlab.Kdlab1.Error.Failed",
                f"{call.member} returned descriptors; this connection takes none",
            )
        values = self._body(fields.get(_SIGNATURE, ""), payload)
        if kind == _ERROR:
            name = fields.get(_ERROR_NAME, "")
            text = values[0] if values and isinstance(values[0], str) else name
            raise RemoteError(name, text)
        return Reply(values, serial, fields.get(_SENDER))

    def _body(self, signature: str, payload: bytes) -> list[Any]:
        """The reply's arguments; a body that does not match its signature is
        one error, not a traceback."""
        try:
            return read_body(signature, payload)
        except _DECODING as err:
            raise _malformed("reply", err) from None

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = self._sock.recv(max(_CHUNK, size - len(self._buffer)))
            if not chunk:
                raise RemoteError(
                    "org.freedesktop.DBus.Error.Disconnected",
                    "the bus closed the connection",
                )
            self._buffer.extend(chunk)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


def open_socket(bus: str, timeout: float, *, unix_fds: bool = False) -> _socket.socket:
    """A blocking socket to the bus *bus* names, authenticated as this uid
    (EXTERNAL), with descriptors agreed when *unix_fds*; the next message on
    it is the caller's (Hello first). Failures are :class:`RemoteError`
    ``NoServer``."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path(bus_address(bus)))
        uid = str(os.getuid()).encode().hex().encode()
        sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\n")
        _expect(sock, b"OK ")
        if unix_fds:
            sock.sendall(b"NEGOTIATE_UNIX_FD\r\n")
            _expect(sock, b"AGREE_UNIX_FD")
        sock.sendall(b"BEGIN\r\n")
        return sock
    except (OSError, ValueError) as err:
        sock.close()
        raise _no_server(bus, err) from None


def _expect(sock: _socket.socket, answer: bytes) -> None:
    """Read the bus's one-line answer; OSError unless it starts with *answer*."""
    line = sock.recv(4096)
    if not line.startswith(answer):
        raise OSError(f"authentication refused: {line.strip()!r}")


def _no_server(bus: str, err: Exception) -> RemoteError:
    return RemoteError(
        "org.freedesktop.DBus.Error.NoServer", f"cannot connect to the {bus} bus: {err}"
    )


def message_length(head: bytes) -> int:
    """The whole length of the message whose first 16 bytes are *head*."""
    if head[0:1] != b"l":
        raise RemoteError(
            "org.freedesktop.DBus.Error.InvalidArgs", "a big-endian message"
        )
    body_length, _, fields_length = _HEAD.unpack_from(head, 4)
    length: int = _pad(16 + fields_length, 8) + body_length
    if length > _MAX_MESSAGE:
        raise RemoteError(
            "org.freedesktop.DBus.Error.LimitsExceeded", "a message over 128 MiB"
        )
    return length


def parse(data: bytes) -> tuple[int, int, dict[int, Any], bytes]:
    """A whole message's type, serial, header fields (by code) and body."""
    _, serial, fields_length = _HEAD.unpack_from(data, 4)
    fields, _ = reader("a(yv)")(data, 12)
    return (
        data[1],
        serial,
        {code: variant.value for code, variant in fields},
        data[_pad(16 + fields_length, 8) :],
    )


def parsed(data: bytes) -> tuple[int, int, dict[int, Any], bytes]:
    """:func:`parse`; a malformed header is one error, not a traceback."""
    try:
        return parse(data)
    except _DECODING as err:
        raise _malformed("message header", err) from None


# What bytes that do not match their signature raise while they are read.
_DECODING = (ValueError, IndexError, KeyError, struct.error, RecursionError)


def _malformed(what: str, err: Exception) -> RemoteError:
    return RemoteError(
        "org.freedesktop.DBus.Error.InvalidArgs",
        f"a malformed {what} ({type(err).__name__}: {err})",
    )


def socket_path(address: str) -> str:
    """The socket of the first ``unix:path=`` or ``unix:abstract=`` address."""
    for entry in address.split(";"):
        kind, _, rest = entry.partition(":")
        params = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
        if kind == "unix" and "path" in params:
            return params["path"]
        if kind == "unix" and "abstract" in params:
            return "\0" + params["abstract"]
    raise ValueError(f"no unix socket in the bus address {address!r}")
