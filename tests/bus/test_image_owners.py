"""Images have owners (issue 10, item 3): shown by kdlabctl and on the bus, and
another user's image is deleted or resized only with manage-others.

Callers run as real other uids (setpriv): "member" is nobody in group kdlab,
"stranger" is Debian's daemon user in group kdlab. Without polkit (as here)
manage-others is root's alone; tests/bus/test_polkit.py asks polkit for it.
The test driver cannot resize volumes: a resize that got past authorization
ends in HypervisorError.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kdlab.errors import HypervisorError, NotAuthorized
from kdlab.wire import IMAGE_INTERFACE, image_path
from tests.bus.conftest import Ctl
from tests.bus.test_limits import kdlab_member, stranger
from tests.support.bus import PROPERTIES, BusClient
from tests.support.clients import Identity

pytestmark = [pytest.mark.bus, pytest.mark.usefixtures("kdlabd")]

__all__ = ["kdlab_member", "stranger"]  # fixtures


def listing(ctl: Ctl) -> dict[str, dict[str, Any]]:
    result = ctl("image", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {image["name"]: image for image in json.loads(result.stdout)}


@pytest.fixture
def owned(ctl: Ctl, kdlab_member: Identity) -> dict[str, int]:
    """Image "roots" made by root, "members" by the member: name -> owner uid."""
    made = {"roots": None, "members": kdlab_member}
    for name, user in made.items():
        result = ctl("image", "create", name, "--size", "16M", user=user)
        assert result.returncode == 0, result.stderr
    return {"roots": 0, "members": kdlab_member.uid}


def test_an_image_shows_its_owner(
    ctl: Ctl, client: BusClient, owned: dict[str, int]
) -> None:
    images = listing(ctl)
    assert {name: image["owner"] for name, image in images.items()} == owned
    for name, uid in owned.items():
        (owner,) = client.ok(
            image_path(name), PROPERTIES, "Get", "ss", [IMAGE_INTERFACE, "Owner"]
        )
        assert owner.value == uid
    table = ctl("image", "list").stdout.splitlines()
    assert table[0].split() == [
        "NAME", "FORMAT", "SIZE", "ALLOCATED", "OWNER", "USED", "BY"
    ]  # fmt: skip
    owners = {line.split()[0]: line.split()[4] for line in table[1:]}
    assert owners == {"members": "nobody", "roots": "root"}


@pytest.mark.parametrize(
    "args", [("delete", "roots"), ("resize", "roots", "--size", "32M")]
)
def test_a_member_may_not_change_anothers_image(
    ctl: Ctl, kdlab_member: Identity, owned: dict[str, int], args: tuple[str, ...]
) -> None:
    assert owned["roots"] != kdlab_member.uid
    before = listing(ctl)
    result = ctl("image", *args, user=kdlab_member)
    assert result.returncode == NotAuthorized.exit_code, result.stderr
    assert "belongs to uid 0" in result.stderr
    assert "org.kdlab.Kdlab1.manage-others" in result.stderr
    assert listing(ctl) == before


@pytest.mark.parametrize(
    "args", [("delete", "members"), ("resize", "members", "--size", "32M")]
)
def test_another_member_may_not_change_a_members_image(
    ctl: Ctl, stranger: Identity, owned: dict[str, int], args: tuple[str, ...]
) -> None:
    before = listing(ctl)
    result = ctl("image", *args, user=stranger)
    assert result.returncode == NotAuthorized.exit_code, result.stderr
    assert f"belongs to uid {owned['members']}" in result.stderr
    assert listing(ctl) == before


@pytest.mark.parametrize("user", ["member", "root"])
def test_the_owner_and_root_may_change_it(
    ctl: Ctl, kdlab_member: Identity, owned: dict[str, int], user: str
) -> None:
    assert owned["members"] == kdlab_member.uid
    who = kdlab_member if user == "member" else None
    resized = ctl("image", "resize", "members", "--size", "32M", user=who)
    assert resized.returncode == HypervisorError.exit_code, resized.stderr
    deleted = ctl("image", "delete", "members", user=who)
    assert deleted.returncode == 0, deleted.stderr
    assert set(listing(ctl)) == {"roots"}
