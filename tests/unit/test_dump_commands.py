"""kdlabctl's dump commands, drgn and crash: command lines, the vmlinux a dump
takes (by build ID), copying a dump as the caller, flattened dumps.

The daemon's side and real dumps are the bus and vm tiers'.
"""

from __future__ import annotations

import asyncio
import os
import stat
import struct
from pathlib import Path

import pytest

from kdlab.errors import InvalidArgument
from kdlab.kernel import vmcore
from kdlabctl import debug, dumps
from kdlabctl.cli import UsageError, build_parser, cmd_crash, cmd_drgn, parse_args
from kdlabctl.client import Dump
from tests.unit.test_gdbcache import BUILD_A, BUILD_B, elf

ME = os.getuid()


# command lines


@pytest.mark.parametrize(
    ("argv", "tool_args"),
    [
        (["drgn", "d1", "-e", "print(prog)"], ["-e", "print(prog)"]),
        (["drgn", "d1", "script.py", "a", "b"], ["script.py", "a", "b"]),
        (["drgn", "--vmlinux", "v", "d1", "--", "-q"], ["-q"]),
        (["drgn", "d1"], []),
        (["crash", "d1", "-s"], ["-s"]),
        (["crash", "d1", "--vmlinux", "v", "--", "-i", "cmds"], ["-i", "cmds"]),
    ],
)
def test_drgn_and_crash_get_what_kdlabctl_does_not_know(
    argv: list[str], tool_args: list[str]
) -> None:
    args = parse_args(build_parser(), argv)
    assert args.func is (cmd_drgn if argv[0] == "drgn" else cmd_crash)
    assert args.dump == "d1"
    assert args.gdb_args == tool_args


def test_dump_commands() -> None:
    args = parse_args(build_parser(), ["dump", "take", "vm", "--compress"])
    assert (args.func, args.name, args.compress) == (dumps.cmd_take, "vm", True)
    args = parse_args(build_parser(), ["dump", "list", "--json"])
    assert (args.func, args.name, args.json) == (dumps.cmd_list, None, True)
    args = parse_args(build_parser(), ["dump", "list", "vm"])
    assert args.name == "vm"
    args = parse_args(build_parser(), ["dump", "get", "d1", "-o", "f", "--force"])
    assert (args.func, args.id, args.output, args.force) == (
        dumps.cmd_get,
        "d1",
        "f",
        True,
    )
    args = parse_args(build_parser(), ["dump", "delete", "d1"])
    assert (args.func, args.id) == (dumps.cmd_delete, "d1")


@pytest.mark.parametrize(
    "argv",
    [
        ["dump", "get", "d1"],  # -o is required
        ["dump", "take", "vm", "--", "x"],
        ["dump", "delete", "d1", "--force"],
    ],
)
def test_dump_command_mistakes_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(build_parser(), argv)
    assert exited.value.code == 2


# the vmlinux of a dump


class Kernel:
    """What a VM recorded (:class:`kdlabctl.debug.Recorded`)."""

    def __init__(self, vmlinux: Path, kernel: Path | None = None) -> None:
        self.owner = ME
        self.vmlinux = str(vmlinux)
        self.kernel_path = str(kernel or "")
        self.kernel_release = ""


def test_the_vmlinux_with_the_dumps_build_id_is_taken(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(elf(BUILD_A))
    found = debug.find_vmlinux(Kernel(tmp_path / "vmlinux"), None, ME, BUILD_A.hex())
    assert found == (tmp_path / "vmlinux").resolve()


def test_a_vmlinux_of_another_build_is_passed_over_for_one_that_matches(
    tmp_path: Path,
) -> None:
    # The recorded vmlinux was rebuilt; the tree's (next to the bzImage) matches.
    (tmp_path / "other").write_bytes(elf(BUILD_B))
    tree = tmp_path / "linux"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "vmlinux").write_bytes(elf(BUILD_A))
    kernel = Kernel(tmp_path / "other", tree / "arch/x86/boot/bzImage")
    found = debug.find_vmlinux(kernel, None, ME, BUILD_A.hex())
    assert found == (tree / "vmlinux").resolve()


def test_a_mismatch_is_refused_naming_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(elf(BUILD_B))
    with pytest.raises(debug.VmlinuxMismatch) as refused:
        debug.find_vmlinux(Kernel(tmp_path / "vmlinux"), None, ME, BUILD_A.hex())
    message = str(refused.value)
    assert BUILD_A.hex() in message
    assert f"{tmp_path / 'vmlinux'} (build ID {BUILD_B.hex()})" in message
    assert "--vmlinux" in message


def test_an_explicit_vmlinux_of_another_build_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine").write_bytes(b"not an ELF file")
    with pytest.raises(debug.VmlinuxMismatch, match="build ID none"):
        debug.find_vmlinux(
            Kernel(tmp_path / "x"), str(tmp_path / "mine"), ME, BUILD_A.hex()
        )


def test_without_a_build_id_the_first_vmlinux_is_taken_as_gdb_takes_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "vmlinux").write_bytes(elf(BUILD_B))
    found = debug.find_vmlinux(Kernel(tmp_path / "vmlinux"), None, ME, "")
    assert found == (tmp_path / "vmlinux").resolve()


def dump(**changes: object) -> Dump:
    values: dict[str, object] = {
        "id": "vm-20260101-000000",
        "vm": "vm",
        "vmuuid": "u1",
        "owner": ME,
        "kernel_release": "6.1.0",
        "build_id": BUILD_A.hex(),
        "vmlinux_hint": "",
        "reason": "panic",
        "headline": "The kernel panicked.",
        "problem": "",
        "created": 1,
        "size": 10,
        "format": "elf",
        "vmcoreinfo": True,
        "state": "complete",
    }
    values.update(changes)
    return Dump(**values)  # type: ignore[arg-type]


class DeletedVM:
    """A client whose dumps' VM is gone: the dump's own record is used."""

    async def vm(self, name: str) -> object:
        from kdlabctl.client import RemoteError

        raise RemoteError("org.kdlab.Kdlab1.Error.NoSuchVM", f"no VM {name}")


def test_a_mismatch_exits_as_an_invalid_argument(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(elf(BUILD_B))
    found = dump(vmlinux_hint=str(tmp_path / "vmlinux"))
    with pytest.raises(InvalidArgument) as refused:
        asyncio.run(dumps.vmlinux_for(DeletedVM(), found, None))  # type: ignore[arg-type]
    assert refused.value.exit_code == 2
    assert BUILD_B.hex() in str(refused.value)


def test_a_deleted_vms_dump_finds_vmlinux_by_its_hint(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(elf(BUILD_A))
    found = dump(vmlinux_hint=str(tmp_path / "vmlinux"))
    path = asyncio.run(dumps.vmlinux_for(DeletedVM(), found, None))  # type: ignore[arg-type]
    assert path == (tmp_path / "vmlinux").resolve()


# copying a dump as the caller


def source(tmp_path: Path, data: bytes) -> int:
    (tmp_path / "dump").write_bytes(data)
    return os.open(tmp_path / "dump", os.O_RDONLY)


def test_get_writes_a_new_file_0600_whatever_the_umask(tmp_path: Path) -> None:
    fd = source(tmp_path, b"x" * 3_000_000)
    old = os.umask(0)
    try:
        dumps.save(fd, str(tmp_path / "copy"), force=False)
    finally:
        os.umask(old)
        os.close(fd)
    assert (tmp_path / "copy").read_bytes() == b"x" * 3_000_000
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o600


def test_get_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    (tmp_path / "copy").write_bytes(b"mine")
    fd = source(tmp_path, b"dump")
    try:
        with pytest.raises(UsageError, match="--force"):
            dumps.save(fd, str(tmp_path / "copy"), force=False)
        assert (tmp_path / "copy").read_bytes() == b"mine"
        dumps.save(fd, str(tmp_path / "copy"), force=True)
    finally:
        os.close(fd)
    assert (tmp_path / "copy").read_bytes() == b"dump"


def test_get_into_a_directory_one_cannot_write_says_why(tmp_path: Path) -> None:
    fd = source(tmp_path, b"dump")
    try:
        with pytest.raises(UsageError, match="cannot write"):
            dumps.save(fd, str(tmp_path / "missing" / "copy"), force=False)
    finally:
        os.close(fd)


def test_a_failed_copy_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_source: int, _target: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dumps, "copy", broken)
    fd = source(tmp_path, b"dump")
    try:
        with pytest.raises(OSError, match="No space"):
            dumps.save(fd, str(tmp_path / "copy"), force=False)
    finally:
        os.close(fd)
    assert not (tmp_path / "copy").exists()


def flattened(records: list[tuple[int, bytes]]) -> bytes:
    header = vmcore.FLAT_SIGNATURE.ljust(16, b"\0") + struct.pack(">qq", 1, 1)
    data = header.ljust(vmcore.FLAT_HEADER_SIZE, b"\0")
    for offset, chunk in records:
        data += struct.pack(">qq", offset, len(chunk)) + chunk
    return data + struct.pack(">qq", -1, -1)


def test_a_flattened_dump_is_reassembled_privately(tmp_path: Path) -> None:
    # Records come in any order and may leave holes, as makedumpfile's do.
    fd = source(tmp_path, flattened([(8, b"world"), (0, b"KDUMP   "), (20, b"!")]))
    try:
        assert dumps.flattened(fd)
        with dumps.private_copy(fd) as copy:
            assert copy.read_bytes() == b"KDUMP   world" + b"\0" * 7 + b"!"
            assert stat.S_IMODE(copy.stat().st_mode) == 0o600
            assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700
        assert not copy.parent.exists()
    finally:
        os.close(fd)


def test_a_truncated_flattened_dump_is_refused(tmp_path: Path) -> None:
    fd = source(tmp_path, flattened([(0, b"KDUMP   ")])[:-16])
    try:
        with pytest.raises(UsageError, match="ends before"), dumps.private_copy(fd):
            pass
    finally:
        os.close(fd)


def test_an_elf_dump_is_copied_as_it_is(tmp_path: Path) -> None:
    fd = source(tmp_path, b"\x7fELF" + bytes(100))
    try:
        assert not dumps.flattened(fd)
        with dumps.private_copy(fd) as copy:
            assert copy.read_bytes() == b"\x7fELF" + bytes(100)
    finally:
        os.close(fd)


# the tools


def test_without_drgn_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(UsageError, match=r"pip install 'kdlab\[postmortem\]'"):
        dumps.require_drgn()


def test_without_crash_the_error_names_the_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UsageError, match="apt-get install crash"):
        dumps.run_tool(["crash", "--version"])


class FakeClient:
    """kdlabd's answers for one dump whose VM is gone (a client of the typed
    methods :mod:`kdlabctl.dumps` calls)."""

    def __init__(self, found: Dump, data: Path) -> None:
        self.found = found
        self.data = data

    async def dump_path(self, dump_id: str) -> str:
        from kdlabctl.client import RemoteError

        if dump_id != self.found.id:
            raise RemoteError("org.kdlab.Kdlab1.Error.NoSuchDump", "no dump")
        return f"/org/kdlab/Kdlab1/dump/{dump_id}"

    async def dump_at(self, _path: str) -> Dump:
        return self.found

    async def vm(self, name: str) -> object:
        return await DeletedVM().vm(name)

    async def open_dump(self, _path: str) -> int:
        return os.open(self.data, os.O_RDONLY)


def fake_crash(tmp_path: Path, status: int) -> Path:
    """A ``crash`` on $PATH that records its arguments and what it read."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "crash"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && {{ echo "crash 8.0.2"; exit 0; }}\n'
        f'echo "$@" > {tmp_path}/args\n'
        f'eval last=\\${{$#}}; cat "$last" > {tmp_path}/read\n'
        f"exit {status}\n"
    )
    script.chmod(0o755)
    return bin_dir


def crash_args(dump_id: str, *extra: str) -> object:
    return parse_args(build_parser(), ["crash", dump_id, *extra])


@pytest.mark.parametrize("status", [0, 1])
def test_crash_reads_a_private_copy_with_the_checked_vmlinux(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status: int,
) -> None:
    (tmp_path / "vmlinux").write_bytes(elf(BUILD_A))
    (tmp_path / "dump").write_bytes(b"\x7fELF dump")
    monkeypatch.setenv("PATH", f"{fake_crash(tmp_path, status)}:{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    found = dump(vmlinux_hint=str(tmp_path / "vmlinux"))
    client = FakeClient(found, tmp_path / "dump")
    code = asyncio.run(
        dumps.cmd_crash(client, crash_args(found.id, "-s"))  # type: ignore[arg-type]
    )
    assert code == status
    words = (tmp_path / "args").read_text().split()
    assert words[:2] == ["-s", str((tmp_path / "vmlinux").resolve())]
    assert (tmp_path / "read").read_bytes() == b"\x7fELF dump"
    assert not Path(words[2]).exists(), "the private copy is removed"
    said = capsys.readouterr().err
    if status:
        assert f"crash 8.0.2 could not read dump {found.id} of Linux 6.1.0" in said
        assert f"kdlabctl drgn {found.id} reads it" in said
    else:
        assert "could not read" not in said


def test_drgn_refuses_a_dump_without_vmcoreinfo_with_its_fix(tmp_path: Path) -> None:
    (tmp_path / "dump").write_bytes(b"\x7fELF dump")
    problem = "the dump carries no VMCOREINFO: build it with CONFIG_FW_CFG_SYSFS=y"
    found = dump(vmcoreinfo=False, build_id="", problem=problem)
    args = parse_args(build_parser(), ["drgn", found.id])
    with pytest.raises(UsageError, match="CONFIG_FW_CFG_SYSFS=y"):
        asyncio.run(dumps.cmd_drgn(FakeClient(found, tmp_path / "dump"), args))  # type: ignore[arg-type]
