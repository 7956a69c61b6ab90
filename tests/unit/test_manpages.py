"""The man pages generated at install: complete, and valid roff.

kdlabctl(1) must describe every command of the parser kdlabctl runs, with its
options; kdlabd(8) every option and configuration key; kdlab-dbus(7) every
interface and member of the contract in xml/dbus/. Each page is read the way
a person reads it (groff's text output), and groff must read it without a
warning (``-ww``). The checker is also run on a broken page, to prove that it
can fail.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kdlab import roff
from kdlabctl import manpage as ctl_manpage
from kdlabctl.cli import build_parser
from kdlabd import manpage as daemon_manpage
from kdlabd.config import KEY_HELP, Config, parser
from tests.support import REPO

CONTRACT = REPO / "xml" / "dbus"
# Nested commands the walk of the parser must find (two levels deep).
NESTED = ("kdlabctl image build", "kdlabctl kernel configure")


def groff(page: str, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("groff") is None:
        pytest.fail("groff not found: install the Debian package 'groff-base'")
    return subprocess.run(
        ["groff", "-man", "-ww", *args],
        input=page,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def warnings(page: str) -> str:
    """What groff objects to in *page* (as man(1) formats it: UTF-8, 80 columns)."""
    result = groff(page, "-Tutf8", "-rLL=80n", "-z")
    if result.returncode == 0 and not result.stderr:
        return ""
    return f"exit status {result.returncode}: {result.stderr}"


def text(page: str) -> str:
    """*page* as a reader sees it: plain text, dashes as typed."""
    result = groff(page, "-Tutf8", "-rLL=200n", "-P-cbou")
    assert result.returncode == 0, result.stderr
    return result.stdout.replace("\u2212", "-").replace("\u2010", "-")


def sections(rendered: str, heading: re.Pattern[str]) -> dict[str, str]:
    """The parts of *rendered* under each line matching *heading* (group 1)."""
    parts: dict[str, str] = {}
    current = ""
    for line in rendered.splitlines():
        match = heading.fullmatch(line)
        if match:
            current = match[1]
            parts[current] = ""
        elif current:
            parts[current] += line + "\n"
    return parts


def words(parser_: argparse.ArgumentParser) -> list[str]:
    """What a reader must find in a command's part: each option's names and
    each positional argument's metavar (not --help, nor what the command's
    help hides: --host after a command, described once as kdlabctl's)."""
    found: list[str] = []
    for action in parser_._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            found += action.option_strings
        elif not isinstance(action, argparse._SubParsersAction):
            found.append(str(action.metavar or action.dest))
    return found


def test_every_kdlabctl_command_and_option_is_in_kdlabctl_1() -> None:
    page = ctl_manpage.page().render()
    rendered = text(page)
    parts = sections(rendered, re.compile(r" {3}(kdlabctl .+)"))
    commands = list(roff.commands(build_parser()))
    assert set(NESTED) <= {sub.prog for sub, _ in commands}
    assert len(commands) >= 20
    for sub, _help in commands:
        assert sub.prog in parts, f"{sub.prog} has no part of its own"
        for word in words(sub):
            assert re.search(rf"(?<![\w-]){re.escape(word)}\b", parts[sub.prog]), (
                f"{sub.prog}: {word} is not described"
            )
    for word in ("--bus", "--host", "EXIT CODES", "69", "KDLAB_BUS", "KDLAB_HOST"):
        assert word in rendered
    assert "hosts.toml" in sections(rendered, re.compile(r"([A-Z][A-Z ]+)"))["FILES"]


def test_every_kdlabd_option_and_configuration_key_is_in_kdlabd_8() -> None:
    rendered = text(daemon_manpage.kdlabd_page().render())
    parts = sections(rendered, re.compile(r"([A-Z][A-Z ]+)"))
    for word in words(parser()):
        assert word in parts["OPTIONS"], f"kdlabd {word} is not described"
    for field in dataclasses.fields(Config):
        assert re.search(rf"^ {{7}}{field.name}\b", parts["CONFIGURATION"], re.M), (
            f"configuration key {field.name} is not described"
        )
    assert "max_disk_gib = 256" in parts["CONFIGURATION"]
    assert "SIGTERM" in parts["SIGNALS"]
    assert "/etc/kdlab/kdlabd.toml" in parts["FILES"]


def test_every_configuration_key_has_help() -> None:
    assert set(KEY_HELP) == {field.name for field in dataclasses.fields(Config)}


def test_every_interface_and_member_is_in_kdlab_dbus_7() -> None:
    rendered = text(daemon_manpage.dbus_page(CONTRACT).render())
    parts = sections(rendered, re.compile(r"(org\.kdlab\.Kdlab1\.\w+)"))
    files = sorted(CONTRACT.glob("*.xml"))
    assert len(files) == 7
    for path in files:
        for interface in ET.parse(path).getroot().iter("interface"):
            name = interface.get("name", "")
            assert name in parts, f"interface {name} is not described"
            for member in interface:
                assert re.search(
                    rf"^ {{7}}{member.get('name')}\b", parts[name], re.M
                ), f"{name}.{member.get('name')} is not described"
    assert "kernel (h)" in parts["org.kdlab.Kdlab1.Manager"]  # CreateVM's options


def pages() -> dict[str, roff.Page]:
    return {
        "kdlabctl.1": ctl_manpage.page(),
        "kdlabd.8": daemon_manpage.kdlabd_page(),
        "kdlab-dbus.7": daemon_manpage.dbus_page(CONTRACT),
    }


@pytest.mark.parametrize("name", ["kdlabctl.1", "kdlabd.8", "kdlab-dbus.7"])
def test_page_is_valid_roff(name: str) -> None:
    assert warnings(pages()[name].render()) == ""


@pytest.mark.parametrize(
    "breakage",
    [".XY unknown macro", "a \\q bad escape", "\\[nonesuch] character"],
    ids=["unknown-macro", "bad-escape", "unknown-character"],
)
def test_checker_rejects_broken_roff(breakage: str) -> None:
    page = ctl_manpage.page().render()
    assert warnings(page + breakage + "\n") != ""


def test_escape_keeps_text_literal() -> None:
    escaped = roff.escape(".hidden\n'also\na\\b --opt ≥")
    assert escaped == "\\&.hidden\n\\&'also\na\\eb \\-\\-opt \\[u2265]"
    filled = roff.fill(".x  a\\b\n``--opt`` ≥")
    rendered = text(f".TH T 1\n.SH NAME\n{filled}\n")
    assert ".x a\\b --opt ≥" in rendered


def test_install_writes_the_pages_where_man_finds_them(tmp_path: Path) -> None:
    assert ctl_manpage.main([str(tmp_path)]) == 0
    assert daemon_manpage.main(["--dbus-xml", str(CONTRACT), str(tmp_path)]) == 0
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    written = sorted(str(path.relative_to(tmp_path)) for path in files)
    assert written == ["man1/kdlabctl.1", "man7/kdlab-dbus.7", "man8/kdlabd.8"]
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o644 for name in written)
    if shutil.which("man") is None:
        pytest.fail("man not found: install the Debian package 'man-db'")
    for section, name in (("1", "kdlabctl"), ("8", "kdlabd"), ("7", "kdlab-dbus")):
        found = subprocess.run(
            ["man", "-M", str(tmp_path), "-w", section, name],
            capture_output=True,
            text=True,
            check=False,
        )
        assert found.stdout.strip() == str(tmp_path / f"man{section}/{name}.{section}")
