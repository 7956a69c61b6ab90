"""How kdlabctl prints: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import sys

from kdlabctl import caller

TYPE_CHECKING = False  # importing typing costs more than a listing
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, TypeVar

    from kdlabctl.records import Record

    R = TypeVar("R", bound=Record)

DIAGNOSIS_FIELDS = ("code", "severity", "cause", "fix")


def diagnosis(value: Sequence[str]) -> dict[str, str] | None:
    """The VM's ``Diagnosis`` struct as a mapping, or None when nothing was found."""
    return dict(zip(DIAGNOSIS_FIELDS, value, strict=True)) if value[0] else None


def as_json(record: Record) -> dict[str, Any]:
    """A record of :mod:`kdlabctl.records` for ``--json``: its fields, which are
    the D-Bus properties in snake_case."""
    converted = record.fields()
    if "diagnosis" in converted:
        converted["diagnosis"] = diagnosis(converted["diagnosis"])
    if "shares" in converted:  # a{ss}, as the property is
        converted["shares"] = dict(converted["shares"])
    return converted


def print_json(value: Any) -> None:
    import json  # only for --json

    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def user_name(uid: int) -> str:
    """The name of *uid*, an owner kdlabd reported (on a host: its user's name
    for the ssh user's uid, else the number; :mod:`kdlabctl.caller`)."""
    return caller.user_name(uid)


def timestamp(usec: int) -> str:
    from datetime import UTC, datetime  # only for show

    if not usec:
        return "-"
    return datetime.fromtimestamp(usec / 1e6, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, like ``virsh list``."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """What ``show`` commands print: one ``Label: value`` a line, aligned."""
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        print(f"{label + ':':<{width + 1}} {value}")


def listing(
    records: Sequence[R],
    *,
    json_output: bool,
    headers: Sequence[str],
    row: Callable[[R], Sequence[str]],
) -> None:
    """Print what ``list`` commands show: a table of *row* per record, or JSON."""
    if json_output:
        print_json([as_json(record) for record in records])
    else:
        print(table(headers, [row(record) for record in records]))
