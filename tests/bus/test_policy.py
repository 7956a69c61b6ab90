"""Who may do what: the shipped bus policy, then kdlabd's own authorization.

The bus policy (systemd/org.kdlab.Kdlab1.conf) must let only root own the
name and let anyone send to it; kdlabd then decides per call. Without polkit
(as here): anyone may inspect; root and members of group kdlab may manage
their own VMs; only root may manage other users' VMs.
"""

from __future__ import annotations

import grp
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lxml import etree

from kdlab.errors import HypervisorError, NotAuthorized
from kdlab.wire import BUS_NAME, MANAGER_PATH
from tests.bus import contract
from tests.bus.conftest import Ctl, Target
from tests.bus.contract import MANAGER
from tests.support.bus import (
    DBUS_NAME,
    DBUS_PATH,
    SHIPPED_POLICY,
    BusClient,
    PrivateBus,
)
from tests.support.clients import NOBODY, Identity, gdbus_call, gdbus_error, run_tool
from tests.support.prereq import require
from tests.support.testdriver import VMS, Lab

pytestmark = pytest.mark.bus

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
DO_NOT_QUEUE = "4"


def request_name(bus: PrivateBus, user: Identity | None) -> tuple[int, str]:
    """RequestName(org.kdlab.Kdlab1) with gdbus as *user*: (exit status, output)."""
    result = run_tool(
        ["gdbus", "call", "--address", bus.address, "--dest", DBUS_NAME,
         "--object-path", DBUS_PATH, "--method", f"{DBUS_NAME}.RequestName",
         BUS_NAME, DO_NOT_QUEUE],
        user=user,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_only_root_may_own_the_name(bus: PrivateBus) -> None:
    status, output = request_name(bus, NOBODY)
    assert status != 0
    assert ACCESS_DENIED in output
    assert request_name(bus, None) == (0, "(uint32 1,)\n")  # primary owner


@contextmanager
def private_bus(directory: Path, policy: Path | None) -> Iterator[PrivateBus]:
    bus = PrivateBus(directory, policy).start()
    try:
        yield bus
    finally:
        bus.stop()


def test_without_the_shipped_policy_root_may_not_own_it(workdir: Path) -> None:
    with private_bus(workdir / "bus", None) as bare:
        status, output = request_name(bare, None)
    assert status != 0
    assert ACCESS_DENIED in output


def test_without_its_send_rule_the_bus_refuses_callers(workdir: Path) -> None:
    """A broken copy of the policy proves that its send rule is what lets callers in."""
    policy = etree.parse(str(SHIPPED_POLICY))
    for rule in policy.iterfind(".//allow[@send_destination]"):
        rule.getparent().remove(rule)
    broken = workdir / "no-send-rule.conf"
    policy.write(str(broken))
    with private_bus(workdir / "bus", broken) as bus:
        lab = Lab(bus, workdir)
        lab.populate()
        lab.start()  # root may still own the name
        try:
            result = gdbus_call(
                bus.address, MANAGER_PATH, f"{MANAGER}.ListVMs", user=NOBODY
            )
        finally:
            lab.stop_cleanly()
    assert gdbus_error(result)[0] == ACCESS_DENIED


# --- inspecting: anyone ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("list",), ("list", "--json"), ("show", "busy"), ("show", "idle", "--json")],
)
@pytest.mark.usefixtures("kdlabd")
def test_anyone_may_inspect(ctl: Ctl, args: tuple[str, ...]) -> None:
    # The bus policy lets the call through; kdlabd answers as it does for root,
    # but for the console's words in a diagnosis (root may read the log).
    as_nobody = ctl(*args, user=NOBODY)
    assert as_nobody.returncode == 0, as_nobody.stderr

    def public(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("Problem:")]

    assert public(as_nobody.stdout) == public(ctl(*args).stdout)


# --- managing: root, and the kdlab group for their own VMs ----------------------

# (kdlabctl arguments, root's exit status): every call that needs more than inspect.
MANAGING = [
    (("start", "idle"), 0),
    (("stop", "--force", "busy"), 0),
    (("delete", "idle"), 0),
    (("logs", "booted"), 0),
    # Authorized, then refused only because the test driver cannot upload volumes.
    (("create", "new", "--kernel", "{bzImage}"), HypervisorError.exit_code),
]


def argv(args: tuple[str, ...], kernels: dict[str, Path]) -> list[str]:
    return [arg.format(bzImage=kernels["bzImage"]) for arg in args]


@pytest.mark.parametrize(("args", "_root_exit"), MANAGING)
@pytest.mark.usefixtures("kdlabd")
def test_unprivileged_caller_may_not_manage(
    ctl: Ctl,
    client: BusClient,
    kernels: dict[str, Path],
    args: tuple[str, ...],
    _root_exit: int,
) -> None:
    before = client.managed_objects()
    result = ctl(*argv(args, kernels), user=NOBODY)
    assert result.returncode == NotAuthorized.exit_code, result.stderr
    assert "kdlab" in result.stderr  # says which group grants it
    assert client.managed_objects() == before


@pytest.mark.parametrize(("args", "root_exit"), MANAGING)
@pytest.mark.usefixtures("kdlabd")
def test_root_may_manage(
    ctl: Ctl, kernels: dict[str, Path], args: tuple[str, ...], root_exit: int
) -> None:
    result = ctl(*argv(args, kernels))
    assert result.returncode == root_exit, result.stderr


@pytest.mark.parametrize(
    ("on", "method", "args"),
    [
        # Refused before the arguments are even read.
        ("manager", "CreateVM", ("new", "{}")),
        ("manager", "CreateImage", ("new", "1048576", "{}")),
        ("manager", "BuildImage", ("new", "{}")),
        ("idle", "Start", ("{}",)),
        ("busy", "Stop", ("{'force': <true>}",)),
        ("idle", "Delete", ()),
        ("booted", "OpenConsoleLog", ()),
        ("busy", "OpenGdb", ()),
        ("busy", "OpenConsole", ()),
        ("image", "Delete", ()),
        ("image", "Resize", ("134217728", "{}")),
        ("job", "Cancel", ()),
    ],
)
def test_refusal_is_a_not_authorized_error(
    bus: PrivateBus, target: Target, on: str, method: str, args: tuple[str, ...]
) -> None:
    interface, path = target(on)
    result = gdbus_call(bus.address, path, f"{interface}.{method}", *args, user=NOBODY)
    contract.assert_error_reply(gdbus_error(result), NotAuthorized, interface, method)


@pytest.fixture
def kdlab_member() -> Identity:
    """nobody, with group kdlab as a supplementary group."""
    try:
        gid = grp.getgrnam("kdlab").gr_gid
    except KeyError:
        gid = None
    require(gid is not None, "group kdlab (.ci/setup creates it with systemd-sysusers)")
    assert gid is not None
    return Identity(NOBODY.uid, NOBODY.gid, (gid,))


@pytest.mark.usefixtures("kdlabd")
def test_kdlab_member_manages_own_vms(ctl: Ctl, kdlab_member: Identity) -> None:
    assert VMS["booted"].owner == kdlab_member.uid
    # logs first: a start moves the log aside, and the test driver writes no new one.
    for args in (
        ("logs", "booted"),
        ("start", "booted"),
        ("stop", "--force", "booted"),
    ):
        result = ctl(*args, user=kdlab_member)
        assert result.returncode == 0, f"{args}: {result.stderr}"


@pytest.mark.parametrize(
    "args",
    [
        ("start", "idle"),
        ("stop", "--force", "busy"),
        ("delete", "linux-6.9-rc1"),
        ("logs", "busy"),
    ],
)
@pytest.mark.usefixtures("kdlabd")
def test_kdlab_member_may_not_manage_others_vms(
    ctl: Ctl, client: BusClient, kdlab_member: Identity, args: tuple[str, ...]
) -> None:
    before = client.managed_objects()
    result = ctl(*args, user=kdlab_member)
    assert result.returncode == NotAuthorized.exit_code, result.stderr
    assert client.managed_objects() == before


@pytest.mark.usefixtures("kdlabd")
def test_kdlab_member_may_create(
    ctl: Ctl, kdlab_member: Identity, kernels: dict[str, Path]
) -> None:
    result = ctl(
        "create", "new", "--kernel", str(kernels["bzImage"]), user=kdlab_member
    )
    assert result.returncode == HypervisorError.exit_code, (
        result.stderr
    )  # past authorization
