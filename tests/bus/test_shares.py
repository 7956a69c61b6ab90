"""Shares on the bus: only a VM's owner serves them, and kdlabctl refuses, as
the real user and before anything is made, a directory the user cannot read.

(A share served into a booted guest is the vm tier's: tests/vm/test_shares.py.)
"""

from __future__ import annotations

import pytest

from kdlab.errors import EXIT_USAGE, InvalidState, NotAuthorized
from tests.bus import contract
from tests.bus.contract import VM
from tests.support.bus import BusClient, PrivateBus
from tests.support.logins import Logins
from tests.support.testdriver import Lab

pytestmark = pytest.mark.bus


@pytest.mark.parametrize("command", ["create", "up"])
def test_a_member_cannot_share_what_they_cannot_read(
    logins: Logins, bus: PrivateBus, kdlabd: Lab, client: BusClient, command: str
) -> None:
    """/root and another member's home: refused by kdlabctl up front (the
    guest would see them with the member's rights anyway: kdlabd never opens
    them, the member's own virtiofsd would serve them)."""
    del kdlabd  # it must run
    before = client.vm_names()
    for directory in ("/root", str(logins.bob.home)):
        args = (
            ("create", "shared", "--kernel", "/boot/none", "--share", directory)
            if command == "create"
            else ("up", str(logins.alice.clone), "--share", f"{directory}:t")
        )
        refused = logins.kdlabctl(logins.alice, bus.address, *args)
        assert refused.returncode == EXIT_USAGE, refused.stderr
        assert refused.stderr == (
            f"kdlabctl: cannot share {directory}: you (uid {logins.alice.uid}) may "
            "not read and enter it, and the guest sees it with your rights\n"
        )
    assert client.vm_names() == before


@pytest.mark.usefixtures("kdlabd")
def test_only_a_vms_owner_serves_its_shares_not_even_root(client: BusClient) -> None:
    # "frozen" is uid 1000's, and has a share.
    error = client.error(client.vm_path("frozen"), VM, "ServeShares", "", [])
    contract.assert_error_reply(error, NotAuthorized, VM, "ServeShares")
    assert "only the owner of VM 'frozen' (uid 1000)" in error[1]


@pytest.mark.usefixtures("kdlabd")
def test_a_vm_without_shares_has_none_to_serve(client: BusClient) -> None:
    # "linux-6.9-rc1" is root's, without shares.
    error = client.error(client.vm_path("linux-6.9-rc1"), VM, "ServeShares", "", [])
    contract.assert_error_reply(error, InvalidState, VM, "ServeShares")
    assert "has no shares" in error[1]
