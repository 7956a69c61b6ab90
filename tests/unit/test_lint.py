"""The code stays as clean as style.md asks: ruff, ruff format, mypy --strict.

The bus modules must ignore ruff's F821 (dbus-next reads D-Bus type strings
such as ``"a{sv}"`` from annotations); a name that is really undefined there
is still caught here, by looking at every F821 outside an annotation.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

PYTHON_DIRS = ["kdlabd", "kdlabctl", "tests", "bench"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )


def test_ruff_check() -> None:
    result = run("ruff", "check", "--output-format", "concise", *PYTHON_DIRS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = run("ruff", "format", "--check", *PYTHON_DIRS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def _signature_lines(path: Path) -> set[int]:
    """Lines of function signatures: where dbus-next's type strings live."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines.update(range(node.lineno, node.body[0].lineno))
    return lines


def test_no_undefined_names_in_the_bus_modules() -> None:
    result = run(
        "ruff",
        "check",
        "--select",
        "F821",
        "--output-format",
        "json",
        "--config",
        "lint.per-file-ignores = {}",
        "kdlabd/bus",
    )
    undefined = [
        f"{finding['filename']}:{finding['location']['row']}: {finding['message']}"
        for finding in json.loads(result.stdout)
        if finding["location"]["row"]
        not in _signature_lines(REPO / finding["filename"])
    ]
    assert undefined == []
