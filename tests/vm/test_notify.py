"""``kdlabctl notify`` on real kernels: a panic is told once, to its owner only.

Two VMs boot Debian's kernel with ``rdinit=/bin/busybox``: busybox, run as
``busybox``, prints its usage and exits, so init ends and the kernel panics
("Attempted to kill init!"). One is the agent's user's, one root's. The agent
runs as that user (a member of group kdlab) on a private session bus with a
notification server of the test's own.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import Identity, kdlabctl
from tests.support.notifications import (
    Launchers,
    NotificationServer,
    NotifyAgent,
    session_bus,
)
from tests.support.system import remove_vm
from tests.vm.conftest import Lab
from tests.vm.test_lifecycle import wait_for_diagnosis

pytestmark = pytest.mark.vm

PANICS = "rdinit=/bin/busybox"
QUIET_WAIT = 20.0  # s after the restart: kdlabd re-diagnoses every 2 s


@pytest.fixture
def desktop() -> Iterator[tuple[NotificationServer, Launchers, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="kdlab-notify-", dir="/var/tmp"))
    directory.chmod(0o755)
    session = session_bus(directory / "session")
    server = NotificationServer(session.address).start()
    yield server, Launchers(directory / "launchers"), directory
    server.stop()
    session.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_a_panic_is_told_once_to_its_owner_across_a_kdlabd_restart(
    lab: Lab,
    kdlab_user: Identity,
    desktop: tuple[NotificationServer, Launchers, Path],
) -> None:
    server, launchers, directory = desktop
    kernel, initrd = directory / "vmlinuz", directory / "initrd"
    shutil.copyfile(lab.kernel.vmlinuz, kernel)
    shutil.copyfile(lab.initramfs, initrd)
    kernel.chmod(0o644)
    initrd.chmod(0o644)
    address = lab.daemon.address
    mine, roots = (f"vmt-{who}-{uuid.uuid4().hex[:6]}" for who in ("mine", "roots"))
    agent = NotifyAgent(address, server.address, launchers, user=kdlab_user)
    try:
        agent.wait_until_following()
        for name, user in ((mine, kdlab_user), (roots, None)):
            created = kdlabctl(
                address, "create", name, "--kernel", str(kernel),
                "--initrd", str(initrd), "--memory", "256", "--cmdline", PANICS,
                # Left as the panic left it: the same boot after the restart.
                "--on-panic", "ignore",
                user=user,
            )  # fmt: skip
            assert created.returncode == 0, created.stderr
            started = kdlabctl(address, "start", name, user=user)
            assert started.returncode == 0, started.stderr

        (told,) = server.wait_for(lambda got: len(got) >= 1, timeout=180)
        assert told.app_name == "kdlab"
        assert told.summary == f"{mine}: init exited"
        assert "init-died" in told.body
        assert told.action_keys == ("console", "gdb", "page", "default")
        # root's VM panicked just the same: it is not the agent's user's.
        assert wait_for_diagnosis(lab, roots)["code"] == "init-died"
        assert "Attempted to kill init!" in lab.ctl("logs", mine).stdout

        lab.daemon.stop()
        lab.daemon.start()
        assert wait_for_diagnosis(lab, mine)["code"] == "init-died", "the same boot"
        time.sleep(QUIET_WAIT)
        assert server.received == [told], "told again, or root's VM told"
    finally:
        agent.stop()
        for name in (mine, roots):
            remove_vm(lab.daemon, name)
