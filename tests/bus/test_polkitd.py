"""A real polkitd decides, with kdlab's shipped policy and rule, as the README says.

README, "Who may do what": anyone may inspect; members of group ``kdlab`` may
manage and debug their own VMs; only root may touch another user's. Here the
callers are real login users (tests/support/logins.py: ``kdlabt-alice`` and
``kdlabt-bob`` in group kdlab, ``kdlabt-eve`` not) running kdlabctl from their
own homes, kdlabd runs in polkit mode, and the polkitd it asks loaded this
checkout's ``systemd/org.kdlab.Kdlab1.policy`` and ``systemd/50-kdlab.rules``
(tests/support/polkitd.py). Without the shipped rule the members are refused: the
decisions are polkitd's, not kdlabd's built-in policy (which would let them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from kdlab.errors import NotAuthorized
from tests.support.clients import kdlabctl
from tests.support.logins import Logins
from tests.support.polkitd import polkitd_on_a_private_bus
from tests.support.testdriver import FakeVM, Lab

pytestmark = pytest.mark.bus

OK = 0
REFUSED = NotAuthorized.exit_code
ROOT = "root"


def fleet(logins: Logins) -> list[FakeVM]:
    """For root and each user: a VM never started, and one that has booted."""
    owners = {ROOT: 0} | {role: user.uid for role, user in logins.users.items()}
    return [
        FakeVM(f"{role}-{kind}", state, uid, "", "console=ttyS0")
        for role, uid in owners.items()
        for kind, state in (("vm", "defined"), ("booted", "stopped"))
    ]


class PolkitdLab:
    """kdlabd in polkit mode asking a real polkitd; kdlabctl as any caller."""

    def __init__(self, lab: Lab, logins: Logins) -> None:
        self.lab = lab
        self.logins = logins

    def ctl(self, role: str, *args: str) -> CompletedProcess[str]:
        """kdlabctl ARGS as root (from the test's checkout) or as a login user."""
        address = self.lab.daemon.address
        if role == ROOT:
            return kdlabctl(address, *args)
        return self.logins.kdlabctl(self.logins.users[role], address, *args)


@contextlib.contextmanager
def kdlabd_asking_polkitd(
    directory: Path, logins: Logins, *, kdlab_rule: bool = True
) -> Iterator[PolkitdLab]:
    workdir = directory / "lab"  # kdlabd's: every uid must reach the bus socket
    workdir.mkdir(mode=0o755, parents=True)
    with (
        polkitd_on_a_private_bus(directory, kdlab_rule=kdlab_rule) as bus,
        Lab(bus, workdir, fleet(logins)).serving() as lab,
    ):
        assert '"polkit": true' in lab.daemon.log(), "kdlabd chose no polkit"
        yield PolkitdLab(lab, logins)


@pytest.fixture(scope="module")
def shipped(public_dir: Path, logins: Logins) -> Iterator[PolkitdLab]:
    """polkitd with the shipped policy and rule; kdlabd serving root's and each
    user's VMs. The calls below start each VM at most once: one kdlabd serves
    them all."""
    with kdlabd_asking_polkitd(public_dir / "polkitd-shipped", logins) as lab:
        yield lab


# (caller, kdlabctl arguments, exit status): README's "Who may do what".
DECISIONS = [
    # Anyone may inspect, another user's VMs too.
    ("eve", ("list",), OK),
    ("eve", ("show", "alice-vm"), OK),
    ("alice", ("show", "root-vm"), OK),
    # Members of group kdlab may manage and debug their own VMs...
    ("alice", ("start", "alice-vm"), OK),
    ("bob", ("logs", "bob-booted"), OK),
    # ...not other users' VMs, whoever owns them.
    ("alice", ("start", "bob-vm"), REFUSED),
    ("alice", ("logs", "bob-booted"), REFUSED),
    ("bob", ("start", "root-vm"), REFUSED),
    # Others may not manage or debug even their own VMs.
    ("eve", ("start", "eve-vm"), REFUSED),
    ("eve", ("logs", "eve-booted"), REFUSED),
    ("eve", ("start", "alice-booted"), REFUSED),
    # Only root may touch another user's VMs.
    (ROOT, ("start", "eve-vm"), OK),
    (ROOT, ("logs", "alice-booted"), OK),
]


@pytest.mark.parametrize(
    ("caller", "args", "status"),
    DECISIONS,
    ids=[f"{caller}-{'-'.join(args)}" for caller, args, _ in DECISIONS],
)
def test_polkitd_decides_as_the_readme_says(
    shipped: PolkitdLab, caller: str, args: tuple[str, ...], status: int
) -> None:
    result = shipped.ctl(caller, *args)
    assert result.returncode == status, result.stderr
    if status == REFUSED:
        assert "polkit does not allow" in result.stderr or "belongs to uid" in (
            result.stderr
        ), result.stderr
    elif args[0] == "logs":
        assert result.stdout == f"console of {args[1]}\n"


def test_without_the_shipped_rule_members_are_refused(
    public_dir: Path, logins: Logins
) -> None:
    """The same polkitd and policy, minus 50-kdlab.rules: the shipped policy's
    defaults (auth_admin) apply to members too, and nobody can authenticate."""
    directory = public_dir / "polkitd-no-rule"
    with kdlabd_asking_polkitd(directory, logins, kdlab_rule=False) as lab:
        assert lab.ctl("alice", "show", "alice-vm").returncode == OK
        refused = lab.ctl("alice", "start", "alice-vm")
        assert refused.returncode == REFUSED, refused.stderr
        assert "polkit does not allow" in refused.stderr
        assert lab.ctl(ROOT, "start", "alice-vm").returncode == OK
