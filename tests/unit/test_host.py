"""kdlabd.host.facts: KVM usability and permission checks, on temporary stand-ins.

Temporary files stand for /dev/kvm and temporary directories for /sys/module;
ownership is set with chown, so most tests need root.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlabd.host.facts import (
    QemuUser,
    blocking_parent,
    can_open_rw,
    kvm_usable,
    prepare_private_dir,
    require_reachable,
)
from tests.support.prereq import require

QEMU_UID = 64055
KVM_GID = 107
QEMU_GID = 64055
OTHER_UID = 4242
OTHER_GID = 4343

IN_KVM_GROUP = QemuUser("libvirt-qemu", QEMU_UID, frozenset({QEMU_GID, KVM_GID}))
NOT_IN_KVM_GROUP = QemuUser("libvirt-qemu", QEMU_UID, frozenset({QEMU_GID}))


@pytest.fixture(autouse=True)
def as_root() -> None:
    require(os.geteuid() == 0, "root (the tests chown files to other users)")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the QEMU user can reach (pytest's tmp_path is under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="kdlab-host-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def sys_module(tmp_path: Path, *modules: str) -> Path:
    root = tmp_path / "sys-module"
    root.mkdir()
    for module in modules:
        (root / module / "parameters").mkdir(parents=True)
    return root


def node(
    tmp_path: Path, mode: int, uid: int = 0, gid: int = KVM_GID, name: str = "kvm"
) -> Path:
    path = tmp_path / name
    path.touch()
    os.chown(path, uid, gid)
    path.chmod(mode)
    return path


# kvm_usable.


def test_no_dev_kvm(tmp_path: Path) -> None:
    usable, why = kvm_usable(
        IN_KVM_GROUP, tmp_path / "kvm", sys_module(tmp_path, "kvm", "kvm_intel")
    )
    assert not usable
    assert why == f"{tmp_path / 'kvm'} does not exist"


def test_nested_pvm_host_is_not_usable(tmp_path: Path) -> None:
    """This machine: /dev/kvm exists, /sys/module has kvm and kvm_pvm only."""
    usable, why = kvm_usable(
        IN_KVM_GROUP, node(tmp_path, 0o660), sys_module(tmp_path, "kvm", "kvm_pvm")
    )
    assert not usable
    assert "kvm_intel" in why
    assert "kvm_amd" in why


def test_module_file_is_not_a_loaded_module(tmp_path: Path) -> None:
    modules = sys_module(tmp_path, "kvm")
    (modules / "kvm_intel").write_text("")
    usable, _ = kvm_usable(IN_KVM_GROUP, node(tmp_path, 0o660), modules)
    assert not usable


@pytest.mark.parametrize("vendor", ["kvm_intel", "kvm_amd"])
def test_hardware_kvm_with_standard_permissions(tmp_path: Path, vendor: str) -> None:
    usable, why = kvm_usable(
        IN_KVM_GROUP, node(tmp_path, 0o660), sys_module(tmp_path, "kvm", vendor)
    )
    assert usable, why


def test_qemu_user_not_in_kvm_group(tmp_path: Path) -> None:
    dev = node(tmp_path, 0o660)
    usable, why = kvm_usable(
        NOT_IN_KVM_GROUP, dev, sys_module(tmp_path, "kvm", "kvm_intel")
    )
    assert not usable
    assert "libvirt-qemu" in why
    assert str(dev) in why
    assert "root:kvm 0660" in why


def test_world_accessible_dev_kvm(tmp_path: Path) -> None:
    usable, why = kvm_usable(
        NOT_IN_KVM_GROUP, node(tmp_path, 0o666), sys_module(tmp_path, "kvm", "kvm_amd")
    )
    assert usable, why


def test_no_qemu_user(tmp_path: Path) -> None:
    usable, why = kvm_usable(
        None, node(tmp_path, 0o660), sys_module(tmp_path, "kvm_intel")
    )
    assert not usable
    assert "QEMU user does not exist" in why


# can_open_rw: the owner, group and other branches, as the kernel decides them.


@pytest.mark.parametrize(
    ("owner", "group", "mode", "expected"),
    [
        # The owner's bits decide for the owner, even when others' would allow more.
        (QEMU_UID, OTHER_GID, 0o600, True),
        (QEMU_UID, OTHER_GID, 0o400, False),
        (QEMU_UID, OTHER_GID, 0o200, False),
        (QEMU_UID, KVM_GID, 0o066, False),
        # The group's bits decide for a member, even when other's would allow.
        (0, KVM_GID, 0o060, True),
        (0, KVM_GID, 0o660, True),
        (0, KVM_GID, 0o640, False),
        (0, KVM_GID, 0o606, False),
        (0, QEMU_GID, 0o060, True),  # the primary group counts too
        # Everybody else.
        (0, OTHER_GID, 0o006, True),
        (0, OTHER_GID, 0o004, False),
        (0, OTHER_GID, 0o660, False),
        (OTHER_UID, OTHER_GID, 0o666, True),
    ],
)
def test_can_open_rw(
    tmp_path: Path, owner: int, group: int, mode: int, expected: bool
) -> None:
    path = node(tmp_path, mode, owner, group)
    assert can_open_rw(path, IN_KVM_GROUP) is expected


def test_can_open_rw_root_ignores_mode(tmp_path: Path) -> None:
    root = QemuUser("root", 0, frozenset({0}))
    assert can_open_rw(node(tmp_path, 0o000, OTHER_UID, OTHER_GID), root)


def test_can_open_rw_missing_path(tmp_path: Path) -> None:
    assert not can_open_rw(tmp_path / "missing", IN_KVM_GROUP)


def test_can_open_rw_agrees_with_the_kernel(open_dir: Path) -> None:
    """Cross-check against access(2) as the user, for a few modes, in a child."""
    tmp_path = open_dir
    user = NOT_IN_KVM_GROUP
    for index, mode in enumerate((0o600, 0o660, 0o606, 0o066, 0o006)):
        path = node(
            tmp_path, mode, user.uid if index % 2 else 0, OTHER_GID, f"f{index}"
        )
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.setgroups(sorted(user.gids))
                os.setgid(QEMU_GID)
                os.setuid(user.uid)
                os._exit(0 if os.access(path, os.R_OK | os.W_OK) else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) in (0, 1)
        assert (os.WEXITSTATUS(status) == 0) is can_open_rw(path, user), oct(mode)


# QemuUser and the private gdb directory.


def test_lookup_root() -> None:
    root = QemuUser.lookup("root")
    assert root is not None
    assert (root.name, root.uid) == ("root", 0)
    assert 0 in root.gids


def test_lookup_missing_user() -> None:
    assert QemuUser.lookup("kdlab-no-such-user") is None


def test_prepare_private_dir(open_dir: Path) -> None:
    path = open_dir / "run" / "gdb"
    prepare_private_dir(path, NOT_IN_KVM_GROUP)
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == QEMU_UID


def test_prepare_private_dir_tightens_existing(open_dir: Path) -> None:
    path = open_dir / "gdb"
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    prepare_private_dir(path, NOT_IN_KVM_GROUP)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert path.stat().st_uid == QEMU_UID


def test_prepare_private_dir_without_qemu_user(tmp_path: Path) -> None:
    path = tmp_path / "new" / "gdb"
    prepare_private_dir(path, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert path.stat().st_uid == 0


def test_prepare_private_dir_without_qemu_user_tightens_existing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gdb"
    path.mkdir()
    path.chmod(0o755)
    prepare_private_dir(path, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_prepare_private_dir_names_the_blocking_parent(open_dir: Path) -> None:
    blocker = open_dir / "private"
    blocker.mkdir()
    blocker.chmod(0o700)
    with pytest.raises(PermissionError) as err:
        prepare_private_dir(blocker / "run" / "gdb", NOT_IN_KVM_GROUP)
    assert f"cannot enter {blocker} (mode 0700)" in str(err.value)
    assert "libvirt-qemu" in str(err.value)


def test_blocking_parent(open_dir: Path) -> None:
    deep = open_dir / "a" / "b"
    deep.mkdir(parents=True)
    user = NOT_IN_KVM_GROUP
    assert blocking_parent(deep / "f", user) is None
    (open_dir / "a").chmod(0o750)
    assert blocking_parent(deep / "f", user) == open_dir / "a"
    os.chown(open_dir / "a", 0, QEMU_GID)  # group search bit now applies
    assert blocking_parent(deep / "f", user) is None
    os.chown(open_dir / "a", user.uid, 0)
    (open_dir / "a").chmod(0o077)  # the owner's bits decide for the owner
    assert blocking_parent(deep / "f", user) == open_dir / "a"


def test_require_reachable(open_dir: Path) -> None:
    pool = open_dir / "boot"
    pool.mkdir(mode=0o711)
    pool.chmod(0o711)
    require_reachable(pool, NOT_IN_KVM_GROUP)
    require_reachable(pool, None)
    pool.chmod(0o700)
    with pytest.raises(PermissionError, match=rf"cannot enter {pool} \(mode 0700\)"):
        require_reachable(pool, NOT_IN_KVM_GROUP)
