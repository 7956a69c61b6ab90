"""Rows of the benchmark table, and interleaved repetitions that produce them."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Stat = Callable[[Sequence[float]], float]


@dataclass(frozen=True)
class Goal:
    """What a row must show: a text for people, and the bounds that decide it."""

    text: str
    max_ratio: float | None = None
    max_value: float | None = None

    def met(self, value: float, ratio: float) -> bool | None:
        """Whether *value* (at *ratio* to its baseline) meets it; None: no bound."""
        if self.max_ratio is None and self.max_value is None:
            return None
        return (self.max_ratio is None or ratio <= self.max_ratio) and (
            self.max_value is None or value <= self.max_value
        )


INFO = Goal("- (diagnostic)")
NO_GOAL = Goal("none set")


@dataclass(frozen=True)
class Row:
    """One benchmark result: kdlab's statistic against its baseline's, same run."""

    name: str
    kdlab: float
    baseline: str
    baseline_value: float
    unit: str
    runs: int
    goal: Goal
    kdlab_spread: tuple[float, float]
    baseline_spread: tuple[float, float]
    note: str = ""

    @property
    def ratio(self) -> float:
        if math.isnan(self.kdlab) or math.isnan(self.baseline_value):
            return math.nan
        return self.kdlab / self.baseline_value if self.baseline_value else math.inf

    @property
    def met(self) -> bool | None:
        if math.isnan(self.ratio):
            return False
        return self.goal.met(self.kdlab, self.ratio)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["goal"] = self.goal.text
        data["met"] = self.met
        data["ratio"] = _finite(round(self.ratio, 3))
        for key in ("kdlab", "baseline_value"):
            data[key] = _finite(data[key])
        for key in ("kdlab_spread", "baseline_spread"):
            data[key] = [_finite(v) for v in data[key]]
        return data


def _finite(value: float) -> float | None:
    """JSON has no NaN: a value that could not be measured is null."""
    return None if math.isnan(value) else value


def failed(name: str, *, baseline: str, unit: str, goal: Goal, why: str) -> Row:
    """A row for a measurement that could not be made: it misses its goal."""
    nan = math.nan
    return Row(name, nan, baseline, nan, unit, 0, goal, (nan, nan), (nan, nan), why)


def seconds(fn: Callable[[], object]) -> float:
    """How long *fn* takes, by the monotonic clock."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    runs: int, *contenders: Callable[[], float], warmup: int = 0
) -> tuple[list[float], ...]:
    """Run the contenders in turn, *runs* times, rotating who goes first.

    Drift (another process, the page cache, a CPU frequency change) then hits
    all alike. *warmup* rounds run first and are not counted.
    """
    results: list[list[float]] = [[] for _ in contenders]
    for i in range(warmup + runs):
        shift = i % len(contenders)
        for index in [*range(shift, len(contenders)), *range(shift)]:
            value = contenders[index]()
            if i >= warmup:
                results[index].append(value)
    return tuple(results)


def percentile(q: float) -> Stat:
    """The *q*-th percentile (nearest rank), e.g. ``percentile(99)``."""

    def stat(values: Sequence[float]) -> float:
        ordered = sorted(values)
        rank = max(math.ceil(q / 100 * len(ordered)), 1)
        return ordered[rank - 1]

    return stat


def row(
    name: str,
    ours: Sequence[float],
    theirs: Sequence[float],
    *,
    baseline: str,
    unit: str,
    goal: Goal,
    note: str = "",
    stat: Stat = statistics.median,
    scale: float = 1.0,
) -> Row:
    """A row of *stat* (the median unless told) of both series, times *scale*."""
    return Row(
        name=name,
        kdlab=stat(ours) * scale,
        baseline=baseline,
        baseline_value=stat(theirs) * scale,
        unit=unit,
        runs=len(ours),
        goal=goal,
        kdlab_spread=(min(ours) * scale, max(ours) * scale),
        baseline_spread=(min(theirs) * scale, max(theirs) * scale),
        note=note,
    )


class Laps:
    """Durations of the parts of each run, by name, for a row's note."""

    def __init__(self) -> None:
        self._laps: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self._laps.setdefault(name, []).append(value)

    def values(self, name: str) -> list[float]:
        return list(self._laps[name])

    def median(self, name: str) -> float:
        return statistics.median(self._laps[name])

    def note(self, *names: str, unit: str = "s", scale: float = 1.0) -> str:
        """``name median unit`` for each of *names* that was measured."""
        return ", ".join(
            f"{name} {self.median(name) * scale:.2f} {unit}"
            for name in names
            if name in self._laps
        )
