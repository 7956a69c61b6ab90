"""Shell completion follows kdlabctl's parser: every command and every option.

:func:`kdlabctl.completion.complete` is walked over each command of the parser
kdlabctl runs (as ``roff.commands`` finds them for the manual); names of VMs
and images are asked of kdlabd, here of no kdlabd at all (the bus tier asks a
real one, tests/bus/test_completion.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kdlab import roff
from kdlabctl import completion
from kdlabctl.cli import build_parser
from kdlabctl.completion import Completion, Where, complete

NOWHERE = "unix:path=/nonexistent/kdlab-bus"


def complete_(*words: str) -> Completion:
    return complete(build_parser(), words, NOWHERE)


def test_every_command_of_the_parser_is_completed() -> None:
    found = list(roff.commands(build_parser()))
    assert {"kdlabctl attach", "kdlabctl completion"} <= {s.prog for s, _ in found}
    for sub, _help in found:
        *parents, name = sub.prog.split()[1:]
        assert name in complete_(*parents, "").words, sub.prog
        assert complete_(*parents, name[:2]).words, sub.prog


def test_every_option_of_every_command_is_completed() -> None:
    parser = build_parser()
    for sub in [parser, *(s for s, _ in roff.commands(parser))]:
        words = sub.prog.split()[1:]
        shown = [a for a in sub._actions if a.help != argparse.SUPPRESS]
        options = [o for a in shown for o in a.option_strings]
        assert options
        assert complete_(*words, "-").words == options, sub.prog


def test_the_hidden_command_is_in_no_listing() -> None:
    assert completion.HIDDEN not in complete_("").words
    assert completion.HIDDEN not in build_parser().format_help()
    assert completion.HIDDEN not in {s.prog for s, _ in roff.commands(build_parser())}


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("start", ""), completion.VM_NAME),
        (("attach", "--console", ""), completion.VM_NAME),
        (("gdb", "--vmlinux", "vmlinux", ""), completion.VM_NAME),
        (("image", "resize", ""), completion.IMAGE_NAME),
        (("create", "new", "--image", ""), completion.IMAGE_NAME),
        (("--bus", "system", "logs", "-f", ""), completion.VM_NAME),
        (("replay", "vm", ""), completion.RECORDING_ID),
        (("recording", "delete", "a", ""), completion.RECORDING_ID),
        (("recording", "list", ""), completion.VM_NAME),
    ],
)
def test_names_are_asked_where_the_parser_takes_them(
    monkeypatch: pytest.MonkeyPatch, words: tuple[str, ...], expected: object
) -> None:
    asked = asked_names(monkeypatch)
    assert complete_(*words).words == ["alpha", "beta"]
    bus = "system" if words[0] == "--bus" else NOWHERE
    assert asked == [(Where(bus), getattr(expected, "listing", None))]


def asked_names(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Where, str]]:
    """Where completion asks for names from now on (it is answered alpha, beta)."""
    asked: list[tuple[Where, str]] = []

    def names(where: Where, listing: str) -> list[str]:
        asked.append((where, listing))
        return ["alpha", "beta"]

    monkeypatch.setattr(completion, "names", names)
    return asked


@pytest.mark.parametrize(
    ("words", "host", "where"),
    [
        (("--host", "lab", "start", ""), "", Where("", "lab")),
        (("start", "--host", "lab", ""), "", Where("", "lab")),  # after the command
        (("--host", "lab", "--bus", "session", "gdb", ""), "", Where("session", "lab")),
        (("start", ""), "lab", Where("", "lab")),  # $KDLAB_HOST
        (("--host", "", "start", ""), "lab", Where(NOWHERE)),  # empty: here
    ],
)
def test_with_a_host_names_are_asked_of_the_host(
    monkeypatch: pytest.MonkeyPatch,
    words: tuple[str, ...],
    host: str,
    where: Where,
) -> None:
    asked = asked_names(monkeypatch)
    assert complete(build_parser(), words, NOWHERE, host).words == ["alpha", "beta"]
    assert asked == [(where, "vms")]


def test_host_values_are_the_hosts_of_hosts_toml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "kdlab").mkdir()
    (tmp_path / "kdlab" / "hosts.toml").write_text(
        '[hosts.lab]\ndestination = "lab.example.org"\n'
        '[hosts.lab2]\ndestination = "root@[::1]:2222"\n'
        '[hosts.box]\ndestination = "box"\n'
    )
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert complete_("--host", "la").words == ["lab", "lab2"]
    assert complete_("up", "tree", "--host", "").words == ["lab", "lab2", "box"]
    (tmp_path / "kdlab" / "hosts.toml").write_text("[hosts.lab\n")
    assert complete_("--host", "").words == []  # a Tab does not explain


@pytest.mark.parametrize(
    ("words", "kind"),
    [
        (("create", "x", "--kernel", ""), "files"),
        (("create", "x", "--kernel", "=", ""), "files"),  # bash splits at "="
        (("image", "import", "x", ""), "files"),
        (("kernel", "build", "-O", ""), "dirs"),
        (("up", ""), "files"),
        (("attach", "x", "--", "-ex", ""), "files"),  # gdb's arguments
    ],
)
def test_paths_are_left_to_the_shell(words: tuple[str, ...], kind: str) -> None:
    assert complete_(*words) == Completion(kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "words",
    [
        ("create", ""),  # a new name
        ("nosuch", ""),
        ("image", "nosuch", ""),
        ("create", "x", "--memory", ""),
    ],
)
def test_nothing_is_offered_where_nothing_is_known(words: tuple[str, ...]) -> None:
    assert complete_(*words) == Completion()


def test_once_the_arguments_are_given_options_are_offered() -> None:
    assert "--paused" in complete_("start", "x", "").words


def test_the_hidden_command_prints_the_kind_then_the_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert completion.main(build_parser(), ["--", "image", "re"]) == 0
    assert capsys.readouterr().out == "words\nresize\n"


@pytest.mark.parametrize("shell", sorted(completion.SCRIPTS))
def test_completion_prints_the_script_of_each_shell(
    capsys: pytest.CaptureFixture[str], shell: str
) -> None:
    from kdlabctl.cli import main

    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert script == completion.SCRIPTS[shell]
    assert "__complete --" in script


def test_a_names_type_keeps_the_name() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", type=completion.VM_NAME)
    assert parser.parse_args(["linux-6.9-rc1"]).name == "linux-6.9-rc1"
