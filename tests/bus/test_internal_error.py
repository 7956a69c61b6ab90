"""An unexpected exception in kdlabd: Error.Internal with an incident id, no traceback.

kdlabd runs with a planted bug (``KDLAB_TEST_FAULT_AT``, see
kdlabd.core.journal): the call gets ``org.kdlab.Kdlab1.Error.Internal`` whose
message names an incident id and holds no Python traceback, kdlabctl exits 1
with that message, and kdlabd's log holds the same id with the traceback.
kdlabd itself keeps serving.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kdlab.errors import Internal
from kdlab.wire import MANAGER_PATH
from kdlabd.core.journal import FAULT_ENV
from tests.bus.contract import MANAGER
from tests.support.bus import BusClient, PrivateBus
from tests.support.clients import assert_no_traceback, kdlabctl
from tests.support.testdriver import Lab
from tests.support.timeouts import STARTUP_TIMEOUT

pytestmark = pytest.mark.bus

INCIDENT = re.compile(r"\(incident ([0-9a-f]{12})\)")


@pytest.fixture
def faulty(bus: PrivateBus, workdir: Path) -> Iterator[Lab]:
    """kdlabd whose GetVM hits an unexpected exception."""
    lab = Lab(bus, workdir)
    lab.populate()
    lab.daemon.start(timeout=STARTUP_TIMEOUT, env={FAULT_ENV: "call.GetVM"})
    yield lab
    # Not stop_cleanly: the traceback in the log is what this module wants.
    assert lab.daemon.stop() == 0, lab.daemon.log()


def logged_incidents(lab: Lab) -> dict[str, dict[str, Any]]:
    """kdlabd's dbus.internal_error log entries, by incident id."""
    entries = [
        json.loads(line[line.index("{") :])
        for line in lab.daemon.log().splitlines()
        if "dbus.internal_error" in line
    ]
    return {entry["incident"]: entry for entry in entries}


def test_the_caller_gets_an_incident_id_and_the_log_the_traceback(
    faulty: Lab, client: BusClient
) -> None:
    name, message = client.error(MANAGER_PATH, MANAGER, "GetVM", "s", ["idle"])
    assert name == Internal.dbus_name()
    assert_no_traceback(message)
    assert "InjectedFault" not in message, "nothing of the exception on the wire"
    match = INCIDENT.search(message)
    assert match, message
    entry = logged_incidents(faulty)[match[1]]
    assert entry["method"] == f"{MANAGER}.GetVM"
    assert (entry["path"], entry["uid"]) == (MANAGER_PATH, 0)
    assert entry["level"] == "error"
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "InjectedFault: fault injected at call.GetVM" in entry["exception"]


def test_kdlabctl_shows_the_incident_and_exits_1(faulty: Lab) -> None:
    result = kdlabctl(faulty.daemon.address, "show", "idle")
    assert result.returncode == Internal.exit_code == 1
    match = INCIDENT.search(result.stderr)
    assert match, result.stderr
    assert match[1] in logged_incidents(faulty)


def test_each_incident_has_its_own_id_and_kdlabd_keeps_serving(
    faulty: Lab, client: BusClient
) -> None:
    messages = [
        client.error(MANAGER_PATH, MANAGER, "GetVM", "s", ["idle"])[1] for _ in range(2)
    ]
    ids = [m[1] for m in map(INCIDENT.search, messages) if m]
    assert len(set(ids)) == 2, messages
    assert set(ids) <= set(logged_incidents(faulty))
    (paths,) = client.ok(MANAGER_PATH, MANAGER, "ListVMs")
    assert f"{MANAGER_PATH}/vm/idle" in paths
