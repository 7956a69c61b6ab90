"""kdlab.errors: one D-Bus name and one exit code per reason, and the one table
of exit codes that kdlabctl's help and the README show."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kdlab import errors
from kdlab.errors import (
    ERRORS,
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_LOST,
    EXIT_OK,
    EXIT_TABLE,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Internal,
    KdlabError,
    NotAuthorized,
    exit_code_for,
)
from kdlab.wire import ERROR_PREFIX
from kdlabctl import cli
from tests.support import REPO

# A D-Bus error name is an interface name: dot-separated elements, no leading digit.
DBUS_ERROR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
FREEDESKTOP = "org.freedesktop.DBus.Error."


def test_error_prefix() -> None:
    assert ERROR_PREFIX == "org.kdlab.Kdlab1.Error."


def test_every_error_is_a_kdlab_error() -> None:
    assert ERRORS
    for cls in ERRORS:
        assert issubclass(cls, KdlabError)
        assert cls is not KdlabError


def test_every_subclass_is_in_the_table() -> None:
    """An error class defined but left out of ERRORS would map to exit code 1."""
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, KdlabError)
    }
    assert defined - {KdlabError} == set(ERRORS)


def test_dbus_names_unique_and_well_formed() -> None:
    names = [cls.dbus_name() for cls in ERRORS]
    assert len(set(names)) == len(names)
    for cls, name in zip(ERRORS, names, strict=True):
        assert name == ERROR_PREFIX + cls.reason
        assert name.startswith(ERROR_PREFIX)
        assert DBUS_ERROR_NAME.fullmatch(name), name
        assert cls.reason == cls.__name__, "the reason is the class name"
    assert KdlabError.dbus_name() not in names


def _category(reason: str) -> str:
    """Reasons that share an exit code: every NoSuch*, every *Exists, every
    *Mismatch (the VM changed since a checkpoint or a recording)."""
    if reason.startswith("NoSuch"):
        return "NoSuch"
    if reason.endswith("Exists"):
        return "Exists"
    if reason.endswith("Mismatch"):
        return "Mismatch"
    return reason


def test_exit_codes_one_per_kind_of_reason() -> None:
    by_code: dict[int, set[str]] = {}
    for cls in ERRORS:
        if cls is not Internal:
            by_code.setdefault(cls.exit_code, set()).add(_category(cls.reason))
    assert all(len(kinds) == 1 for kinds in by_code.values()), by_code
    codes = list(by_code)
    assert Internal.exit_code == KdlabError.exit_code == EXIT_FAILURE
    assert KdlabError.exit_code not in codes
    for code in (*codes, Internal.exit_code):
        assert 0 < code < 64, "kdlab's own codes stay below sysexits' range"
    assert EXIT_OK not in codes
    assert EXIT_UNAVAILABLE not in codes


def all_exit_codes() -> set[int]:
    """Every exit code kdlabctl may return: its errors' and its own."""
    codes = {cls.exit_code for cls in ERRORS}
    own = {EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_TIMEOUT, EXIT_LOST}
    return codes | own


def test_exit_codes_table() -> None:
    assert {cls.dbus_name(): cls.exit_code for cls in ERRORS} == EXIT_CODES


def test_exit_table_has_each_exit_code_once() -> None:
    """kdlab.errors.EXIT_TABLE, which --help and the README show, has a row
    for every code kdlabctl may return, and no other."""
    codes = [entry.code for entry in EXIT_TABLE]
    assert len(set(codes)) == len(codes), codes
    assert set(codes) == all_exit_codes()


# The README's table of exit codes is what users read: it is EXIT_TABLE,
# rendered; KDLAB_REGENERATE_GOLDEN=1 writes it into the README.

README = REPO / "README.md"
README_TABLE_TITLE = "Exit codes of kdlabctl"
REGENERATE = os.environ.get("KDLAB_REGENERATE_GOLDEN", "") == "1"


def markdown_exit_codes() -> list[str]:
    """EXIT_TABLE as the README's table: later names of a row shortened to
    their reason (`NoSuchImage`)."""
    lines = ["| code | meaning | D-Bus error |", "|---|---|---|"]
    for entry in EXIT_TABLE:
        names = ", ".join(
            f"`{cls.reason if i else cls.dbus_name()}`"
            for i, cls in enumerate(entry.errors)
        )
        lines.append(
            f"| {entry.code} | {entry.meaning} | {names} |".replace("|  |", "| |")
        )
    return lines


def readme_table_span(lines: list[str]) -> tuple[int, int]:
    """Where the README's exit-code table is: its first and after-last line."""
    title = next(
        i for i, line in enumerate(lines) if line.startswith(README_TABLE_TITLE)
    )
    start = next(i for i in range(title, len(lines)) if lines[i].startswith("|"))
    end = next(
        (i for i in range(start, len(lines)) if not lines[i].startswith("|")),
        len(lines),
    )
    return start, end


def test_readme_exit_codes_are_the_exit_table() -> None:
    text = README.read_text()
    lines = text.splitlines()
    start, end = readme_table_span(lines)
    expected = markdown_exit_codes()
    if REGENERATE and lines[start:end] != expected:
        lines[start:end] = expected
        README.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
        return
    assert lines[start:end] == expected, (
        "the README's exit codes are not kdlab.errors.EXIT_TABLE "
        "(KDLAB_REGENERATE_GOLDEN=1 writes it there):\n" + "\n".join(expected)
    )


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_exit_code_for_kdlab_errors(cls: type[KdlabError]) -> None:
    assert exit_code_for(cls.dbus_name()) == cls.exit_code


def test_invalid_argument_is_usage() -> None:
    assert exit_code_for(errors.InvalidArgument.dbus_name()) == EXIT_USAGE == 2


@pytest.mark.parametrize("reason", ["ServiceUnknown", "NameHasNoOwner"])
def test_daemon_unreachable_is_69(reason: str) -> None:
    assert exit_code_for(FREEDESKTOP + reason) == EXIT_UNAVAILABLE == 69


def test_access_denied_is_not_authorized() -> None:
    assert exit_code_for(FREEDESKTOP + "AccessDenied") == NotAuthorized.exit_code


@pytest.mark.parametrize(
    "name",
    [
        "",
        "org.kdlab.Kdlab1.Error.NoSuchThing",
        "org.kdlab.Kdlab1.Error.Failed",
        FREEDESKTOP + "UnknownMethod",
        FREEDESKTOP + "InvalidArgs",
        "com.example.Error",
        "org.kdlab.Kdlab1.Error.invalidargument",
    ],
)
def test_unknown_names_are_failure(name: str) -> None:
    assert exit_code_for(name) == EXIT_FAILURE == 1


def test_bus_unreachable_is_69() -> None:
    assert exit_code_for(FREEDESKTOP + "NoServer") == EXIT_UNAVAILABLE


def test_kdlabctl_exits_69_without_a_bus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--bus", f"unix:path={tmp_path}/no-such-bus", "list"])
    assert "cannot connect" in capsys.readouterr().err
    assert code == EXIT_UNAVAILABLE


# kdlabctl --help lists every exit code, so the documentation cannot drift.

HELP_LINE = re.compile(r"^  (\d+)\s+(.+)$")


def help_codes() -> dict[int, str]:
    lines = cli.exit_codes_help().splitlines()
    assert lines[0] == "exit codes:"
    codes: dict[int, str] = {}
    for line in lines[1:]:
        match = HELP_LINE.match(line)
        assert match, f"unexpected help line {line!r}"
        code = int(match[1])
        assert code not in codes, f"exit code {code} listed twice"
        codes[code] = match[2]
    return codes


def test_help_lists_every_exit_code() -> None:
    assert set(help_codes()) == all_exit_codes()


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_help_names_each_reason_at_its_code(cls: type[KdlabError]) -> None:
    assert re.search(rf"\b{cls.reason}\b", help_codes()[cls.exit_code])
    for code, text in help_codes().items():
        if code != cls.exit_code:
            assert not re.search(rf"\b{cls.reason}\b", text), (
                f"{cls.reason} is listed at {code}; its exit code is {cls.exit_code}"
            )


def test_help_is_the_parser_epilog() -> None:
    assert cli.build_parser().epilog == cli.exit_codes_help()
    assert "69" in cli.build_parser().format_help()
