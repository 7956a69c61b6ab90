"""A call whose descriptors kdlabd cannot receive (its table is full) is told so.

The kernel drops the SCM_RIGHTS descriptors a full table cannot take and sets
MSG_CTRUNC; dbus-next 0.2.3 ignores that and hands the method None, which
kdlabd used to report as "no file descriptor came with the call". Here a
server built from kdlabd's own bus pieces (KdlabBus, the authorizer, the
error boundary) fills its descriptor table on the private bus and real
calls arrive with descriptors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from kdlab.errors import LimitExceeded
from tests.support import REPO
from tests.support.bus import BusClient, PrivateBus

pytestmark = pytest.mark.bus

PATH = "/org/kdlab/Kdlab1/test"
INTERFACE = "org.kdlab.Kdlab1.Test"
SERVER = textwrap.dedent(
    f"""
    import asyncio, os, sys
    from dbus_next.service import ServiceInterface
    from kdlabd.bus.auth import Action, Authorizer
    from kdlabd.bus.boundary import exported
    from kdlabd.bus.dbus_next_patches import KdlabBus
    from kdlab.wire import BUS_NAME

    class Probe(ServiceInterface):
        def __init__(self, authorizer):
            super().__init__({INTERFACE!r})
            self.authorizer = authorizer

        def resource_owner(self):
            return None

        @exported(Action.INSPECT)
        async def Take(self, caller, fd: "h") -> "s":
            return "none" if fd is None else "a descriptor"

    async def main():
        bus = await KdlabBus(bus_address=sys.argv[1], negotiate_unix_fd=True).connect()
        bus.export({PATH!r}, Probe(await Authorizer.for_bus(bus, 5)))
        await bus.request_name(BUS_NAME)
        filler = []
        try:
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        os.close(filler.pop())  # one slot free
        print("ready", flush=True)
        await bus.wait_for_disconnect()

    asyncio.run(main())
    """
)


@pytest.fixture
def full_server(bus: PrivateBus) -> Iterator[subprocess.Popen[str]]:
    server = subprocess.Popen(
        ["prlimit", "--nofile=64", sys.executable, "-c", SERVER, bus.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert server.stdout is not None
    lines = iter(server.stdout.readline, "")  # log lines, then "ready"
    assert "ready\n" in lines, server.stderr.read() if server.stderr else ""
    yield server
    server.terminate()
    server.wait(timeout=10)


@pytest.mark.usefixtures("full_server")
def test_descriptors_lost_on_the_way_in_are_reported_as_a_limit(
    client: BusClient,
) -> None:
    read, write = os.pipe()
    try:
        # One descriptor fits in the one free slot: the method gets it.
        fits = client.ok(PATH, INTERFACE, "Take", "h", [0], unix_fds=[read])
        assert fits == ["a descriptor"]
        # Two do not: the kernel drops one and kdlabd says why.
        name, message = client.error(
            PATH, INTERFACE, "Take", "h", [0], unix_fds=[read, write]
        )
    finally:
        os.close(read)
        os.close(write)
    assert name == LimitExceeded.dbus_name()
    assert "run out of file descriptors" in message
    assert "LimitNOFILE=" in message
    # The descriptor that did arrive was closed: one fits again.
    again_read, again_write = os.pipe()
    try:
        fits = client.ok(PATH, INTERFACE, "Take", "h", [0], unix_fds=[again_read])
    finally:
        os.close(again_read)
        os.close(again_write)
    assert fits == ["a descriptor"]
