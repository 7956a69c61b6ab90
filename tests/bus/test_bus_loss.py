"""When the bus goes away, kdlabd exits (systemd restarts it) instead of hanging."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.wire import BUS_NAME
from kdlabd.bus.dbus_next_patches import KdlabBus
from tests.support.bus import PrivateBus
from tests.support.testdriver import Lab, defined_fleet

pytestmark = pytest.mark.bus


@pytest.fixture
def own_bus(workdir: Path) -> Iterator[PrivateBus]:
    """A dbus-daemon only this test uses: it gets killed."""
    bus = PrivateBus(workdir / "own-bus").start()
    yield bus
    bus.stop()


def test_kdlabd_exits_when_the_bus_dies(own_bus: PrivateBus, workdir: Path) -> None:
    lab = Lab(own_bus, workdir, defined_fleet(3))
    lab.populate()
    lab.start()
    own_bus.stop()
    try:
        status = lab.daemon.wait(timeout=15)
    except subprocess.TimeoutExpired:
        lab.daemon.kill()
        pytest.fail(f"kdlabd kept running without its bus:\n{lab.daemon.log()}")
    log = lab.daemon.log()
    assert status == 1, log
    assert "lost the D-Bus connection" in log
    assert "Traceback" not in log


def test_a_call_on_a_lost_connection_fails_at_once(own_bus: PrivateBus) -> None:
    # kdlabd's start-up asks for its name after exporting its objects; if the
    # bus died in between, dbus-next 0.2.3 would wait for the reply for ever.
    async def scenario() -> None:
        bus = await KdlabBus(bus_address=own_bus.address).connect()
        own_bus.stop()
        with pytest.raises(EOFError):  # how dbus-next reports the bus hanging up
            await asyncio.wait_for(bus.wait_for_disconnect(), 10)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(bus.request_name(BUS_NAME), 10)

    asyncio.run(scenario())
