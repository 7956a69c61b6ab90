"""``kdlabctl modules load``'s commands, on the bus tier's real agent.

``modules load`` runs one command in the guest per module (its copy), then
the script that loads them, one after another on one connection to the bus
(:func:`kdlabctl.execs.run` each time). The bus tier's dbus-daemon has the
system bus's limits, as a real kdlabd's bus does.
"""

from __future__ import annotations

import asyncio

import pytest

from kdlabctl import execs
from kdlabctl.client import Client
from tests.bus.test_exec import VM
from tests.support.bus import PrivateBus

pytestmark = pytest.mark.bus


# The system bus's default max_match_rules_per_connection, and then some.
SYSTEM_BUS_MATCH_RULES = 512
COMMANDS = SYSTEM_BUS_MATCH_RULES + 8


@pytest.mark.usefixtures("guest")
def test_more_commands_on_one_connection_than_the_bus_has_match_rules(
    bus: PrivateBus,
) -> None:
    # Each command's end is heard by a match rule of the connection's: one
    # left behind by each would end the 513th command (a modules load of a
    # tree's modules) with dbus-daemon's LimitsExceeded.
    async def commands() -> list[int]:
        client = await Client.connect(bus.address)
        try:
            true = execs.Command(("true",))
            return [await execs.run(client, VM, true, None) for _ in range(COMMANDS)]
        finally:
            client.disconnect()

    assert asyncio.run(commands()) == [0] * COMMANDS
