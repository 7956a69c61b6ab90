"""``kdlabctl notify`` between kdlabd (test driver) and a notification server.

The agent runs as a member of group kdlab (nobody) on a private session bus
with a notification server of the test's own, which records every Notify
call; its terminal and xdg-open are scripts that record their command line.
Whatever the agent should not have told would arrive before a later
notification the test waits for: the agent handles kdlabd's signals in order.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tests.bus.conftest import Ctl
from tests.bus.test_diagnosis_privacy import PANIC_LOG
from tests.bus.test_policy import kdlab_member
from tests.support.bus import BusClient, PrivateBus
from tests.support.clients import Identity, kdlabctl
from tests.support.notifications import (
    Launchers,
    NotificationServer,
    NotifyAgent,
    session_bus,
)
from tests.support.testdriver import FakeVM, Lab

pytestmark = pytest.mark.bus

__all__ = ["kdlab_member"]  # a fixture

BOOTED_AT = 1_700_000_100_000_000
PAGE = "http://localhost:9999/kdlab"


@dataclass
class Desktop:
    """A session bus with a notification server, the agent's launchers, and
    :meth:`start_agent`."""

    system: str
    server: NotificationServer
    launchers: Launchers
    user: Identity
    agents: list[NotifyAgent] = field(default_factory=list)

    def start_agent(self) -> NotifyAgent:
        """kdlabctl notify as the member, once it follows kdlabd."""
        agent = NotifyAgent(
            self.system,
            self.server.address,
            self.launchers,
            user=self.user,
            page_url=PAGE,
        )
        self.agents.append(agent)
        agent.wait_until_following()
        return agent


@pytest.fixture
def desktop(
    bus: PrivateBus, workdir: Path, kdlab_member: Identity
) -> Iterator[Desktop]:
    session = session_bus(workdir / "session")
    server = NotificationServer(session.address).start()
    launchers = Launchers(workdir / "launchers")
    desktop = Desktop(bus.address, server, launchers, kdlab_member)
    yield desktop
    for agent in desktop.agents:
        agent.stop()
    server.stop()
    session.stop()


@pytest.fixture
def member_imports(
    ctl: Ctl, kernels: dict[str, Path], kdlab_member: Identity
) -> Callable[[str], None]:
    """``member_imports(NAME)``: the member imports an image (which fails on
    the test driver: it cannot upload)."""

    def run(name: str) -> None:
        result = ctl("image", "import", name, str(kernels["text"]), user=kdlab_member)
        assert result.returncode != 0, "the test driver cannot upload"

    return run


@pytest.mark.usefixtures("kdlabd")
def test_a_job_that_ends_is_told_to_its_owner_only(
    ctl: Ctl,
    desktop: Desktop,
    member_imports: Callable[[str], None],
    kernels: dict[str, Path],
) -> None:
    desktop.start_agent()
    # root's import ends first; the member's after it.
    assert ctl("image", "import", "roots", str(kernels["text"])).returncode != 0
    member_imports("mine")
    (told,) = desktop.server.wait_for(lambda got: len(got) >= 1)
    assert told.app_name == "kdlab"
    assert told.summary == "image mine: import failed"
    assert "org.kdlab.Kdlab1.Error." in told.body
    assert told.hints["urgency"] == 2
    assert told.action_keys == ("page",)


@pytest.mark.usefixtures("kdlabd")
def test_a_requested_stop_is_not_told(
    ctl: Ctl,
    client: BusClient,
    desktop: Desktop,
    member_imports: Callable[[str], None],
) -> None:
    """The member starts and stops their VM: LastStop "requested", nothing to
    tell; the import after it is the first and only notification."""
    desktop.start_agent()
    assert ctl("start", "booted", user=desktop.user).returncode == 0
    assert ctl("stop", "booted", user=desktop.user).returncode == 0
    assert client.vm_properties("booted")["LastStop"] == "requested"
    member_imports("after")
    (told,) = desktop.server.wait_for(lambda got: len(got) >= 1)
    assert told.summary == "image after: import failed"


# A running VM of the member's whose boot kdlabd marked, one of root's; the
# test turns both into crashed domains while kdlabd is down.
MINE = FakeVM(
    "mine", "running", 65534, "", "console=ttyS0 nokaslr", booted_usec=BOOTED_AT
)
ROOTS = FakeVM(
    "roots", "running", 0, "", "console=ttyS0 nokaslr", booted_usec=BOOTED_AT
)


def crashed(vm: FakeVM) -> FakeVM:
    return replace(vm, state="crashed")


def test_a_stop_nobody_asked_for_is_told_once_across_kdlabd_restarts(
    bus: PrivateBus,
    workdir: Path,
    client: BusClient,
    desktop: Desktop,
    member_imports: Callable[[str], None],
) -> None:
    server = desktop.server
    lab = Lab(bus, workdir, [MINE, ROOTS])
    with lab.serving():
        desktop.start_agent()
        # Both domains crash while kdlabd is down (the test driver reads its
        # file again at start: the boot marks are those kdlabd recorded).
        lab.daemon.stop()
        lab.vms = (crashed(MINE), crashed(ROOTS))
        lab.populate()
        lab.start()
        (told,) = server.wait_for(lambda got: len(got) >= 1)
        assert told.summary == "mine stopped unexpectedly"
        assert "crashed" in told.body
        assert told.action_keys == ("page", "default"), "no console or gdb: it is off"
        assert client.vm_properties("mine")["LastStop"] == "crashed"

        # Another restart: the same boot's stop, already told.
        lab.daemon.stop()
        lab.start()
        member_imports("later")
        first, second = server.wait_for(lambda got: len(got) >= 2)
        assert first == told
        assert second.summary == "image later: import failed"


def test_a_panic_is_told_with_actions_that_open_console_gdb_and_page(
    bus: PrivateBus, workdir: Path, desktop: Desktop
) -> None:
    """The agent starts before kdlabd; kdlabd comes up with the member's VM
    panicked: one notification, whose actions launch the right commands."""
    server, launchers = desktop.server, desktop.launchers
    # OnPanic "ignore": kdlabd leaves the VM as it is (the test driver cannot
    # dump it; the dump and the stop would be notifications of their own).
    panicked = FakeVM(
        "panicked", "running", 65534, "", "console=ttyS0 nokaslr", on_panic="ignore"
    )
    lab = Lab(bus, workdir, [panicked])
    lab.populate()
    lab.layout.console_log(panicked.name).write_text(PANIC_LOG)
    agent = desktop.start_agent()
    assert "(not running now)" in agent.output()
    lab.start()
    try:
        (told,) = server.wait_for(lambda got: len(got) >= 1)
        assert told.summary == "panicked: kernel panic"
        assert "kernel-panic" in told.body
        assert told.hints["urgency"] == 2
        assert told.action_keys == ("console", "gdb", "page", "default")
        for action in ("console", "gdb", "page"):
            server.invoke(told, action)
        launched = launchers.wait_for(3)
    finally:
        lab.stop_cleanly()
    ctl_argv = [sys.executable, "-m", "kdlabctl", "--bus", bus.address, "--host="]
    assert sorted(launched) == sorted(
        [
            [str(launchers.terminal), "-e", *ctl_argv, "console", "panicked"],
            [str(launchers.terminal), "-e", *ctl_argv, "gdb", "panicked"],
            [str(launchers.directory / "xdg-open"), f"{PAGE}#/vm/panicked"],
        ]
    )
    assert len(server.received) == 1
    # A second agent of the session (the unit and the autostart file) leaves.
    second = kdlabctl(
        bus.address,
        "notify",
        user=desktop.user,
        env={"DBUS_SESSION_BUS_ADDRESS": server.address},
    )
    assert second.returncode == 0
    assert "already running in this session" in second.stderr


def test_without_a_session_bus_or_a_notification_server_it_says_so(
    bus: PrivateBus, workdir: Path, kdlab_member: Identity
) -> None:
    alone = kdlabctl(bus.address, "notify", user=kdlab_member)
    assert alone.returncode == 69
    assert "no session bus: DBUS_SESSION_BUS_ADDRESS is not set" in alone.stderr
    session = session_bus(workdir / "empty-session")
    try:
        env = {"DBUS_SESSION_BUS_ADDRESS": session.address}
        silent = kdlabctl(bus.address, "notify", user=kdlab_member, env=env)
    finally:
        session.stop()
    assert silent.returncode == 69
    assert "no notification server on the session bus" in silent.stderr
    assert "kdlabd running" not in silent.stderr
