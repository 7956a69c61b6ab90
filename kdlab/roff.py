"""Manual pages in roff (the man(7) macros), written from what the code declares.

kdlabctl.manpage and kdlabd.manpage build their pages with :class:`Page`; the
commands and options come from the programs' own argparse parsers
(:meth:`Page.program`), so no hand-kept copy can drift from them. All text is
escaped for groff, and ``groff -man -ww`` reads a page without a warning
(tests/unit/test_manpages.py). argparse has no public way to walk a parser:
its documented private attributes (``_actions``, ``_choices_actions``) are
read here, in one place.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Usage lines are laid out unwrapped: roff fills them to the reader's width.
_UNWRAPPED = 1_000_000
_HEADING = re.compile(r"^(\S[^:]*):$")
# An epilog line "  TERM   text": a term, two or more spaces, its text.
_EPILOG_ITEM = re.compile(r"^\s+(\S+)\s{2,}(.*)$")


def escape(text: str) -> str:
    """*text* as roff input: backslashes, dashes and non-ASCII characters
    escaped, and no line that groff would take for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(char if char.isascii() else f"\\[u{ord(char):04X}]" for char in text)
    return re.sub(r"(?m)^(?=[.'])", r"\\&", text)


def fill(text: str) -> str:
    """*text* as one line of roff text, which groff fills to the page's width;
    ``literal`` parts (docstrings' markup) in bold."""
    parts = re.split(r"``(.+?)``", " ".join(text.split()))
    return "".join(
        bold(part) if index % 2 else escape(part) for index, part in enumerate(parts)
    )


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _argument(text: str) -> str:
    """*text* as one quoted argument of a macro (.SH, .SS, .TH)."""
    return '"' + escape(text).replace('"', "\\(dq") + '"'


def version() -> str:
    """kdlab's version as installed ("" when it is not installed)."""
    try:
        return importlib.metadata.version("kdlab")
    except importlib.metadata.PackageNotFoundError:
        return ""


def commands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[argparse.ArgumentParser, str]]:
    """Every command of *parser*, nested ones included (``kdlabctl image
    build``), in the order of ``--help``, each with its one-line help."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a command listed already
                continue
            seen.add(id(sub))
            yield sub, helps.get(name, "")
            yield from commands(sub)


class Page:
    """One manual page, built section by section; :meth:`text` is the roff."""

    def __init__(self, name: str, section: int, summary: str) -> None:
        self.name = name
        self.section = section
        self._lines = [
            f".TH {_argument(name.upper())} {section} "
            f'"" {_argument(f"kdlab {version()}".strip())} "kdlab manual"',
            # Left-aligned, unhyphenated: option names and paths stay whole.
            ".ad l",
            ".nh",
            ".SH NAME",
            f"{escape(name)} \\- {escape(summary)}",
        ]

    def heading(self, text: str) -> None:
        self._lines.append(f".SH {_argument(text)}")

    def subheading(self, text: str) -> None:
        self._lines.append(f".SS {_argument(text)}")

    def paragraph(self, roff: str) -> None:
        """A paragraph of roff text (escaped by the caller)."""
        self._lines += [".PP", roff]

    def text(self, text: str) -> None:
        """Plain *text*: its blank lines separate paragraphs, roff fills each."""
        for block in re.split(r"\n\s*\n", text.strip()):
            if block.strip():
                self.paragraph(fill(block))

    def item(self, tag: str, body: str) -> None:
        """A tagged paragraph: *tag* above the indented *body* (both roff)."""
        self._lines += [".TP", tag]
        if body:
            self._lines.append(body)

    def indent(self) -> None:
        self._lines.append(".RS")

    def outdent(self) -> None:
        self._lines.append(".RE")

    def program(
        self, parser: argparse.ArgumentParser, options: str = "OPTIONS"
    ) -> None:
        """SYNOPSIS, DESCRIPTION and *options* of *parser*, then its commands
        (each with its own synopsis and options) and its epilog."""
        self.heading("SYNOPSIS")
        self.paragraph(synopsis(parser))
        self.heading("DESCRIPTION")
        self.text(parser.description or "")
        self.heading(options)
        self.options(parser)
        found = list(commands(parser))
        if found:
            self.heading("COMMANDS")
        for sub, help_text in found:
            self.subheading(sub.prog)
            self.paragraph(synopsis(sub))
            self.text(sub.description or help_text)
            self.options(sub)
        if parser.epilog:
            self.epilog(parser.epilog)

    def options(self, parser: argparse.ArgumentParser) -> None:
        """Each argument and option of *parser* with its help (not ``--help``,
        nor a nested command's name, which has a subheading of its own)."""
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (
                isinstance(action, argparse._HelpAction)
                or action.help == argparse.SUPPRESS
            ):
                continue
            help_text = formatter._expand_help(action) if action.help else ""
            if isinstance(action, argparse._SubParsersAction):
                names = ", ".join(bold(name) for name in action.choices)
                self.item(italic(str(action.metavar or "COMMAND")), f"one of {names}")
                continue
            self.item(invocation(formatter, action), fill(help_text))

    def epilog(self, epilog: str) -> None:
        """An epilog such as "exit codes:" and indented "CODE  meaning" lines:
        a section per heading, an item per such line, else paragraphs."""
        for line in epilog.splitlines():
            heading, item = _HEADING.match(line), _EPILOG_ITEM.match(line)
            if heading:
                self.heading(heading[1].upper())
            elif item:
                self.item(bold(item[1]), fill(item[2]))
            elif line.strip():
                self.text(line)

    def see_also(self, *pages: tuple[str, int]) -> None:
        """The SEE ALSO section: *pages* as (name, section)."""
        self.heading("SEE ALSO")
        self.paragraph(", ".join(f"{bold(name)}({number})" for name, number in pages))

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"

    def write(self, directory: Path) -> Path:
        """Write the page to DIRECTORY/manN/NAME.N, atomically (a reader of the
        manual never sees half a page)."""
        target = directory / f"man{self.section}" / f"{self.name}.{self.section}"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(self.render())
            os.chmod(scratch, 0o644)
            os.replace(scratch, target)
        except BaseException:
            os.unlink(scratch)
            raise
        return target


def synopsis(parser: argparse.ArgumentParser) -> str:
    """*parser*'s usage line in roff: the program in bold, the rest as argparse
    writes it."""
    formatter = argparse.HelpFormatter(parser.prog, width=_UNWRAPPED)
    formatter.add_usage(
        parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix=""
    )
    usage = " ".join(formatter.format_help().split())
    rest = usage.removeprefix(parser.prog)
    return bold(parser.prog) + escape(rest)


def invocation(formatter: argparse.HelpFormatter, action: argparse.Action) -> str:
    """How *action* is written on a command line, in roff: ``--kernel PATH``."""
    if not action.option_strings:
        return italic(formatter._format_args(action, action.dest))
    names = ", ".join(bold(option) for option in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} {italic(formatter._format_args(action, action.dest.upper()))}"
