"""Shared test plumbing: the three tiers and how a missing prerequisite is reported.

Outside CI a tier whose prerequisites are missing is skipped with the reason.
In CI (``CI=true``) it fails instead, naming what is missing: a skipped tier
proves nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import figures

if TYPE_CHECKING:
    from tests.logins import Logins

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, missing: str) -> None:
    """Skip (or in CI, fail) the current test when *condition* is false."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {missing}", pytrace=False)
    pytest.skip(f"prerequisite missing: {missing}")


def require_tool(name: str, package: str) -> str:
    """The path of the program *name*, required from Debian package *package*."""
    path = shutil.which(name)
    require(path is not None, f"{name} (apt-get install {package})")
    assert path is not None
    return path


def require_root() -> None:
    require(os.geteuid() == 0, "root (the vm tier drives the system libvirtd)")


@pytest.fixture(scope="session")
def logins() -> Iterator[Logins]:
    """Real login users (tests/logins.py): kdlabt-alice and kdlabt-bob in group
    kdlab, kdlabt-eve not; removed at the end of the session."""
    from tests import logins as accounts

    require(os.geteuid() == 0, "root (the tests make login users)")
    missing = accounts.missing()
    require(not missing, missing)
    with accounts.accounts() as users:
        yield users


@pytest.fixture(scope="session", autouse=True)
def _clean_sigterm_exits() -> Iterator[None]:
    """Every kdlabd the tests SIGTERM must exit cleanly (tests.harness.Kdlabd.stop
    asserts each); the run's tally is a figure. Session fixtures of the tiers,
    which stop their own kdlabd, end before this one."""
    yield
    from tests.harness import STOP_SECONDS, STOPS

    if not STOPS:
        return
    unclean = [stop for stop in STOPS if not stop.clean]
    figure = figures.record(
        "clean SIGTERM exits",
        len(STOPS) - len(unclean),
        f"== {len(STOPS)}",
        detail=f"of every kdlabd the tests stopped: the documented status within "
        f"{STOP_SECONDS:g} s"
        + "".join(
            f"; pid {s.pid}: " + ("hung" if s.status is None else f"exit {s.status}")
            for s in unclean
        ),
    )
    assert figure.met
