"""Facts about this host that libvirt does not tell: KVM usability, the QEMU user."""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

# The vendor modules of hardware KVM. Some nested setups load only `kvm` plus a
# paravirtual module (e.g. kvm_pvm): /dev/kvm exists and libvirt reports KVM,
# but a normal guest kernel hangs there.
HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")


@dataclass(frozen=True)
class QemuUser:
    """The account QEMU runs as under libvirt's system instance."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def lookup(cls, name: str) -> QemuUser | None:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return cls(name, entry.pw_uid, frozenset(os.getgrouplist(name, entry.pw_gid)))


def can_open_rw(path: Path, user: QemuUser) -> bool:
    """Whether *user* may open *path* for reading and writing, by its mode bits."""
    try:
        info = path.stat()
    except OSError:
        return False
    if user.uid == 0:
        return True
    if info.st_uid == user.uid:
        need = stat.S_IRUSR | stat.S_IWUSR
    elif info.st_gid in user.gids:
        need = stat.S_IRGRP | stat.S_IWGRP
    else:
        need = stat.S_IROTH | stat.S_IWOTH
    return info.st_mode & need == need


def hardware_kvm_loaded(sys_module: Path = Path("/sys/module")) -> bool:
    """Whether a hardware KVM vendor module (Intel VT-x or AMD-V) is loaded."""
    return any((sys_module / module).is_dir() for module in HARDWARE_KVM_MODULES)


def kvm_usable(
    user: QemuUser | None,
    dev_kvm: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
) -> tuple[bool, str]:
    """Whether local guests can use KVM, and why not when they cannot."""
    if not dev_kvm.exists():
        return False, f"{dev_kvm} does not exist"
    if not hardware_kvm_loaded(sys_module):
        return False, "no hardware KVM module (kvm_intel or kvm_amd) is loaded"
    if user is None:
        return False, "the QEMU user does not exist"
    if not can_open_rw(dev_kvm, user):
        return (
            False,
            f"the QEMU user {user.name} cannot open {dev_kvm} (want root:kvm 0660)",
        )
    return True, "KVM is usable"


def may_search(path: Path, user: QemuUser) -> bool:
    """Whether *user* may traverse the directory *path*, by its mode bits."""
    info = path.stat()
    if user.uid in (0, info.st_uid):
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in user.gids:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def blocking_parent(path: Path, user: QemuUser) -> Path | None:
    """The first parent of *path* that *user* cannot traverse, if any."""
    for parent in reversed(path.parents):
        if not may_search(parent, user):
            return parent
    return None


def require_reachable(path: Path, user: QemuUser | None) -> None:
    """Raise PermissionError naming the directory that stops *user* reaching *path*.

    QEMU would otherwise fail with a bare "Permission denied" on a kernel or
    socket path.
    """
    if user is None:
        return
    blocker = blocking_parent(path / "x", user)
    if blocker is not None:
        raise PermissionError(
            f"QEMU runs as {user.name}, which cannot enter {blocker} "
            f"(mode {blocker.stat().st_mode & 0o777:04o}) on the way to {path}: "
            "keep kdlab's directories where QEMU can traverse (chmod o+x, or "
            "--state-dir/--runtime-dir elsewhere)"
        )


def prepare_private_dir(path: Path, owner: QemuUser | None) -> None:
    """Create *path* so that only root and the QEMU user can enter it (mode 0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    if owner is None:
        return
    os.chown(path, owner.uid, -1)
    require_reachable(path, owner)
