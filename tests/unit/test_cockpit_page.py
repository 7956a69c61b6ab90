"""The Cockpit page's sources against what they depend on (issue 14).

The page (kdlabctl/cockpit) is JavaScript the Python tools never see: here its
D-Bus names, calls, options and properties are checked against kdlab/wire.py
and the contract (xml/dbus), its xterm.js pin against its lock file, and its
files against the wheel's package data. What it does is tested in a browser
(tests/vm/test_cockpit.py).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from lxml import etree

from kdlab import wire
from tests.support import REPO

PAGE = REPO / "kdlabctl" / "cockpit"
FILES = ("manifest.json", "index.html", "kdlab.js", "kdlab.css")
SCRIPT = (PAGE / "kdlab.js").read_text()
CONSTANTS = {
    "BUS_NAME": wire.BUS_NAME,
    "ROOT_PATH": wire.MANAGER_PATH,
    "VM_IFACE": wire.VM_INTERFACE,
    "IMAGE_IFACE": wire.IMAGE_INTERFACE,
    "JOB_IFACE": wire.JOB_INTERFACE,
}
# client.call(path, IFACE, "Method", [options...]) and vmCall(proxy, "Method",
# [options...]) (on VM_IFACE) in kdlab.js
CALL = re.compile(r'client\.call\([^,]+, (\w+), "(\w+)", \[([^\]]*)\]')
VM_CALL = re.compile(r'vmCall\(proxy, "(\w+)", \[([^\]]*)\]')


def contract(interface: str) -> etree._Element:
    tree = etree.parse(str(REPO / "xml" / "dbus" / f"{interface}.xml"))
    (node,) = tree.xpath("/node/interface[@name=$name]", name=interface)
    return node


@pytest.mark.parametrize(("constant", "value"), CONSTANTS.items())
def test_the_page_names_kdlab_on_the_bus_as_wire_does(
    constant: str, value: str
) -> None:
    assert f'const {constant} = "{value}";' in SCRIPT


def test_the_page_calls_only_methods_of_the_contract_with_known_options() -> None:
    calls = CALL.findall(SCRIPT) + [
        ("VM_IFACE", member, args) for member, args in VM_CALL.findall(SCRIPT)
    ]
    assert {member for _, member, _ in calls} >= {"Start", "Stop", "Delete", "Cancel"}
    options = {"Start": wire.START_OPTIONS, "Stop": wire.STOP_OPTIONS}
    for constant, member, args in calls:
        node = contract(CONSTANTS[constant])
        assert node.xpath("method[@name=$m]", m=member), f"{member} not in the contract"
        for key, kind in re.findall(r'(\w+): \{ t: "(\w+)"', args):
            assert options[member][key] == kind, f"{member} option {key}"


def test_the_page_reads_only_properties_of_the_contract() -> None:
    read = set(re.findall(r"proxy\.([A-Z]\w+)", SCRIPT))
    known = {
        name
        for interface in (wire.VM_INTERFACE, wire.IMAGE_INTERFACE, wire.JOB_INTERFACE)
        for name in contract(interface).xpath("property/@name")
    }
    assert read, "no properties found: the pattern is stale"
    assert read <= known, read - known


def test_the_page_keeps_its_dom_contract() -> None:
    """Other tests drive the page by these names (docs/architecture.md)."""
    html = (PAGE / "index.html").read_text()
    for ident in ("vm-list", "console", "error", "create-form", "confirm"):
        assert f'id="{ident}"' in html
    for action in ("start", "start-paused", "stop", "force-stop", "delete", "console"):
        assert f'vmButton("{action}"' in SCRIPT
    for field in ("state", "owner", "diagnosis"):
        assert f'"{field}"' in SCRIPT
    assert '"data-vm"' in SCRIPT


def test_the_menu_entry_is_kernel_lab() -> None:
    manifest = json.loads((PAGE / "manifest.json").read_text())
    assert manifest["menu"]["index"]["label"] == "Kernel lab"


def test_xterm_is_pinned_exactly_and_locked_with_a_checksum() -> None:
    package = json.loads((PAGE / "package.json").read_text())
    lock = json.loads((PAGE / "package-lock.json").read_text())
    (version,) = package["dependencies"].values()
    assert list(package["dependencies"]) == ["@xterm/xterm"]
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", version), "not an exact version"
    locked = lock["packages"]["node_modules/@xterm/xterm"]
    assert locked["version"] == version
    assert locked["integrity"].startswith("sha512-")
    assert lock["packages"][""]["dependencies"] == package["dependencies"]


def test_the_wheel_ships_the_page() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["kdlabctl"]
    base = REPO / "kdlabctl"
    shipped = {path for pattern in patterns for path in base.glob(pattern)}
    for name in (*FILES, "package.json", "package-lock.json"):
        assert PAGE / name in shipped, name
    assert not any(Path(path).name == "node_modules" for path in shipped)
