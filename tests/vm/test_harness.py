"""The vm tier's harness: a kdlabd that dies on its own fails the session using it.

:func:`tests.support.system.system_kdlabd` used to report such a kdlabd as a clean
exit 0 at teardown; a death nobody asked for must fail, whatever its status.
"""

from __future__ import annotations

import signal

import pytest

from tests.support.prereq import require, require_root
from tests.support.system import system_kdlabd, virsh
from tests.vm.conftest import POOL_PREFIX

pytestmark = pytest.mark.vm

PREFIX = f"{POOL_PREFIX}-harness"


def die_during_a_session(how: signal.Signals) -> None:
    with system_kdlabd(PREFIX) as daemon:
        daemon.signal_behind_the_harness(how)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_system_kdlabd_fails_when_kdlabd_died_on_its_own(how: signal.Signals) -> None:
    require_root()
    require(virsh("version").returncode == 0, "libvirtd answering on qemu:///system")
    with pytest.raises(RuntimeError, match="kdlabd died on its own during the test"):
        die_during_a_session(how)
    # The session's clean-up still ran.
    assert f"{PREFIX}-boot" not in virsh("pool-list", "--all", "--name").stdout
