"""The command lines of attach, start --attach, gdb and up: what goes to gdb.

kdlabctl's own options come first; gdb gets what kdlabctl does not know,
and everything after ``--``, without that ``--``. Where no gdb runs (the
console, a plain start) such arguments are a usage error.
"""

from __future__ import annotations

import pytest

from kdlabctl.cli import build_parser, cmd_attach, cmd_start, parse_args


@pytest.mark.parametrize(
    ("argv", "gdb_args"),
    [
        (["attach", "vm", "--", "--batch", "-ex", "p 1"], ["--batch", "-ex", "p 1"]),
        (["attach", "vm", "--batch", "-ex", "bt"], ["--batch", "-ex", "bt"]),
        (["attach", "vm", "--vmlinux", "v", "--", "-ex", "bt"], ["-ex", "bt"]),
        (["attach", "--vmlinux", "v", "vm", "--", "--vmlinux"], ["--vmlinux"]),
        (["start", "--attach", "--paused", "vm", "--", "-ex", "c"], ["-ex", "c"]),
        (["start", "vm", "--attach", "--vmlinux", "v", "--", "-q"], ["-q"]),
        (["gdb", "vm", "--vmlinux", "v", "--", "--batch"], ["--batch"]),
        (["up", "tree", "--name", "vm", "--", "-ex", "c"], ["-ex", "c"]),
        (["attach", "vm", "--console"], []),
        (["start", "vm"], []),
    ],
)
def test_gdb_gets_what_follows_the_dashes(argv: list[str], gdb_args: list[str]) -> None:
    args = parse_args(build_parser(), argv)
    assert args.gdb_args == gdb_args
    assert args.name == "vm"


@pytest.mark.parametrize(
    "argv",
    [
        ["attach", "vm", "--console", "--", "--batch"],
        ["start", "vm", "--", "--batch"],
        ["start", "--attach", "--console", "vm", "-ex", "c"],
        ["up", "tree", "--console", "--batch"],
        ["console", "vm", "--", "x"],
    ],
)
def test_gdb_arguments_without_gdb_are_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(build_parser(), argv)
    assert exited.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_attach_options() -> None:
    args = parse_args(build_parser(), ["attach", "--console", "vm"])
    assert (args.func, args.console, args.vmlinux) == (cmd_attach, True, None)
    args = parse_args(build_parser(), ["start", "--attach", "--console", "vm"])
    assert (args.func, args.attach, args.console, args.paused) == (
        cmd_start,
        True,
        True,
        False,
    )
