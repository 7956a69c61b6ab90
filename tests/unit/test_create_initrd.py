"""Which initrd ``kdlabctl create`` (and ``up``) give a new VM, and ``start``
of a tree's VM.

Without an image and without ``--initrd``: kdlab's userspace initramfs, with
the kernel's modules when they are found (next to a packaged kernel, built in
a tree, ``--modules``); ``--no-initramfs``: none at all. With an image: the
root mode's initramfs when the kernel's modules are found, else none. The
archives are the real ones (busybox-static, kdlab's agent compiled with cc,
Debian's modules), built into the caller's cache.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab.errors import EXIT_UNAVAILABLE
from kdlab.kernel.initramfs import AGENT
from kdlabctl import cli
from kdlabctl.cli import UsageError, build_parser, parse_args
from kdlabctl.kernel import KernelFiles
from kdlabctl.records import VM
from tests.support import debian
from tests.support.prereq import require_tool
from tests.unit.test_notify import VMLINUX


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The caller's cache: $XDG_CACHE_HOME/kdlab."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "kdlab"


def members(initrd: tuple[int | None, str]) -> Iterator[str]:
    """The names in kdlab's userspace initramfs *initrd* (its descriptor,
    closed after, and its mode)."""
    fd, mode = initrd
    assert mode == "userspace"
    assert fd is not None
    try:
        data = os.pread(fd, 64 << 20, 0)
    finally:
        os.close(fd)
    listing = subprocess.run(
        [require_tool("cpio", "cpio"), "--quiet", "-t"],
        input=gzip.decompress(data),
        capture_output=True,
        check=True,
    )
    yield from listing.stdout.decode().split()


def test_without_an_image_a_packaged_kernel_gets_kdlabs_userspace_with_its_modules(
    cloud_kernel: debian.CloudKernel, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = str(cloud_kernel.vmlinuz)
    names = set(members(cli._initrd(KernelFiles(kernel=kernel), kernel, None, False)))
    assert {AGENT, "bin/busybox", "etc/inittab", "init"} <= names
    assert "lib/modules/virtio_console.ko" in names
    assert capsys.readouterr().err == (
        f"kdlabctl: built kdlab's userspace initramfs with modules from "
        f"{cloud_kernel.modules_dir}\n"
    )
    # Built into the caller's cache: the agent, and the archive.
    (built,) = (cache / "agent").iterdir()
    assert built.name.startswith("kdlab-agent-")
    assert len(list((cache / "initramfs").glob("*.cpio.gz"))) == 1


@pytest.mark.usefixtures("cache")
def test_a_bzimage_alone_gets_kdlabs_userspace_without_modules(tmp_path: Path) -> None:
    kernel = str(tmp_path / "bzImage")  # no modules next to it: never read here
    names = list(members(cli._initrd(KernelFiles(kernel=kernel), kernel, None, True)))
    assert AGENT in names
    assert not [name for name in names if name.startswith("lib/modules/")]


@pytest.mark.usefixtures("cache")
def test_a_caller_without_a_cache_still_gets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A system user without a home: nothing can be cached, the agent is
    compiled in a scratch directory all the same."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    kernel = str(tmp_path / "bzImage")
    names = list(members(cli._initrd(KernelFiles(kernel=kernel), kernel, None, True)))
    assert AGENT in names


@pytest.mark.usefixtures("cache")
def test_a_tree_after_make_modules_gives_its_modules(
    cloud_kernel: debian.CloudKernel, tmp_path: Path
) -> None:
    tree = tmp_path / "linux"
    for name in ("Kconfig", "Makefile", "scripts/config"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("")
    console = next(cloud_kernel.modules_dir.rglob("virtio_console.ko"))
    (tree / "drivers/char").mkdir(parents=True)
    (tree / "drivers/char/virtio_console.ko").write_bytes(console.read_bytes())
    (tree / "modules.order").write_text("drivers/char/virtio_console.o\n")
    # Built in, as modules.builtin says: the dependencies of virtio_console.
    builtin = ["virtio", "virtio_ring", "virtio_pci"]
    (tree / "modules.builtin").write_text("".join(f"k/{m}.ko\n" for m in builtin))
    files = KernelFiles(tree=str(tree))
    modules = [
        name
        for name in members(cli._initrd(files, str(tree / "bzImage"), None, True))
        if name.startswith("lib/modules/")
    ]
    assert modules == ["lib/modules/virtio_console.ko"]


def test_no_initramfs_boots_the_kernel_alone(tmp_path: Path) -> None:
    kernel = str(tmp_path / "bzImage")
    files = KernelFiles(kernel=kernel, initramfs=False)
    assert cli._initrd(files, kernel, None, False) == (None, "")
    assert cli._initrd(files, kernel, "image", False) == (None, "")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (KernelFiles(initrd="/i", initramfs=False), "--initrd and --no-initramfs"),
        (KernelFiles(initrd="/i", modules="/m"), "--initrd and --modules"),
        (KernelFiles(modules="/m", initramfs=False), "--modules and --no-initramfs"),
    ],
)
def test_what_excludes_each_other(files: KernelFiles, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        cli._initrd(files, "/k", None, False)


def test_with_an_image_and_no_modules_found_no_initrd(tmp_path: Path) -> None:
    kernel = str(tmp_path / "bzImage")
    assert cli._initrd(KernelFiles(kernel=kernel), kernel, "image", False) == (
        None,
        "",
    )


def test_an_agent_that_cannot_be_built_is_unavailable_exit_69(
    tmp_path: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No compiler: the command stops before calling kdlabd, with exit code 69
    and what to install."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc there
    kernel = str(tmp_path / "bzImage")
    with pytest.raises(cli.Unavailable, match="no C compiler") as raised:
        cli._initrd(KernelFiles(kernel=kernel), kernel, None, False)

    def run(_args: object) -> int:
        raise raised.value

    monkeypatch.setattr(cli, "_run", run)
    assert cli.main(["create", "vm", "--kernel", kernel]) == EXIT_UNAVAILABLE
    assert capsys.readouterr().err == f"kdlabctl: {raised.value}\n"
    assert not (cache / "initramfs").exists()


@pytest.mark.parametrize("command", [["create", "vm", "--kernel", "k"], ["up", "t"]])
def test_create_and_up_take_no_initramfs(command: list[str]) -> None:
    assert parse_args(build_parser(), command).no_initramfs is False
    assert parse_args(build_parser(), [*command, "--no-initramfs"]).no_initramfs


class StartingClient:
    """What start_vm asks of kdlabd: the VM's record, then Start."""

    def __init__(self, vm: VM) -> None:
        self.record = vm
        self.started: dict[str, object] = {}

    async def vm(self, name: str) -> VM:
        assert name == self.record.name
        return self.record

    async def start(self, name: str, **options: object) -> None:
        assert name == self.record.name
        initrd = options["initrd"]
        # The descriptors are closed after Start: read what they hold now.
        self.started = {
            **options,
            "kernel": os.pread(int(str(options["kernel"])), 16, 0),
            "initrd": list(members((os.dup(initrd), "userspace")))
            if isinstance(initrd, int)
            else None,
        }


def built_tree(path: Path) -> Path:
    """A kernel tree with a bzImage built, as start_vm reads it."""
    for name in (
        "Kconfig",
        "Makefile",
        "scripts/config",
        "include/config/kernel.release",
    ):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("6.1.0\n" if name.endswith("release") else "")
    (path / "arch/x86/boot").mkdir(parents=True)
    (path / "arch/x86/boot/bzImage").write_bytes(b"a new bzImage...")
    return path


@pytest.mark.usefixtures("cache")
@pytest.mark.parametrize("initramfs", ["userspace", "root", ""])
def test_a_tree_vm_starts_with_the_new_kernel_and_kdlabs_userspace_again(
    tmp_path: Path, initramfs: str
) -> None:
    """A tree's VM that boots kdlab's userspace gets it built again with the
    tree's bzImage (its modules may have changed); any other keeps its initrd."""
    tree = built_tree(tmp_path / "linux")
    client = StartingClient(VMLINUX.replace(tree=str(tree), initramfs=initramfs))
    asyncio.run(cli.start_vm(client, "linux", paused=True))  # type: ignore[arg-type]
    assert client.started["kernel"] == b"a new bzImage..."
    assert client.started["paused"] is True
    initrd = client.started["initrd"]
    if initramfs == "userspace":
        assert isinstance(initrd, list)
        assert AGENT in initrd
    else:
        assert initrd is None
