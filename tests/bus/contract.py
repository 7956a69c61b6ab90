"""kdlab's D-Bus contract, ``xml/dbus/*.xml``, read as data.

:func:`shape` reduces an ``<interface>`` element, from a contract file or from
live introspection, to what a client depends on: method names with their
arguments' directions and types in order (and the names of ``in`` arguments),
property names with type and access, signal names with argument types.
Documentation, annotations and the names of ``out`` and signal arguments
(which dbus-next cannot emit) are left out. The documentation comments are
read by :func:`doc`, :func:`documented_options` and :func:`documented_errors`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from lxml import etree

from kdlab.errors import KdlabError
from tests.support import REPO
from tests.support.clients import assert_no_traceback

MANAGER = "org.kdlab.Kdlab1.Manager"
VM = "org.kdlab.Kdlab1.VM"
IMAGE = "org.kdlab.Kdlab1.Image"
JOB = "org.kdlab.Kdlab1.Job"
DUMP = "org.kdlab.Kdlab1.Dump"
RECORDING = "org.kdlab.Kdlab1.Recording"
PROCESS = "org.kdlab.Kdlab1.Process"
INTERFACES = (MANAGER, VM, IMAGE, JOB, DUMP, RECORDING, PROCESS)
CONTRACT_DIR = REPO / "xml" / "dbus"
ERROR_RE = re.compile(r"\b(org\.kdlab\.Kdlab1\.Error\.\w+):")
OPTION_RE = re.compile(r"^\s+([a-z_]+) \(([a-z{}]+)\):", re.MULTILINE)

Args = tuple[tuple[str, str, str | None], ...]


@dataclass(frozen=True)
class Shape:
    """What a client of an interface depends on."""

    methods: dict[str, Args]
    properties: dict[str, tuple[str, str]]
    signals: dict[str, tuple[str, ...]]


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        remove_blank_text=True, resolve_entities=False, no_network=True, load_dtd=False
    )


def parse(xml: str | bytes) -> etree._ElementTree:
    data = xml.encode() if isinstance(xml, str) else xml
    return etree.ElementTree(etree.fromstring(data, _parser()))


def contract_path(interface: str) -> str:
    return str(CONTRACT_DIR / f"{interface}.xml")


@cache
def contract_tree(interface: str) -> etree._ElementTree:
    return etree.parse(contract_path(interface), _parser())


def interface_element(tree: etree._ElementTree, name: str) -> etree._Element:
    found = tree.getroot().findall(f"interface[@name='{name}']")
    assert len(found) == 1, f"{len(found)} <interface name={name!r}> elements"
    return found[0]


def contract(interface: str) -> etree._Element:
    return interface_element(contract_tree(interface), interface)


def shape(interface: etree._Element) -> Shape:
    methods: dict[str, Args] = {}
    for method in interface.iter("method"):
        methods[method.get("name")] = tuple(
            (
                arg.get("direction", "in"),
                arg.get("type"),
                arg.get("name") if arg.get("direction", "in") == "in" else None,
            )
            for arg in method.iter("arg")
        )
    return Shape(
        methods=methods,
        properties={
            prop.get("name"): (prop.get("type"), prop.get("access"))
            for prop in interface.iter("property")
        },
        signals={
            sig.get("name"): tuple(arg.get("type") for arg in sig.iter("arg"))
            for sig in interface.iter("signal")
        },
    )


def members(interface: str) -> list[etree._Element]:
    """Every method, property and signal element of the contract's *interface*."""
    return [
        element
        for element in contract(interface)
        if isinstance(element.tag, str)
        and element.tag in ("method", "property", "signal")
    ]


def doc(element: etree._Element) -> str:
    """The documentation comment right before *element* ('' when there is none)."""
    previous = element.getprevious()
    if previous is None or previous.tag is not etree.Comment:
        return ""
    return str(previous.text)


def member_doc(interface: str, member: str) -> str:
    for element in members(interface):
        if element.get("name") == member:
            return doc(element)
    raise KeyError(f"{interface}.{member} is not in the contract")


def documented_options(interface: str, method: str) -> dict[str, str]:
    """The ``a{sv}`` option keys documented for *method*, with their types."""
    text = member_doc(interface, method)
    return (
        dict(OPTION_RE.findall(text.split("@options:", 1)[1]))
        if "@options:" in text
        else {}
    )


def documented_errors(interface: str, method: str) -> set[str]:
    """The error names the contract says *method* may return."""
    text = member_doc(interface, method)
    assert "Errors:" in text, f"{interface}.{method} documents no errors"
    return set(ERROR_RE.findall(text.split("Errors:", 1)[1]))


def assert_error_reply(
    error: tuple[str, str], expected: type[KdlabError], interface: str, method: str
) -> None:
    """*error* (name, message) is *expected*'s name, documented, without a traceback."""
    name, text = error
    assert name == expected.dbus_name(), (
        f"expected {expected.dbus_name()}, got {name}: {text}"
    )
    assert_no_traceback(text)
    assert name in documented_errors(interface, method), (
        f"{interface}.{method} returned {name}, which its contract does not list"
    )
