"""kdlabctl's standard-library D-Bus codec against dbus-next's, byte for byte."""

from __future__ import annotations

import io
import socket
import struct
from typing import Any

import pytest
from dbus_next import Message, MessageFlag, MessageType, Variant
from dbus_next._private.unmarshaller import Unmarshaller

from kdlabctl import quickbus

# (signature, body): every type code, nesting, empty containers, and the
# shape of GetManagedObjects' reply.
BODIES: list[tuple[str, list[Any]]] = [
    ("ybnqiuxtd", [255, True, -2, 3, -4, 5, -6, 7, 0.5]),
    ("sog", ["grüße", "/org/kdlab/Kdlab1/vm/a", "a{sv}"]),
    ("as", [[]]),
    ("as", [["", "x", "yz"]]),
    ("at", [[1, 2**64 - 1]]),
    ("a{sv}", [{}]),
    ("(ssss)", [["a", "", "c", "d"]]),
    ("a(yv)", [[[1, Variant("o", "/a")], [8, Variant("g", "s")]]]),
    ("v", [Variant("a{sv}", {"k": Variant("(ssss)", ["", "", "", ""])})]),
    ("y(t)", [1, [7]]),  # a struct after a byte: padded to 8
    (
        "a{oa{sa{sv}}}",
        [
            {
                "/org/kdlab/Kdlab1/vm/a": {
                    "org.kdlab.Kdlab1.VM": {
                        "Name": Variant("s", "a"),
                        "MemoryMiB": Variant("u", 256),
                        "Created": Variant("t", 1_700_000_000_000_000),
                        "WaitingForDebugger": Variant("b", False),
                        "Diagnosis": Variant("(ssss)", ["x", "error", "c", "f"]),
                        "UsedBy": Variant("as", []),
                    },
                    "org.freedesktop.DBus.Properties": {},
                },
                "/org/kdlab/Kdlab1/vm/b": {},
            }
        ],
    ),
]


def plain(value: Any) -> Any:
    """*value* with both libraries' variants as (signature, value) pairs."""
    if isinstance(value, Variant | quickbus.Variant):
        return ("variant", value.signature, plain(value.value))
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


@pytest.mark.parametrize(("signature", "body"), BODIES, ids=[s for s, _ in BODIES])
def test_it_reads_what_dbus_next_writes(signature: str, body: list[Any]) -> None:
    reply = Message(
        message_type=MessageType.METHOD_RETURN,
        reply_serial=1,
        serial=2,
        signature=signature,
        body=body,
    )
    data = reply._marshall()
    kind, serial, fields, payload = quickbus.parse(data)
    assert (kind, serial) == (2, 2)
    assert fields[8] == signature
    assert plain(quickbus.read_body(signature, payload)) == plain(body)


@pytest.mark.parametrize(
    ("signature", "body"),
    [item for item in BODIES if "v" not in item[0]],
    ids=[s for s, _ in BODIES if "v" not in s],
)
@pytest.mark.parametrize("no_autostart", [False, True])
def test_dbus_next_reads_what_it_writes(
    signature: str, body: list[Any], no_autostart: bool
) -> None:
    call = quickbus.Call(
        "org.kdlab.Kdlab1",
        "/org/kdlab/Kdlab1",
        "org.kdlab.Kdlab1.Manager",
        "GetVM",
        signature=signature,
        body=body,
    )
    data = quickbus.message(9, call, no_autostart=no_autostart)
    unmarshaller = Unmarshaller(io.BytesIO(data))  # type: ignore[arg-type]
    msg = unmarshaller.unmarshall()
    assert msg is not None
    assert (msg.message_type, msg.serial) == (MessageType.METHOD_CALL, 9)
    assert (msg.destination, msg.path) == ("org.kdlab.Kdlab1", "/org/kdlab/Kdlab1")
    assert (msg.interface, msg.member) == ("org.kdlab.Kdlab1.Manager", "GetVM")
    assert msg.signature == signature
    assert plain(msg.body) == plain(body)
    assert (MessageFlag.NO_AUTOSTART in msg.flags) is no_autostart


def test_an_unknown_type_code_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown type code"):
        quickbus.read_body("z", b"")


@pytest.mark.parametrize(
    ("signature", "data"),
    [
        ("s", b"\x05\0\0\0ab"),  # a string longer than the body
        ("s", b"\x01\0\0\0\xff\0"),  # not UTF-8
        ("v", b"\x01z\0"),  # a variant of an unknown type
        ("u", b"\x01"),  # short
    ],
    ids=["overrun", "utf-8", "type", "short"],
)
def test_a_malformed_body_is_one_error(signature: str, data: bytes) -> None:
    """kdlabctl says what came instead of printing a traceback."""
    left, right = socket.socketpair()
    with left, right:
        bus = quickbus.QuickBus(left)
        right.sendall(_reply_with(signature, data))
        with pytest.raises(quickbus.RemoteError) as raised:
            bus.call(quickbus.Call("a.b", "/", "a.b", "M"))
        assert raised.value.name == "org.freedesktop.DBus.Error.InvalidArgs"
        assert "malformed" in raised.value.message


def _reply_with(signature: str, body: bytes) -> bytes:
    """A method return to serial 1 whose body is *body* as it is."""
    fields = bytearray()
    quickbus._write(
        fields,
        "a(yv)",
        [(5, quickbus.Variant("u", 1)), (8, quickbus.Variant("g", signature))],
    )
    header = bytearray(b"l\x02\x00\x01")
    header += struct.pack("<II", len(body), 7) + fields
    header += b"\0" * (-len(header) % 8)
    return bytes(header + body)
