"""Fixtures every tier may use, and the figure every run ends with.

The harness itself (processes, clients, prerequisites) is the package
``tests.support``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.support import figures
from tests.support.prereq import require

if TYPE_CHECKING:
    from tests.support.logins import Logins
    from tests.support.sshhost import SshHost


def pytest_configure() -> None:
    """Tests press Ctrl-C on the clients they start (SIGINT). A run started in
    the background of a non-interactive shell (``.ci/run &``) has SIGINT
    ignored, and every client would inherit that: give it back."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def logins() -> Iterator[Logins]:
    """Real login users (tests/support/logins.py): kdlabt-alice and kdlabt-bob in
    group kdlab, kdlabt-eve not; removed at the end of the session."""
    from tests.support import logins as accounts

    require(os.geteuid() == 0, "root (the tests make login users)")
    missing = accounts.missing()
    require(not missing, missing)
    with accounts.accounts() as users:
        yield users


@pytest.fixture(scope="session")
def ssh_host() -> Iterator[SshHost]:
    """A second "host" (tests/support/sshhost.py): the tests' own sshd on
    127.0.0.1 in a network namespace of its own; stopped at the end of the
    session."""
    from tests.support import sshhost

    require(os.geteuid() == 0, "root (the tests run an sshd in a network namespace)")
    missing = sshhost.missing()
    require(not missing, missing)
    with sshhost.ssh_host() as host:
        yield host


@pytest.fixture(scope="session", autouse=True)
def _clean_sigterm_exits() -> Iterator[None]:
    """Every kdlabd the tests SIGTERM must exit cleanly (Kdlabd.stop in
    tests/support/daemon.py asserts each); the run's tally is a figure. Session
    fixtures of the tiers, which stop their own kdlabd, end before this one."""
    yield
    from tests.support.daemon import STOPS
    from tests.support.timeouts import STOP_SECONDS

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
