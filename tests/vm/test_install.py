"""kdlab as .ci/setup installs it, used by a member of group kdlab through a real login.

The clone lies in a directory of root's that no one else may enter (a clone
in a 0700 home), and root's environment is the test's own (its first
``python3`` may be a build under /root, as here). The clone's own
``.ci/install`` installs it, as .ci/setup does into /opt/kdlab and /usr/local,
but into a scratch prefix. Then ``kdlabt-alice`` (group kdlab) logs in with
``runuser -l`` and uses what was installed: ``kdlabctl list``, ``create`` of
a VM from Debian's kernel, ``delete``, the man pages, the bash completion;
and again once the clone is gone.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.logins import Logins, LoginUser, copy_checkout_to
from tests.vm.conftest import Lab

pytestmark = pytest.mark.vm

INSTALL_TIMEOUT = 600  # a venv, a wheel, pip (structlog from the index)


@dataclass(frozen=True)
class Installed:
    """kdlab installed from a clone only root can read."""

    clone: Path
    prefix: Path
    bindir: Path
    mandir: Path
    datadir: Path  # what XDG_DATA_DIRS names: bash-completion/completions in it

    @property
    def cockpit_page(self) -> Path:
        """Where Cockpit finds the page (XDG_DATA_DIRS/cockpit/kdlab)."""
        return self.datadir / "cockpit" / "kdlab"

    def install(self, clone: Path) -> None:
        """Run *clone*'s .ci/install into this installation, as .ci/setup does."""
        result = subprocess.run(
            [str(clone / ".ci" / "install"),
             "--prefix", str(self.prefix), "--bindir", str(self.bindir),
             "--mandir", str(self.mandir),
             "--completiondir", str(self.datadir / "bash-completion/completions"),
             "--cockpitdir", str(self.cockpit_page),
             "--userunitdir", str(self.datadir / "systemd/user"),
             "--autostartdir", str(self.datadir / "xdg/autostart")],
            cwd=clone, env=os.environ, capture_output=True, text=True,
            timeout=INSTALL_TIMEOUT, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f".ci/install failed:\n{result.stderr}"


def hidden_clone(root: Path, name: str) -> Path:
    """A copy of this checkout in a new 0700 directory (as a 0700 home) of root's."""
    home = root / name
    home.mkdir(mode=0o700)
    copy_checkout_to(home / "kdlab")
    return home / "kdlab"


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    root = Path(tempfile.mkdtemp(prefix="kdlab-install-", dir="/var/tmp"))
    try:
        root.chmod(0o755)  # the installation is for everyone
        clone = hidden_clone(root, "home")
        done = Installed(
            clone, root / "opt" / "kdlab", root / "bin", root / "man", root / "share"
        )
        done.install(clone)
        yield done
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_member(
    logins: Logins, user: LoginUser, where: Installed, bus: str, command: str
) -> subprocess.CompletedProcess[str]:
    """*command* in a login shell of *user*, with the installation's bin, man
    and data directories on its paths, as /usr/local's are after .ci/setup."""
    environment = (
        f"export PATH={shlex.quote(str(where.bindir))}:$PATH "
        f"MANPATH={shlex.quote(str(where.mandir))} KDLAB_BUS={shlex.quote(bus)} "
        f"XDG_DATA_DIRS={shlex.quote(str(where.datadir))}"
    )
    result = logins.run(user, f"{environment} && cd && {command}", timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def own_copy(user: LoginUser, source: Path) -> Path:
    """A copy of *source* in *user*'s home, the user's own (a person's kernel)."""
    target = user.home / source.name
    shutil.copyfile(source, target)
    os.chown(target, user.uid, user.gid)
    return target


def test_member_uses_installed_kdlabctl_from_a_clone_they_cannot_read(
    lab: Lab, logins: Logins, installed: Installed, vm_name: str
) -> None:
    alice, bus = logins.alice, lab.daemon.address

    def run(command: str) -> subprocess.CompletedProcess[str]:
        return as_member(logins, alice, installed, bus, command)

    unreadable = run(f"ls {shlex.quote(str(installed.clone))}")
    assert unreadable.returncode != 0, "the member can read the clone"
    program = installed.bindir / "kdlabctl"
    runs = run(f"{program} --help")
    assert runs.returncode == 0, f"{program} does not run for a member: {runs.stderr}"
    found = run("command -v kdlabctl")
    assert found.stdout.strip() == str(program), found.stderr

    listing = run("kdlabctl list")
    assert listing.returncode == 0, listing.stderr
    kernel = own_copy(alice, lab.kernel.vmlinuz)
    initrd = own_copy(alice, lab.initramfs)
    created = run(
        f"kdlabctl create {vm_name} --kernel {kernel} --initrd {initrd} --memory 256"
    )
    assert created.returncode == 0, created.stderr
    listing = run("kdlabctl list")
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if vm_name in line)
    assert row[0] == vm_name
    assert row[-1] == alice.name, listing.stdout
    deleted = run(f"kdlabctl delete {vm_name}")
    assert deleted.returncode == 0, deleted.stderr
    assert vm_name not in run("kdlabctl list").stdout

    # Installed, not linked into the clone: it works with the clone gone.
    shutil.rmtree(installed.clone)
    listing = run("kdlabctl list")
    assert listing.returncode == 0, listing.stderr


def test_member_finds_the_man_pages(
    logins: Logins, installed: Installed, lab: Lab
) -> None:
    for section, name, expected in (
        ("1", "kdlabctl", "kdlabctl image build"),
        ("8", "kdlabd", "max_vms_per_user"),
        ("7", "kdlab-dbus", "org.kdlab.Kdlab1.Manager"),
    ):
        where = as_member(
            logins, logins.bob, installed, lab.daemon.address, f"man -w {name}"
        )
        page = installed.mandir / f"man{section}" / f"{name}.{section}"
        assert where.stdout.strip() == str(page), where.stderr
        shown = as_member(
            logins, logins.bob, installed, lab.daemon.address,
            f"MANPAGER=cat MANWIDTH=100 man {section} {name}",
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert expected in shown.stdout


def test_member_bash_loads_the_installed_completion(
    lab: Lab, logins: Logins, installed: Installed, vm_name: str
) -> None:
    """bash-completion finds the script where .ci/install put it, on first
    use, and it completes a command and a VM name kdlabd has."""
    created = lab.ctl(
        "create", vm_name, "--kernel", str(lab.kernel.vmlinuz), "--memory", "256"
    )
    assert created.returncode == 0, created.stderr
    loaded = "source /usr/share/bash-completion/bash_completion && " + (
        "__load_completion kdlabctl && complete -p kdlabctl"
    )
    for words, expected in ((["at"], "attach"), (["start", ""], vm_name)):
        line = shlex.join(["kdlabctl", *words])
        completing = (
            f"COMP_WORDS=({line}); COMP_CWORD={len(words)}; "
            f"_kdlabctl kdlabctl {shlex.quote(words[-1])} x; "
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = as_member(
            logins, logins.bob, installed, lab.daemon.address,
            f"{loaded} && {completing}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        first, *offered = done.stdout.splitlines()
        assert first == "complete -F _kdlabctl kdlabctl"
        assert expected in offered, done.stdout


def test_install_again_updates_code_and_manual(installed: Installed) -> None:
    """A clone with changed code, same version number: installing it again
    replaces the installed code and regenerates the man pages."""
    clone = hidden_clone(installed.prefix.parent.parent, "home2")
    source = clone / "kdlabctl" / "manpage.py"
    text = source.read_text()
    assert 'SUMMARY = "' in text
    source.write_text(text.replace('SUMMARY = "', 'SUMMARY = "updated: ', 1))
    installed.install(clone)
    page = (installed.mandir / "man1" / "kdlabctl.1").read_text()
    assert "kdlabctl \\- updated: " in page
    summary = subprocess.run(
        [str(installed.prefix / "bin" / "python"), "-c",
         "from kdlabctl.manpage import SUMMARY; print(SUMMARY)"],
        cwd="/", capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert summary.startswith("updated: ")


def test_install_puts_the_cockpit_page_in_place(installed: Installed) -> None:
    """The page is the wheel's package data, byte for byte, with xterm.js from
    npm ci; Cockpit's menu gets "Kernel lab"; no node_modules is left in a
    clone installed from. (The first clone may be gone by now: an earlier test
    removes it; the checkout's own page is the same bytes.)"""
    sources = REPO / "kdlabctl" / "cockpit"
    for name in ("manifest.json", "index.html", "kdlab.js", "kdlab.css"):
        assert (installed.cockpit_page / name).read_bytes() == (
            sources / name
        ).read_bytes(), name
    manifest = json.loads((installed.cockpit_page / "manifest.json").read_text())
    assert manifest["menu"]["index"]["label"] == "Kernel lab"
    assert "Terminal" in (installed.cockpit_page / "xterm.js").read_text()
    assert (installed.cockpit_page / "xterm.css").stat().st_size > 0
    assert not list(installed.prefix.parent.parent.rglob("node_modules"))


def test_the_notification_agents_unit_and_autostart_file_are_installed(
    installed: Installed,
) -> None:
    """The user unit runs the kdlabctl of the installation's prefix; the
    autostart file is the repository's."""
    unit = (installed.datadir / "systemd/user/kdlab-notify.service").read_text()
    assert f"ExecStart={installed.prefix}/bin/kdlabctl notify\n" in unit
    autostart = installed.datadir / "xdg/autostart/kdlab-notify.desktop"
    shipped = REPO / "systemd/user/kdlab-notify.desktop"
    assert autostart.read_text() == shipped.read_text()
    assert oct(autostart.stat().st_mode & 0o777) == "0o644"
