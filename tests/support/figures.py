"""Figures the security and reliability tests measure, and their goals (issue 6).

A figure test measures something (bad inputs wrongly accepted, methods that
leaked, orphans, reconnect time, ...), calls :func:`record`, and asserts the
result. :func:`record` prints the figure and appends it as one JSON line to
the file named by ``$KDLAB_FIGURES`` (default ``/tmp/kdlab-figures.jsonl``),
so a run's figures can be collected whatever pytest captured::

    KDLAB_FIGURES=/tmp/run.jsonl pytest tests/bus/test_security.py
    python -m tests.support.figures /tmp/run.jsonl      # the table

Loaded as a pytest plugin (``pytest -p tests.support.figures``) it starts each run
with an empty figures file, so the file holds that run's figures only, and
prints them in pytest's terminal summary.

:class:`ErrorReplies` checks every D-Bus error reply a test module provokes
for leaked Python tracebacks and turns the tally into a figure.
"""

from __future__ import annotations

import json
import operator
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.support.clients import has_traceback

FIGURES_ENV = "KDLAB_FIGURES"
DEFAULT_PATH = Path("/tmp/kdlab-figures.jsonl")

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_GOAL = re.compile(r"^\s*(==|<=|>=|<|>)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    goal: str
    met: bool
    unit: str = ""
    detail: str = ""
    test: str = ""
    time: float = 0.0

    def line(self) -> str:
        value = f"{self.value:g}{(' ' + self.unit) if self.unit else ''}"
        mark = "ok" if self.met else "NOT MET"
        goal = f"[goal {self.goal}: {mark}]" if self.goal else "[for information]"
        detail = f"  ({self.detail})" if self.detail else ""
        return f"FIGURE {self.name}: {value}  {goal}{detail}"


_recorded: list[Figure] = []


def meets(value: float, goal: str) -> bool:
    """Whether *value* meets *goal*, written as an operator and a number: ``"== 0"``.

    An empty goal makes the figure informational: it always "meets" it.
    """
    if not goal:
        return True
    match = _GOAL.match(goal)
    if match is None:
        raise ValueError(f"a goal is an operator and a number, not {goal!r}")
    return _OPERATORS[match[1]](value, float(match[2]))


def path() -> Path:
    return Path(os.environ.get(FIGURES_ENV) or DEFAULT_PATH)


def record(
    name: str, value: float, goal: str, *, unit: str = "", detail: str = ""
) -> Figure:
    """Print and keep the figure *name*; the caller asserts ``figure.met``."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    figure = Figure(
        name, value, goal, meets(value, goal), unit, detail, test, time.time()
    )
    _recorded.append(figure)
    print(figure.line())
    with path().open("a", encoding="utf-8") as out:
        out.write(json.dumps(asdict(figure)) + "\n")
    return figure


class ErrorReplies:
    """The D-Bus error replies (name, message) a module's tests provoked."""

    def __init__(self) -> None:
        self.seen = 0
        self.leaked: list[str] = []

    def check(self, name: str, text: str) -> None:
        """Count one error reply; fail at once if it carries a traceback."""
        self.seen += 1
        if has_traceback(text):
            self.leaked.append(f"{name}: {text}")
        assert not has_traceback(text), f"traceback in a D-Bus error reply: {text}"

    def outcome(self, reply: Any) -> str:
        """A dbus-next reply's outcome: "return", or its error name (checked)."""
        from dbus_next import MessageType

        if reply.message_type is MessageType.METHOD_RETURN:
            return "return"
        name = reply.error_name or ""
        self.check(name, str(reply.body[0]) if reply.body else "")
        return str(name)

    def record(self, where: str) -> Figure:
        return record(
            f"error replies with a Python traceback ({where})",
            len(self.leaked),
            "== 0",
            detail=f"{self.seen} error replies checked",
        )


def table(lines: list[dict[str, Any]]) -> str:
    rows = [Figure(**line).line() for line in lines]
    return "\n".join(rows) if rows else "no figures recorded"


# --- pytest plugin: pytest -p tests.support.figures -----------------------------


def pytest_sessionstart(session: Any) -> None:  # noqa: ARG001 (pytest's hook)
    """Empty the figures file: an earlier run's figures would pass for this run's."""
    path().write_text("", encoding="utf-8")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _recorded:
        return
    terminalreporter.section("figures (issue 6)")
    for figure in _recorded:
        terminalreporter.write_line(figure.line())


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else path()
    print(table([json.loads(line) for line in source.read_text().splitlines()]))
