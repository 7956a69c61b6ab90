"""Disk images and jobs: kdlabctl image, the Image objects and a job's end.

The test driver keeps volumes in memory: creating and deleting images works;
uploading and resizing do not, so an import runs as a job that fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.errors import HypervisorError
from kdlab.wire import BUS_NAME, JOB_INTERFACE, MANAGER_PATH
from tests.bus.conftest import Ctl
from tests.support.bus import PROPERTIES, BusClient

pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]

MIB = 1 << 20


def images(ctl: Ctl) -> dict[str, dict[str, object]]:
    result = ctl("image", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {image["name"]: image for image in json.loads(result.stdout)}


def test_create_and_delete(ctl: Ctl) -> None:
    assert images(ctl) == {}
    assert ctl("image", "create", "base", "--size", "64M").returncode == 0
    base = images(ctl)["base"]
    assert (base["format"], base["capacity"], base["used_by"]) == ("raw", 64 * MIB, [])
    # The test driver cannot resize volumes either: libvirt's refusal is passed on.
    result = ctl("image", "resize", "base", "--size", "128M")
    assert result.returncode == HypervisorError.exit_code, result.stderr
    assert images(ctl)["base"] == base
    assert ctl("image", "delete", "base").returncode == 0
    assert images(ctl) == {}


def test_failed_import_is_a_failed_job(
    ctl: Ctl, client: BusClient, kernels: dict[str, Path]
) -> None:
    client.add_match(type="signal", sender=BUS_NAME, interface=JOB_INTERFACE)
    result = ctl("image", "import", "imported", str(kernels["text"]))
    # The job's Error names the failure, so the exit code is the table's.
    assert result.returncode == HypervisorError.exit_code
    assert "virStorageVolUpload" in result.stderr  # libvirt's words, passed on

    completed = client.wait_for_signal(lambda msg: msg.member == "Completed")
    success, message = completed.body
    assert not success
    assert "virStorageVolUpload" in message
    (props,) = client.ok(completed.path, PROPERTIES, "GetAll", "s", [JOB_INTERFACE])
    keys = ("Kind", "Target", "State", "Owner", "Error")
    assert {key: props[key].value for key in keys} == {
        "Kind": "import",
        "Target": "imported",
        "State": "failed",
        "Owner": 0,
        "Error": HypervisorError.dbus_name(),
    }
    (jobs,) = client.ok(MANAGER_PATH, "org.kdlab.Kdlab1.Manager", "ListJobs")
    assert jobs == [completed.path]
    assert images(ctl) == {}  # nothing left of the failed import
