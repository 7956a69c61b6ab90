"""``kdlabctl gdb`` runs no code another user chose (issue 10, item 2).

Real gdb, run by real login users (tests/support/logins.py) and by root. A VM of
alice records a vmlinux in a directory of hers holding a ``vmlinux-gdb.py``
that leaves a mark for the uid that ran it. gdb reaches each VM's stand-in
gdbstub (:class:`RemoteStub`, enough of gdb's remote protocol for gdb to
attach and detach) only through the descriptor kdlabd hands out.

- root, bob (a member) and eve (not one) run ``kdlabctl gdb`` on alice's VM:
  nobody runs alice's script; bob and eve are refused before gdb starts.
- alice runs gdb on her own VM: her helpers load (the feature still works),
  but not from a directory group ``kdlab`` may write.
- root's gdb, started in a directory alice controls, imports none of it.

Figure: "gdb auto-loads from a path another user controls: 0".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdlab.errors import NotAuthorized, exit_code_for
from tests.bus.gdbstub import RemoteStub
from tests.support import figures
from tests.support.bus import PrivateBus
from tests.support.clients import assert_no_traceback, run_tool
from tests.support.logins import GROUP, Logins, LoginUser
from tests.support.prereq import require, require_tool
from tests.support.testdriver import FakeVM, Lab

pytestmark = pytest.mark.bus

EXIT_NOT_AUTHORIZED = exit_code_for(NotAuthorized.dbus_name())
INFO_SCRIPTS = ("--batch", "-ex", "info auto-load python-scripts")
RELEASE = "6.1.0-kdlabt-none"  # no such debug vmlinux on the host

# The helpers: a mark per uid that ran them, and a line in gdb's output.
SCRIPT = """\
import os
open(os.path.join({markers!r}, "{mark}-%d" % os.getuid()), "w").close()
print("helpers of {owner} loaded")
"""
HELPERS_RAN = "helpers-ran-as"
PLANTED_RAN = "planted-ran-as"


# --- the files of alice (and root) -------------------------------------------------


@dataclass(frozen=True)
class Files:
    """Directories of vmlinux + vmlinux-gdb.py, and where the scripts leave marks."""

    top: Path
    markers: Path

    def vmlinux(self, name: str) -> Path:
        return self.top / name / "vmlinux"

    def ran_as(self, mark: str = HELPERS_RAN) -> set[int]:
        """The uids that ran a script that leaves *mark*."""
        return {
            int(p.name.removeprefix(f"{mark}-")) for p in self.markers.glob(f"{mark}-*")
        }

    def clear(self) -> None:
        for mark in self.markers.iterdir():
            mark.unlink()


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for entry in (path, *path.rglob("*")):
        os.lchown(entry, uid, gid)


def helpers_dir(files: Files, name: str, owner: str) -> Path:
    """``top/NAME``: an ELF as vmlinux and a marking vmlinux-gdb.py (mode 0755/0644)."""
    directory = files.top / name
    directory.mkdir(mode=0o755)
    shutil.copy(shutil.which("true") or "/bin/true", directory / "vmlinux")
    script = directory / "vmlinux-gdb.py"
    script.write_text(
        SCRIPT.format(markers=str(files.markers), mark=HELPERS_RAN, owner=owner)
    )
    script.chmod(0o644)
    (directory / "vmlinux").chmod(0o755)
    return directory


def planted_package(directory: Path, markers: Path) -> None:
    """A ``kdlabctl`` package in *directory* that marks whoever imports it."""
    package = directory / "kdlabctl"
    package.mkdir(mode=0o755)
    (package / "__init__.py").write_text(
        SCRIPT.format(markers=str(markers), mark=PLANTED_RAN, owner="kdlabctl's")
    )
    (package / "__main__.py").write_text("")


@pytest.fixture(scope="module")
def files(logins: Logins) -> Iterator[Files]:
    """Under a root-owned 0755 directory in /tmp (root's sticky /tmp above):

    - ``alice/``: alice's, 0755: her vmlinux and helpers;
    - ``shared/``: alice's, group kdlab may write it (0775);
    - ``root/``: root's own VM's vmlinux and helpers;
    - ``planted/``: alice's, holding a ``kdlabctl`` package of hers;
    - ``markers/``: 1777, where any script run leaves ``ran-as-UID``.
    """
    require_tool("gdb", "gdb")
    alice = logins.alice
    top = Path(tempfile.mkdtemp(prefix="kdlabt-gdb-", dir="/tmp"))
    top.chmod(0o755)
    markers = top / "markers"
    markers.mkdir()
    markers.chmod(0o1777)
    files = Files(top, markers)
    helpers_dir(files, "root", "root")
    chown_tree(helpers_dir(files, "alice", "alice"), alice.uid, alice.gid)
    shared = helpers_dir(files, "shared", "alice (shared)")
    chown_tree(shared, alice.uid, alice.gid)
    os.chown(shared, alice.uid, _gid(GROUP))
    shared.chmod(0o775)
    planted = top / "planted"
    planted.mkdir(mode=0o755)
    planted_package(planted, markers)
    chown_tree(planted, alice.uid, alice.gid)
    yield files
    shutil.rmtree(top, ignore_errors=True)


def _gid(group: str) -> int:
    import grp

    return grp.getgrnam(group).gr_gid


def kdlabctl_program() -> str:
    """The installed ``kdlabctl`` next to the tests' Python, as root runs it.

    Not ``python -m kdlabctl``: that imports from the current directory.
    """
    program = Path(sys.executable).with_name("kdlabctl")
    require(program.is_file(), f"{program} (pip install -e .)")
    return str(program)


@dataclass
class GdbLab:
    """kdlabd serving alice's and root's running VMs, each with a stub."""

    bus: PrivateBus
    logins: Logins
    files: Files
    stubs: dict[str, RemoteStub]

    def gdb(
        self, user: LoginUser | None, *args: str, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``kdlabctl gdb ARGS`` as *user* through a login, or as root (None)."""
        if user is None:
            argv = [kdlabctl_program(), "--bus", self.bus.address, "gdb", *args]
            result = run_tool(argv, cwd=cwd)
        else:
            assert cwd is None, "a login starts in the user's clone"
            result = self.logins.kdlabctl(user, self.bus.address, "gdb", *args)
        assert_no_traceback(result.stdout + result.stderr)
        return result


@pytest.fixture
def gdb_lab(
    bus: PrivateBus, workdir: Path, logins: Logins, files: Files
) -> Iterator[GdbLab]:
    alice = logins.alice.uid
    vms = [
        FakeVM("alice-vm", "running", alice, "", "console=ttyS0 nokaslr",
               release=RELEASE, vmlinux=str(files.vmlinux("alice")),
               kernel_path=str(files.top / "alice" / "bzImage")),
        FakeVM("shared-vm", "running", alice, "", "console=ttyS0 nokaslr",
               vmlinux=str(files.vmlinux("shared"))),
        FakeVM("root-vm", "running", 0, "", "console=ttyS0 nokaslr",
               vmlinux=str(files.vmlinux("root"))),
    ]  # fmt: skip
    files.clear()
    with Lab(bus, workdir, vms).serving() as lab:
        stubs = {vm.name: RemoteStub(lab.layout.gdb_socket(vm.name)) for vm in vms}
        try:
            yield GdbLab(bus, logins, files, stubs)
        finally:
            for stub in stubs.values():
                stub.close()


# --- the tests ---------------------------------------------------------------------


def test_nobody_runs_the_helpers_of_alices_vm(gdb_lab: GdbLab) -> None:
    """root, bob and eve on alice's VM: her vmlinux-gdb.py never runs."""
    logins, files = gdb_lab.logins, gdb_lab.files
    alices = ("--vmlinux", str(files.vmlinux("alice")))
    callers = {"root": None, "bob": logins.bob, "eve": logins.eve}
    runs = {}
    ran = {}
    for who, user in callers.items():
        for extra in ((), alices):
            key = " ".join((who, *extra[:1]))
            runs[key] = gdb_lab.gdb(user, "alice-vm", *extra, *INFO_SCRIPTS)
            ran[key] = files.ran_as()
            files.clear()
    outputs = {key: (r.returncode, r.stdout, r.stderr) for key, r in runs.items()}
    figure = figures.record(
        "gdb auto-loads from a path another user controls",
        sum(1 for uids in ran.values() if uids),
        "== 0",
        detail=f"{len(runs)} kdlabctl gdb runs by root, a member and a non-member "
        "on another user's VM",
    )
    assert figure.met, (ran, outputs)

    # root: alice's recorded paths are not even looked at...
    assert runs["root"].returncode == 2, outputs["root"]
    assert "used by its owner" in runs["root"].stderr
    # ...and with --vmlinux, gdb reads her symbols without her helpers.
    explicit = runs["root --vmlinux"]
    assert explicit.returncode == 0, outputs["root --vmlinux"]
    script = files.top / "alice" / "vmlinux-gdb.py"
    assert f"{script} belongs to uid {logins.alice.uid}" in explicit.stderr
    assert "helpers of alice loaded" not in explicit.stdout
    # (root's first OpenGdb was given up when no vmlinux was found.)
    assert gdb_lab.stubs["alice-vm"].attached == [False, True], "root's gdb attached"

    # bob and eve: refused before gdb starts (gdb would have printed the scripts).
    for key, result in runs.items():
        if key.startswith("root"):
            continue
        assert result.returncode == EXIT_NOT_AUTHORIZED, outputs[key]
        assert result.stdout == "", f"gdb ran for {key}: {outputs[key]}"
        assert result.stderr.startswith("kdlabctl: "), outputs[key]
    assert len(gdb_lab.stubs["alice-vm"].sessions) == 2, "only root connected"


def test_alice_gets_her_own_helpers(gdb_lab: GdbLab) -> None:
    alice = gdb_lab.logins.alice
    result = gdb_lab.gdb(alice, "alice-vm", *INFO_SCRIPTS)
    assert result.returncode == 0, result.stderr
    assert "helpers of alice loaded" in result.stdout
    script = gdb_lab.files.top / "alice" / "vmlinux-gdb.py"
    assert any(
        line.split() == ["Yes", str(script)] for line in result.stdout.splitlines()
    ), result.stdout
    assert gdb_lab.files.ran_as() == {alice.uid}
    assert gdb_lab.stubs["alice-vm"].attached == [True]


def test_helpers_in_a_directory_group_kdlab_may_write_are_not_loaded(
    gdb_lab: GdbLab,
) -> None:
    """Even on her own VM: bob (in group kdlab) could have written them."""
    alice = gdb_lab.logins.alice
    result = gdb_lab.gdb(alice, "shared-vm", *INFO_SCRIPTS)
    assert result.returncode == 0, result.stderr
    shared = gdb_lab.files.top / "shared"
    (line,) = [x for x in result.stderr.splitlines() if "lx-* helpers" in x]
    assert f"{shared} is writable by group {_gid(GROUP)}" in line
    assert f"source {shared / 'vmlinux-gdb.py'}" in line, "how to load them by hand"
    assert "helpers of" not in result.stdout
    assert gdb_lab.files.ran_as() == set()
    assert gdb_lab.stubs["shared-vm"].attached == [True], "gdb still debugs the VM"


def test_roots_gdb_imports_nothing_from_its_current_directory(
    gdb_lab: GdbLab,
) -> None:
    """gdb runs a relay (formerly ``python -m kdlabctl``) from root's current
    directory: a ``kdlabctl`` package alice left there must not be imported."""
    result = gdb_lab.gdb(
        None, "root-vm", *INFO_SCRIPTS, cwd=gdb_lab.files.top / "planted"
    )
    assert result.returncode == 0, result.stderr
    assert "helpers of root loaded" in result.stdout, "root's own helpers load"
    assert gdb_lab.files.ran_as(PLANTED_RAN) == set()
    assert gdb_lab.files.ran_as() == {0}
    assert gdb_lab.stubs["root-vm"].attached == [True]
