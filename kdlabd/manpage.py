"""kdlabd(8) and kdlab-dbus(7), generated from the code and the API contract.

kdlabd(8) has the options of kdlabd's parser (:func:`kdlabd.config.parser`),
every key of its configuration file with its default (:class:`Config`,
:data:`KEY_HELP`), its files (:class:`Layout`) and the signals that stop it.
kdlab-dbus(7) is the D-Bus API as the interface files in ``xml/dbus/`` document
it, in gdbus-codegen's comment format ("Member:", "@arg:", then the text).
``python -m kdlabd.manpage --dbus-xml xml/dbus DIR`` writes
``DIR/man8/kdlabd.8`` and ``DIR/man7/kdlab-dbus.7``; .ci/install runs it with
the installed copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import signal
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kdlab import roff
from kdlab.wire import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH
from kdlabd.config import DEFAULT_CONFIG, KEY_HELP, Config, parser
from kdlabd.core.vms import Layout
from kdlabd.daemon import STOP_SIGNALS

SUMMARY = "kdlab's daemon: kernel debug VMs on libvirt, served on D-Bus"
DBUS_SUMMARY = f"kdlab's D-Bus API: {BUS_NAME} on the system bus"

# A documented term: "@arg:", "key (t):" or "org.kdlab.Kdlab1.Error.X:", then text.
_TERM = re.compile(r"(?P<term>@\w+|[\w.]+(?: \([\w{}()]+\))?):(?:\s+(?P<text>.*))?")
# What kdlabd's installation puts where (.ci/install and .ci/setup).
INSTALLED_FILES = {
    "/etc/systemd/system/kdlabd.service": "kdlabd's systemd unit.",
    "/usr/share/dbus-1/system.d/org.kdlab.Kdlab1.conf": "The bus policy: only root "
    f"may own {BUS_NAME}, anyone may call it.",
    "/usr/share/polkit-1/actions/org.kdlab.Kdlab1.policy": "kdlab's polkit actions.",
    "/usr/share/polkit-1/rules.d/50-kdlab.rules": "The rule that grants group kdlab "
    "all actions but manage-others.",
    "/var/log/kdlab/kdlabd.log": "kdlabd's log where no systemd runs it "
    "(.ci/kdlabd-service); otherwise the journal.",
}


def toml_value(value: object) -> str:
    """*value* as the TOML file would spell it."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value) + '"'


def kdlabd_page() -> roff.Page:
    """kdlabd(8)."""
    manual = roff.Page("kdlabd", 8, SUMMARY)
    manual.program(parser())
    defaults = Config()
    manual.heading("CONFIGURATION")
    manual.text(
        f"{DEFAULT_CONFIG} (or --config) is a TOML file of these keys, each shown "
        "with its default; an option on the command line wins. An unknown key or "
        "a value of the wrong type stops kdlabd with exit status 2."
    )
    for field in dataclasses.fields(Config):
        default = getattr(defaults, field.name)
        tag = roff.bold(field.name)
        if default is not None:
            tag += roff.escape(f" = {toml_value(default)}")
        manual.item(tag, roff.fill(KEY_HELP[field.name]))
    layout = Layout(defaults.state_dir, defaults.runtime_dir)
    manual.heading("FILES")
    for path, text in (
        (DEFAULT_CONFIG, "The configuration."),
        (defaults.vm_pool_dir, f"The pool {defaults.boot_pool}: kernels, "
         "initrds, VM disks."),
        (defaults.image_pool_dir, f"The pool {defaults.image_pool}: disk images."),
        (layout.console_log("NAME"), "The serial console log of VM NAME's current "
         "or last boot (the boot before: console.log.1)."),
        (layout.scratch_dir(), "Where image builds work."),
        (layout.cache_dir(), "Debootstrap bases kept for the next build; "
         "agent/: the exec agent that built images run."),
        (layout.journal_dir(), "Operations under way, cleaned up at the next start "
         "if kdlabd was killed."),
        (layout.gdb_socket("NAME"), "VM NAME's gdbstub, which kdlabd hands to "
         "authorized callers as a connected descriptor."),
        *INSTALLED_FILES.items(),
    ):  # fmt: skip
        manual.item(roff.bold(str(path)), roff.fill(text))
    manual.heading("SIGNALS")
    manual.item(
        ", ".join(roff.bold(signal.Signals(number).name) for number in STOP_SIGNALS),
        roff.fill("kdlabd stops within seconds, whatever libvirt is doing, and exits "
                  "with status 0. The VMs keep running."),
    )  # fmt: skip
    manual.heading("EXIT STATUS")
    for status, text in (
        (0, "Stopped by a signal."),
        (1, "It failed: libvirt or the bus not reachable at start, or the bus went "
            "away (systemd's Restart= brings it back)."),
        (2, "A wrong option or configuration."),
    ):  # fmt: skip
        manual.item(roff.bold(str(status)), roff.fill(text))
    manual.see_also(("kdlabctl", 1), ("kdlab-dbus", 7), ("systemd.exec", 5))
    return manual


@dataclass(frozen=True)
class Member:
    """A method, property or signal of an interface, and its documentation."""

    kind: str
    signature: str  # roff
    doc: str


@dataclass(frozen=True)
class Interface:
    name: str
    doc: str
    members: list[Member]


def interfaces(directory: Path) -> list[Interface]:
    """The interfaces of the contract files in *directory*, the manager's first."""
    found = [
        interface
        for path in sorted(directory.glob("*.xml"))
        for interface in _read(path)
    ]
    if not found:
        raise SystemExit(f"no D-Bus interface files in {directory}")
    return sorted(found, key=lambda interface: interface.name != MANAGER_INTERFACE)


def _read(path: Path) -> Iterator[Interface]:
    tree = ET.parse(path, ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    for element, doc in _documented(tree.getroot()):
        if element.tag == "interface":
            members = [
                Member(member.tag, _signature(member), member_doc)
                for member, member_doc in _documented(element)
                if member.tag in ("method", "property", "signal")
            ]
            yield Interface(element.get("name", ""), doc, members)


def _documented(parent: ET.Element) -> Iterator[tuple[ET.Element, str]]:
    """Each child element of *parent* with the comment right before it."""
    comment = ""
    for child in parent:
        if not isinstance(child.tag, str):  # a comment: its tag is ET.Comment
            comment = child.text or ""
        else:
            yield child, comment
            comment = ""


def _signature(member: ET.Element) -> str:
    name = roff.bold(member.get("name", ""))
    if member.tag == "property":
        return f"{name} {roff.italic(member.get('type', ''))}, {member.get('access')}"
    args = [arg for arg in member if arg.tag == "arg"]

    def listed(direction: str) -> str:
        return ", ".join(
            f"{roff.italic(arg.get('type', ''))} {roff.escape(arg.get('name', ''))}"
            for arg in args
            if arg.get("direction", "in") == direction
        )

    outs = listed("out") if member.tag == "method" else ""
    return f"{name}({listed('in')})" + (f" \\-> ({outs})" if outs else "")


def dbus_page(directory: Path) -> roff.Page:
    """kdlab-dbus(7), from the interface files in *directory*."""
    manual = roff.Page("kdlab-dbus", 7, DBUS_SUMMARY)
    manual.heading("DESCRIPTION")
    manual.text(
        f"kdlabd owns {BUS_NAME} on the system bus and serves the interfaces below; "
        f"the manager is {MANAGER_PATH}. This page is generated from the API "
        "contract, the interface files xml/dbus/*.xml of kdlab's source; busctl "
        f"introspect {BUS_NAME} {MANAGER_PATH} shows the live objects."
    )
    for interface in interfaces(directory):
        manual.heading(interface.name)
        _doc(manual, interface.doc)
        for kind, title in (
            ("method", "Methods"),
            ("property", "Properties"),
            ("signal", "Signals"),
        ):
            members = [member for member in interface.members if member.kind == kind]
            if members:
                manual.subheading(title)
            for member in members:
                manual.paragraph(member.signature)
                manual.indent()
                _doc(manual, member.doc)
                manual.outdent()
    manual.see_also(("kdlabd", 8), ("kdlabctl", 1), ("busctl", 1))
    return manual


def _doc(manual: roff.Page, comment: str) -> None:
    """A documentation comment without its "Name:" line: paragraphs, and
    "@arg:", option and error lists (their continuation lines indented deeper)."""
    text = "\n".join(comment.strip("\n").splitlines()[1:])
    text = text.replace("@short_description:", "")
    for block in re.split(r"\n\s*\n", text):
        rows = [
            (len(line) - len(line.lstrip()), line.strip())
            for line in block.splitlines()
            if line.strip()
        ]
        if rows:
            _block(manual, rows, min(indent for indent, _ in rows))


def _block(manual: roff.Page, rows: list[tuple[int, str]], base: int) -> None:
    """Render *rows* (indent, text) at the margin *base*: a term line starting
    with "@", or any term line indented deeper than *base*, is an item with
    the deeper lines after it; other lines fill paragraphs."""
    text: list[str] = []
    index = 0
    while index < len(rows):
        indent, line = rows[index]
        term = _TERM.fullmatch(line)
        index += 1
        if term is None or not (indent > base or line.startswith("@")):
            text.append(line)
            continue
        if text:
            manual.paragraph(roff.fill(" ".join(text)))
            text.clear()
        body = []
        while index < len(rows) and rows[index][0] > indent:
            body.append(rows[index])
            index += 1
        _item(manual, term["term"], term["text"] or "", body)
    if text:
        manual.paragraph(roff.fill(" ".join(text)))


def _item(
    manual: roff.Page, term: str, first: str, body: list[tuple[int, str]]
) -> None:
    """The item *term*: its text is *first* and the *body* rows at the body's
    margin that follow it; the rest of *body* (deeper items, and text after
    them) goes below, indented."""
    base = min((indent for indent, _ in body), default=0)
    lead = [first] if first else []
    while body and body[0][0] == base:
        lead.append(body.pop(0)[1])
    tag = roff.italic(term[1:]) if term.startswith("@") else roff.bold(term)
    manual.item(tag, roff.fill(" ".join(lead)))
    if body:
        manual.indent()
        _block(manual, body, base)
        manual.outdent()


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="python -m kdlabd.manpage",
        description="Write kdlabd(8) and kdlab-dbus(7).",
    )
    cli.add_argument(
        "--dbus-xml", type=Path, required=True, help="xml/dbus of the source"
    )
    cli.add_argument(
        "directory", type=Path, help="the man directory (its man8/, man7/)"
    )
    args = cli.parse_args(argv)
    for page in (kdlabd_page(), dbus_page(args.dbus_xml)):
        print(page.write(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
