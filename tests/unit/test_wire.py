"""kdlab.wire: object-path escaping as systemd's sd_bus_path_encode, bus addresses."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdlab import wire
from kdlab.wire import escape_path_label, unescape_path_label, vm_path
from tests.support.prereq import require

PROPERTIES = settings(database=None, deadline=None, max_examples=300)
PATH_ELEMENT = re.compile(r"[A-Za-z0-9_]+")
# An object path per the D-Bus specification.
OBJECT_PATH = re.compile(r"/|(/[A-Za-z0-9_]+)+")

# Vectors worked out by hand from systemd's bus_label_escape() (src/basic/bus-label.c):
# everything but [A-Za-z0-9] becomes _xx, a leading digit too; "" becomes "_".
VECTORS = [
    ("", "_"),
    ("a", "a"),
    ("linux-6.9-rc1", "linux_2d6_2e9_2drc1"),
    ("1abc", "_31abc"),
    ("a1", "a1"),
    ("_", "_5f"),
    ("__", "_5f_5f"),
    ("vm.test", "vm_2etest"),
    ("my vm", "my_20vm"),
    ("é", "_c3_a9"),
    ("€", "_e2_82_ac"),
    ("😀", "_f0_9f_98_80"),
    ("A/B", "A_2fB"),
    ("Z9_", "Z9_5f"),
]


@pytest.mark.parametrize(("label", "escaped"), VECTORS)
def test_escape_vectors(label: str, escaped: str) -> None:
    assert escape_path_label(label) == escaped


@pytest.mark.parametrize(("label", "escaped"), VECTORS)
def test_unescape_vectors(label: str, escaped: str) -> None:
    assert unescape_path_label(escaped) == label


def test_escape_is_lowercase_hex() -> None:
    assert escape_path_label("\xff") == "_c3_bf"
    assert escape_path_label(":") == "_3a"


@given(st.text())
@PROPERTIES
def test_round_trip(label: str) -> None:
    escaped = escape_path_label(label)
    assert PATH_ELEMENT.fullmatch(escaped)
    assert unescape_path_label(escaped) == label


@given(st.text(), st.text())
@PROPERTIES
def test_escape_is_injective(a: str, b: str) -> None:
    if a != b:
        assert escape_path_label(a) != escape_path_label(b)


@given(st.text())
@PROPERTIES
def test_vm_path_is_a_valid_object_path(name: str) -> None:
    path = vm_path(name)
    assert OBJECT_PATH.fullmatch(path)
    assert path.startswith(wire.VM_PATH_PREFIX + "/")
    assert path.count("/") == wire.VM_PATH_PREFIX.count("/") + 1


def test_vm_path_example() -> None:
    assert vm_path("linux-6.9-rc1") == "/org/kdlab/Kdlab1/vm/linux_2d6_2e9_2drc1"


# systemd itself as the oracle, when libsystemd is on the machine (no process needed).


@functools.cache
def _libsystemd() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("systemd")
    return None if name is None else ctypes.CDLL(name)


def sd_bus_path_encode(prefix: str, label: str) -> str:
    lib = _libsystemd()
    require(lib is not None, "libsystemd.so.0 (apt-get install libsystemd0)")
    assert lib is not None
    libc = ctypes.CDLL(None)
    encode = lib.sd_bus_path_encode
    encode.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    encode.restype = ctypes.c_int
    out = ctypes.c_void_p()
    assert encode(prefix.encode(), label.encode(), ctypes.byref(out)) == 0
    try:
        return ctypes.string_at(out.value).decode()
    finally:
        libc.free(out)


@pytest.mark.parametrize(("label", "_escaped"), VECTORS)
def test_vectors_agree_with_libsystemd(label: str, _escaped: str) -> None:
    assert sd_bus_path_encode(wire.VM_PATH_PREFIX, label) == vm_path(label)


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00")))
@PROPERTIES
def test_agrees_with_libsystemd(label: str) -> None:
    assert sd_bus_path_encode(wire.VM_PATH_PREFIX, label) == vm_path(label)


# Bus addresses.


def test_bus_address_system_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DBUS_SYSTEM_BUS_ADDRESS", raising=False)
    assert wire.bus_address("system") == "unix:path=/run/dbus/system_bus_socket"


def test_bus_address_system_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/tmp/sys")
    assert wire.bus_address("system") == "unix:path=/tmp/sys"


def test_bus_address_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/tmp/sess,guid=00")
    assert wire.bus_address("session") == "unix:path=/tmp/sess,guid=00"


@pytest.mark.parametrize("value", [None, ""])
def test_bus_address_session_unset(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", value)
    with pytest.raises(ValueError, match="DBUS_SESSION_BUS_ADDRESS is not set"):
        wire.bus_address("session")


@pytest.mark.parametrize(
    "address",
    ["unix:path=/run/x/bus", "unix:abstract=kdlab", "tcp:host=127.0.0.1,port=1"],
)
def test_bus_address_explicit(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/wrong")
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/wrong")
    assert wire.bus_address(address) == address


def test_names_are_consistent() -> None:
    assert "/" + wire.BUS_NAME.replace(".", "/") == wire.MANAGER_PATH
    assert wire.MANAGER_INTERFACE == wire.BUS_NAME + ".Manager"
    assert wire.VM_INTERFACE == wire.BUS_NAME + ".VM"
    assert wire.ERROR_PREFIX == wire.BUS_NAME + ".Error."
    assert OBJECT_PATH.fullmatch(wire.VM_PATH_PREFIX)
