"""``kernel_build``: ``kdlabctl kernel build`` against ``make``, same tree and config.

Debian's 6.1 tree (:func:`tests.support.kernel_tree.linux_source_tree`, read
only: both build into ``O=`` directories of their own), configured once by
``kdlabctl kernel configure --minimal``. The baseline is the very ``make``
command kdlabctl runs (same targets, same ``-j``), typed by hand.

- ``kernel_build``: a clean build (``make clean`` before each, untimed). Two
  of each in the full mode, not five: a clean build takes about 5 minutes
  here (15 on a busy machine), so five of each would take an hour of the run.
- ``kernel_build:again``: building again with nothing changed, where kdlabctl's
  own work (Python, the config check) weighs most.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bench.lab import run, scratch
from bench.measure import NO_GOAL, Row, interleaved, row, seconds
from kdlab.kernel import kconfig
from kdlabctl import kernel as kernel_cli
from tests.support.kernel_tree import linux_source_tree

KDLABCTL_KERNEL = [sys.executable, "-m", "kdlabctl", "kernel"]
JOBS = len(os.sched_getaffinity(0))  # kdlabctl's default -j
# Clean builds of each, by --quick: 5 minutes a build here, so not 5 (see above).
CLEAN_RUNS = {True: 1, False: 2}
BUILD_TIMEOUT = 3600.0  # a clean build takes 6 min on an idle 2-CPU machine, 15+ busy


def _make(tree: Path, out: Path) -> list[str]:
    """The make command ``kdlabctl kernel build`` runs for *out*."""
    config = kconfig.parse((out / ".config").read_text(errors="replace"))
    dirs = kernel_cli.Dirs(tree, out)
    return dirs.make(*kernel_cli.build_targets(config), jobs=JOBS)


def _clean_then(tree: Path, out: Path, build: list[str]) -> float:
    run(["make", "-C", str(tree), f"O={out}", "clean"])
    return _build(build)


def _build(command: list[str]) -> float:
    return seconds(lambda: run(command, timeout=BUILD_TIMEOUT))


def kernel_build(quick: bool) -> list[Row]:
    """kdlabctl's kernel build against the same make, clean and again."""
    tree = linux_source_tree()
    with scratch() as work:
        ours_dir, make_dir = work / "kdlabctl", work / "make"
        for out in (ours_dir, make_dir):
            run([*KDLABCTL_KERNEL, "configure", "--minimal", str(tree), "-O", str(out)])
        ours_cmd = [*KDLABCTL_KERNEL, "build", str(ours_dir)]
        make_cmd = _make(tree, make_dir)
        clean = interleaved(
            CLEAN_RUNS[quick],
            lambda: _clean_then(tree, ours_dir, ours_cmd),
            lambda: _clean_then(tree, make_dir, make_cmd),
        )
        again = interleaved(
            3 if quick else 5,
            lambda: _build(ours_cmd),
            lambda: _build(make_cmd),
        )
    what = f"Debian's 6.1 tree, kdlabctl kernel configure --minimal, -j{JOBS}"
    return [
        row(
            "kernel_build",
            *clean,
            baseline="make (same targets and -j)",
            unit="s",
            goal=NO_GOAL,
            note=f"clean build, {CLEAN_RUNS[quick]} of each (5 min a build); {what}",
        ),
        row(
            "kernel_build:again",
            *again,
            baseline="make (same targets and -j)",
            unit="s",
            goal=NO_GOAL,
            note=f"nothing changed; {what}",
        ),
    ]
