"""Every log line kdlabd writes while serving a call names the caller and the method."""

from __future__ import annotations

import re

import pytest

from kdlab.wire import VM_INTERFACE
from tests.bus import test_policy
from tests.bus.conftest import Ctl
from tests.support.bus import BusClient
from tests.support.clients import Identity
from tests.support.testdriver import Lab

pytestmark = pytest.mark.bus

kdlab_member = test_policy.kdlab_member  # a fixture: nobody, in group kdlab
UNIQUE_NAME = re.compile(r"^:\d+\.\d+$")


def test_lines_of_a_call_name_the_caller_and_the_method(
    kdlabd: Lab, client: BusClient, ctl: Ctl, kdlab_member: Identity
) -> None:
    before = len(kdlabd.daemon.events())
    result = ctl("start", "booted", user=kdlab_member)
    assert result.returncode == 0, result.stderr
    events = kdlabd.daemon.events()
    (started,) = [e for e in events[before:] if e["event"] == "vm.started"]
    assert started["vm"] == "booted"
    assert started["uid"] == kdlab_member.uid
    assert started["method"] == f"{VM_INTERFACE}.Start"
    assert started["path"] == client.vm_path("booted")
    sender = str(started["sender"])
    assert UNIQUE_NAME.match(sender), sender
    assert sender != client.bus.unique_name, "the caller is kdlabctl, not the test"
    # Lines outside any call name none.
    (ready,) = [e for e in events[:before] if e["event"] == "kdlabd.ready"]
    assert not {"sender", "uid", "method", "path"} & set(ready)
