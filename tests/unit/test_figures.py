"""tests.support.figures: each pytest run starts a fresh figures file.

Two runs of a test that records one figure must leave one figure in the
file, not two: a figure left by an earlier run would pass for this run's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, figures

RECORDING_TEST = """
from tests.support import figures

def test_records() -> None:
    figures.record("runs of this test", 1, "== 1")
"""


def run_pytest(test_file: Path, figures_file: Path) -> subprocess.CompletedProcess[str]:
    """pytest with kdlab's configuration (which loads tests.support.figures) on
    *test_file*."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         "-c", str(REPO / "pyproject.toml"), str(test_file)],
        cwd=REPO,
        env={**os.environ, figures.FIGURES_ENV: str(figures_file)},
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip


def test_each_run_starts_a_fresh_figures_file(tmp_path: Path) -> None:
    test_file = tmp_path / "test_recording.py"
    test_file.write_text(RECORDING_TEST)
    figures_file = tmp_path / "figures.jsonl"
    figures_file.write_text('{"left": "by a run before"}\n')
    for _ in range(2):
        done = run_pytest(test_file, figures_file)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = figures_file.read_text().splitlines()
        assert [json.loads(line)["name"] for line in lines] == ["runs of this test"]
