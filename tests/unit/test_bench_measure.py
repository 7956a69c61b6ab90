"""The statistics of bench/: interleaving, percentiles, rows and their JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest

from bench.__main__ import main
from bench.measure import Goal, failed, interleaved, percentile, row


def test_interleaved_rotates_who_goes_first_and_skips_warmup() -> None:
    order: list[str] = []

    def contender(name: str, value: float) -> Callable[[], float]:
        def run() -> float:
            order.append(name)
            return value

        return run

    a, b, c = interleaved(
        2, contender("a", 1), contender("b", 2), contender("c", 3), warmup=1
    )
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert (a, b, c) == ([1, 1], [2, 2], [3, 3])


@pytest.mark.parametrize(
    ("q", "expected"), [(50, 50), (99, 99), (100, 100), (1, 1), (0, 1)]
)
def test_percentile_is_nearest_rank(q: float, expected: float) -> None:
    values = [float(v) for v in range(100, 0, -1)]  # unsorted on purpose
    assert percentile(q)(values) == expected


def test_row_ratio_goal_and_json() -> None:
    goal = Goal("ratio <= 1.10", max_ratio=1.10)
    kept = row("x", [1.0, 3.0, 2.0], [2.0, 2.0, 2.0], baseline="b", unit="s", goal=goal)
    assert (kept.kdlab, kept.baseline_value, kept.ratio) == (2.0, 2.0, 1.0)
    assert kept.met is True
    slow = row("x", [3.0], [2.0], baseline="b", unit="s", goal=goal)
    assert slow.met is False
    data = kept.as_json()
    for key in ("name", "kdlab", "baseline", "baseline_value", "ratio", "unit"):
        assert key in data
    assert (data["runs"], data["goal"], data["kdlab_spread"]) == (
        3,
        "ratio <= 1.10",
        [1.0, 3.0],
    )


def test_a_failed_row_misses_its_goal_and_is_valid_json() -> None:
    broken = failed("x", baseline="b", unit="s", goal=Goal("-"), why="no libvirtd")
    assert math.isnan(broken.ratio)
    assert broken.met is False
    data = json.loads(json.dumps(broken.as_json(), allow_nan=False))
    assert data["kdlab"] is None
    assert data["ratio"] is None
    assert data["note"] == "no libvirtd"


def test_unknown_benchmark_names_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["no_such_benchmark"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
