"""kdlabctl gdb's rules: where vmlinux is looked for, and which script gdb may run.

The files are real (a temporary tree, chowned when the tests run as root);
tests/bus/test_gdb_trust.py runs the same rules through real gdb as real users.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from kdlabctl import debug

OTHER = 54321  # a uid that is neither the caller nor root
ME = os.getuid()


def give_away(path: Path) -> tuple[int, int]:
    """Make *path* another user's: (the caller to check for, the owner).

    As root: chown it to OTHER. As anyone else it already is, for OTHER.
    """
    if ME == 0:
        os.lchown(path, OTHER, -1)
        return ME, OTHER
    return OTHER, ME


def kernel_tree(root: Path) -> Path:
    """A built tree: vmlinux, the vmlinux-gdb.py symlink and scripts/gdb/linux."""
    root.mkdir(mode=0o755)
    (root / "vmlinux").write_bytes(b"\x7fELF")
    package = root / "scripts" / "gdb" / "linux"
    package.mkdir(parents=True)
    (root / "scripts" / "gdb" / "vmlinux-gdb.py").write_text("import linux.utils\n")
    (package / "utils.py").write_text("")
    (root / "vmlinux-gdb.py").symlink_to(root / "scripts" / "gdb" / "vmlinux-gdb.py")
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return root / "vmlinux"


@pytest.fixture
def top(tmp_path: Path) -> Path:
    """pytest's directory: the caller's, under root's sticky /tmp."""
    assert debug.untrusted(tmp_path, ME) == ""
    return tmp_path


# --- untrusted(): ssh's StrictModes ------------------------------------------------


def test_own_file_in_own_directories_is_trusted(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    assert debug.untrusted(vmlinux, ME) == ""
    assert debug.untrusted(vmlinux.parent, ME) == ""


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_file_writable_by_others_is_not(top: Path, mode: int) -> None:
    kernel_tree(top / "linux")
    script = top / "linux" / "scripts" / "gdb" / "vmlinux-gdb.py"
    script.chmod(mode)
    assert "is writable by" in debug.untrusted(script, ME)


def test_directory_writable_by_group_is_not(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    vmlinux.parent.chmod(0o775)
    reason = debug.untrusted(vmlinux, ME)
    assert reason == f"{vmlinux.parent} is writable by group {os.getgid()}"


def test_parent_directory_writable_by_everyone_is_not(top: Path) -> None:
    shared = top / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may rename linux/ away
    vmlinux = kernel_tree(shared / "linux")
    assert debug.untrusted(vmlinux, ME) == f"{shared} is writable by everyone"


def test_parent_sticky_directory_of_someone_else_is_not(top: Path) -> None:
    shared = top / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    vmlinux = kernel_tree(shared / "linux")
    if ME == 0:  # root's sticky directory (/tmp) is fine: see the next test
        os.chown(shared, OTHER, -1)
        assert debug.untrusted(vmlinux, ME) == f"{shared} belongs to uid {OTHER}"
    else:
        assert debug.untrusted(vmlinux, ME) == f"{shared} is writable by everyone"


def test_roots_sticky_tmp_above_is_fine() -> None:
    info = os.stat("/tmp")
    assert (info.st_uid, info.st_mode & 0o1002) == (0, 0o1002)
    assert debug.untrusted(Path("/tmp"), ME) == "/tmp is writable by everyone"
    with tempfile.TemporaryDirectory(dir="/tmp") as child:
        assert debug.untrusted(Path(child), ME) == ""


def test_file_of_another_user_is_not(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    uid, owner = give_away(vmlinux)
    assert debug.untrusted(vmlinux, uid) == f"{vmlinux} belongs to uid {owner}"


def test_symlink_is_judged_by_its_target(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    elsewhere = top / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o777)
    (elsewhere / "evil.py").write_text("")
    (elsewhere / "evil.py").chmod(0o644)
    link = vmlinux.parent / "vmlinux-gdb.py"
    link.unlink()
    link.symlink_to(elsewhere / "evil.py")
    assert debug.untrusted(link, ME) == f"{elsewhere} is writable by everyone"


def test_missing_or_looping_path_is_not(top: Path) -> None:
    assert "cannot be resolved" in debug.untrusted(top / "absent", ME)
    loop = top / "loop"
    loop.symlink_to(loop)
    assert "cannot be resolved" in debug.untrusted(loop, ME)


# --- gdb_script(): what gdb may auto-load ---------------------------------------------


def test_trusted_tree_gives_its_script(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    assert debug.gdb_script(vmlinux, ME) == (vmlinux.parent / "vmlinux-gdb.py", "")


def test_no_script_is_no_script_and_no_complaint(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    (vmlinux.parent / "vmlinux-gdb.py").unlink()
    assert debug.gdb_script(vmlinux, ME) == (None, "")


def test_writable_module_the_script_imports_refuses_the_script(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    module = vmlinux.parent / "scripts" / "gdb" / "linux" / "utils.py"
    module.chmod(0o666)
    assert debug.gdb_script(vmlinux, ME) == (
        None,
        f"{module} is writable by everyone",
    )


def test_script_of_another_user_is_refused(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    target = vmlinux.parent / "scripts" / "gdb" / "vmlinux-gdb.py"
    uid, owner = give_away(target)
    assert debug.gdb_script(vmlinux, uid) == (None, f"{target} belongs to uid {owner}")


def test_directory_of_vmlinux_writable_by_others_refuses_the_script(
    top: Path,
) -> None:
    vmlinux = kernel_tree(top / "linux")
    vmlinux.parent.chmod(0o1777)  # even sticky: anyone could add files there
    script, reason = debug.gdb_script(vmlinux, ME)
    assert script is None
    assert reason == f"{vmlinux.parent} is writable by everyone"


# --- gdb_command() --------------------------------------------------------------------


def test_command_trusts_exactly_the_script(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    script = vmlinux.parent / "vmlinux-gdb.py"
    command = debug.gdb_command(vmlinux, top / "stub", ["--batch"], script)
    assert command == [
        "gdb", "-q", "-iex", f"add-auto-load-safe-path {script}",
        "-ex", f"target remote {top / 'stub'}", "--batch", str(vmlinux),
    ]  # fmt: skip


def test_command_without_a_trusted_script_turns_auto_load_off(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    command = debug.gdb_command(vmlinux, top / "stub", [], None)
    assert "add-auto-load-safe-path" not in " ".join(command)
    # After ~/.gdbinit (-iex runs later): a personal `safe-path /` cannot undo it.
    assert command[2:6] == [
        "-iex", "set auto-load python-scripts off",
        "-iex", "set auto-load gdb-scripts off",
    ]  # fmt: skip


def test_command_turns_the_index_cache_on_before_the_symbols_load(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    cache = ["-iex", "set index-cache directory /c"]
    cache += ["-iex", "set index-cache enabled on"]
    command = debug.gdb_command(vmlinux, top / "stub", [], None, index_cache=cache)
    at = command.index("set index-cache enabled on")
    assert command[at - 3 : at + 1] == cache
    assert command[-1] == str(vmlinux)


# --- vmlinux_candidates(): the VM's recorded paths are its owner's --------------------


@dataclass(frozen=True)
class Recorded:
    """What a VM records of its kernel (debug.Recorded; kdlabctl passes a VM)."""

    owner: int
    vmlinux: str
    kernel_path: str
    kernel_release: str


RECORDED = Recorded(
    owner=1000,
    vmlinux="/home/a/linux/vmlinux",
    kernel_path="/home/a/linux/arch/x86/boot/bzImage",
    kernel_release="6.9.0-rc1",
)
SYSTEM = [
    "/usr/lib/debug/boot/vmlinux-6.9.0-rc1",
    "/usr/lib/debug/lib/modules/6.9.0-rc1/vmlinux",
    "/boot/vmlinux-6.9.0-rc1",
]


def candidates(vm: Recorded, uid: int, explicit: str | None = None) -> list[str]:
    return [str(p) for p in debug.vmlinux_candidates(vm, explicit, uid)]


def test_owner_gets_the_recorded_paths_first() -> None:
    assert candidates(RECORDED, 1000) == [
        "/home/a/linux/vmlinux",
        "/home/a/linux/vmlinux",
        "/home/a/linux/arch/x86/boot/vmlinux",
        *SYSTEM,
    ]


@pytest.mark.parametrize("uid", [0, 1001])
def test_anyone_else_gets_only_the_system_paths(uid: int) -> None:
    assert candidates(RECORDED, uid) == SYSTEM


@pytest.mark.parametrize("uid", [0, 1000, 1001])
def test_explicit_vmlinux_is_always_honoured(uid: int) -> None:
    assert candidates(RECORDED, uid, "/mine/vmlinux") == ["/mine/vmlinux"]


@pytest.mark.parametrize("release", ["../../../tmp/x", "6.1/x", "..", "6.1 x"])
def test_unsafe_release_names_no_path(release: str) -> None:
    assert candidates(replace(RECORDED, kernel_release=release), 1001) == []


def test_not_found_says_why_the_recorded_paths_were_skipped() -> None:
    vm = replace(RECORDED, kernel_release="0.0.0-kdlab-none")
    with pytest.raises(FileNotFoundError, match="used by its owner, uid 1000, only"):
        debug.find_vmlinux(vm, None, 1001)


def test_found_vmlinux_is_resolved(top: Path) -> None:
    vmlinux = kernel_tree(top / "linux")
    link = top / "link"
    link.symlink_to(vmlinux)
    assert debug.find_vmlinux(RECORDED, str(link), ME) == vmlinux
