"""The tests' own layering: one harness package, ``tests.support``, for every tier
and for ``bench/``.

A tier imports, of ``tests``, only the support package and its own modules;
the support package imports no tier (nor a conftest); ``bench/`` imports only
the support package. So a helper two places need lives in ``tests/support``,
once, and no tier reaches into another's files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.unit import test_layers
from tests.unit.test_layers import imports_of

TIERS = ("unit", "bus", "vm")


def python_files(directory: Path) -> list[Path]:
    files = sorted(directory.rglob("*.py"))
    assert files, f"no sources under {directory}"
    return files


def reaching_out(paths: list[Path], allowed: tuple[str, ...]) -> list[str]:
    """Imports of a ``tests`` module by *paths* outside the *allowed* packages."""
    return sorted(
        f"{path.relative_to(REPO)} imports {module}"
        for path in paths
        for module in imports_of(path)
        if module.split(".")[0] == "tests"
        and module != "tests"
        and not module.startswith(allowed)
    )


def test_bench_imports_only_the_support_package() -> None:
    assert reaching_out(python_files(REPO / "bench"), ("tests.support",)) == []


def test_support_package_imports_no_tier() -> None:
    paths = python_files(REPO / "tests" / "support")
    assert reaching_out(paths, ("tests.support",)) == []


@pytest.mark.parametrize("tier", TIERS)
def test_tier_imports_only_itself_and_the_support_package(tier: str) -> None:
    paths = python_files(REPO / "tests" / tier)
    assert reaching_out(paths, ("tests.support", f"tests.{tier}")) == []


def test_the_check_sees_a_tier_reaching_into_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = tmp_path / "tests" / "bus"
    tier.mkdir(parents=True)
    (tier / "sneaky.py").write_text(
        "from tests.vm.conftest import Lab\n"
        "from tests import conftest\n"
        "from tests.support.bus import BusClient\n"
        "from tests.bus.contract import VM\n"
        "from . import gdbstub\n"
        "def later():\n"
        "    from ..unit import fake_hypervisor\n"
    )
    for module in (sys.modules[__name__], test_layers):
        monkeypatch.setattr(module, "REPO", tmp_path)
    assert reaching_out(python_files(tier), ("tests.support", "tests.bus")) == [
        "tests/bus/sneaky.py imports tests.conftest",
        "tests/bus/sneaky.py imports tests.unit",
        "tests/bus/sneaky.py imports tests.unit.fake_hypervisor",
        "tests/bus/sneaky.py imports tests.vm.conftest",
        "tests/bus/sneaky.py imports tests.vm.conftest.Lab",
    ]
