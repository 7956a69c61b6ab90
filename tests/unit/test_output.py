"""kdlabctl.output: tables, JSON, timestamps (records: test_client.py)."""

from __future__ import annotations

import json
import pwd

import pytest

from kdlabctl import output
from kdlabctl.output import table


def test_print_json_is_sorted_and_parses(capsys: pytest.CaptureFixture[str]) -> None:
    output.print_json({"b": 1, "a": [1, 2]})
    text = capsys.readouterr().out
    assert text.endswith("}\n")
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"')


def test_table_aligns_columns() -> None:
    text = table(
        ["NAME", "STATE", "MEMORY"],
        [["linux-6.9-rc1", "running", "512M"], ["a", "defined", "2048M"]],
    )
    assert text.splitlines() == [
        "NAME           STATE    MEMORY",
        "linux-6.9-rc1  running  512M",
        "a              defined  2048M",
    ]


def test_table_column_starts_line_up() -> None:
    headers = ["A", "B", "C"]
    rows = [["x" * n, "y" * (5 - n), "z"] for n in range(1, 6)]
    lines = table(headers, rows).splitlines()
    starts = [lines[0].index(h) for h in headers]
    assert starts == [0, 7, 13]  # each column: its widest cell, then two spaces
    for line, row in zip(lines[1:], rows, strict=True):
        for start, cell in zip(starts, row, strict=True):
            assert line[start:].startswith(cell), (line, cell)
            assert start == 0 or line[start - 2 : start] == "  "


def test_table_no_trailing_spaces() -> None:
    text = table(["NAME", "OWNER"], [["vm", ""], ["vm2", "root"]])
    assert all(line == line.rstrip() for line in text.splitlines())


def test_table_headers_only() -> None:
    assert table(["NAME", "STATE"], []) == "NAME  STATE"


def test_table_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError, match="zip"):
        table(["A", "B"], [["only one"]])


def test_user_name() -> None:
    assert output.user_name(0) == pwd.getpwuid(0).pw_name
    unknown = next(uid for uid in range(2**31 - 2, 2**31 - 100, -1) if not _exists(uid))
    assert output.user_name(unknown) == str(unknown)


def _exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_timestamp() -> None:
    assert output.timestamp(0) == "-"
    assert output.timestamp(1_700_000_000_123_456) == "2023-11-14 22:13:20 UTC"
