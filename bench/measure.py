"""Rows of the benchmark table, and interleaved repetitions that produce them."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One benchmark result: kdlab's median against its baseline's, same run."""

    name: str
    kdlab: float
    baseline: str
    baseline_value: float
    unit: str
    runs: int
    goal: str
    kdlab_spread: tuple[float, float]
    baseline_spread: tuple[float, float]
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.kdlab / self.baseline_value if self.baseline_value else float("inf")

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = round(self.ratio, 3)
        return data


def interleaved(
    runs: int, kdlab: Callable[[], float], baseline: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Alternate the two measurements so drift hits both alike."""
    ours, theirs = [], []
    for i in range(runs):
        pair = (kdlab, baseline) if i % 2 == 0 else (baseline, kdlab)
        for fn in pair:
            (ours if fn is kdlab else theirs).append(fn())
    return ours, theirs


def row(
    name: str,
    ours: list[float],
    theirs: list[float],
    *,
    baseline: str,
    unit: str,
    goal: str,
    note: str = "",
) -> Row:
    return Row(
        name=name,
        kdlab=statistics.median(ours),
        baseline=baseline,
        baseline_value=statistics.median(theirs),
        unit=unit,
        runs=len(ours),
        goal=goal,
        kdlab_spread=(min(ours), max(ours)),
        baseline_spread=(min(theirs), max(theirs)),
        note=note,
    )
