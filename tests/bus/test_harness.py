"""The harness itself: a kdlabd that dies on its own during a test fails the test.

A death is "on its own" when the test neither stopped, killed nor waited for
kdlabd. Whatever its exit status (a clean 0 after a stray SIGTERM included),
the stop at the end of the test must report it instead of a clean exit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.bus import PrivateBus
from tests.support.testdriver import Lab, defined_fleet

pytestmark = pytest.mark.bus


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_kdlabd_that_died_on_its_own_fails_the_stop(
    bus: PrivateBus, workdir: Path, how: signal.Signals
) -> None:
    lab = Lab(bus, workdir, defined_fleet(1))
    lab.populate()
    lab.start()
    lab.daemon.signal_behind_the_harness(how)
    with pytest.raises(AssertionError, match="kdlabd died on its own during the test"):
        lab.stop_cleanly()
    # Starting again, too, reports the death the test had not noticed.
    with pytest.raises(AssertionError, match="kdlabd died on its own during the test"):
        lab.start()


def test_an_end_the_test_waited_for_is_not_a_death(
    bus: PrivateBus, workdir: Path
) -> None:
    lab = Lab(bus, workdir, defined_fleet(1))
    lab.populate()
    lab.start()
    os.kill(lab.daemon.pid, signal.SIGTERM)
    assert lab.daemon.wait() == 0
    assert lab.daemon.died_on_its_own() == ""
    lab.start()
    lab.stop_cleanly()
