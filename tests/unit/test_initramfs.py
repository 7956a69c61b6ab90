"""kdlabctl.initramfs: module resolution without depmod, the cpio writer, and the
/init of kdlab.kernel.initramfs it packs.

Real modules come from Debian's cloud kernel (the cached fixture); the rest are
minimal ELF objects made here, whose only content is a ``.modinfo`` section.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab import agent
from kdlab.kernel.initramfs import AGENT, POWER_BUTTON_HANDLER, USERSPACE_DIRECTORIES
from kdlabctl import initramfs
from kdlabctl.initramfs import (
    InitramfsError,
    Module,
    build,
    build_userspace,
    find_modules_dir,
    resolve,
)
from tests.support import debian
from tests.support.prereq import require, require_tool

# What `modinfo -F depends` says of Debian's 6.1 cloud modules (and of 6.12's).
VIRTIO_DEPENDS = {
    "virtio_ring": [],
    "virtio": ["virtio_ring"],
    "virtio_pci_legacy_dev": [],
    "virtio_pci_modern_dev": [],
    "virtio_pci": [
        "virtio_ring",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio",
    ],
    "virtio_blk": ["virtio", "virtio_ring"],
}
VIRTIO_CLOSURE = set(VIRTIO_DEPENDS)
# What Debian's kernel has of initramfs.OPTIONAL_MODULES as modules, with their
# dependencies (ext4 is built in).
OPTIONAL_CLOSURE = {
    *("button", "evdev", "qemu_fw_cfg", "pvpanic", "pvpanic_mmio"),
    *("virtio_console", "fuse", "virtiofs"),
}


@pytest.fixture(scope="module")
def busybox() -> Path:
    try:
        initramfs.static_busybox(initramfs.BUSYBOX)
    except InitramfsError as err:
        require(False, str(err))
    return initramfs.BUSYBOX


def elf_module(*modinfo: str, extended_numbering: bool = False) -> bytes:
    """A minimal ELF64 relocatable object whose ``.modinfo`` holds *modinfo*.

    With *extended_numbering*, the section count and the index of the section
    names are in section 0, as in objects of 0xff00 sections or more.
    """
    info = b"".join(entry.encode() + b"\0" for entry in modinfo)
    names = b"\0.modinfo\0.shstrtab\0"
    names_at = 64 + len(info)
    shoff = names_at + len(names) + (-(names_at + len(names)) % 8)
    header = struct.pack(
        "<4s5B7xHHIQQQIHHHHHH",
        *(b"\x7fELF", 2, 1, 1, 0, 0),  # ELF64, little-endian, version 1, SysV
        *(1, 62, 1, 0, 0, shoff, 0),  # ET_REL, x86-64: no entry, no program headers
        *(64, 0, 0, 64),  # this header's size, none of program headers, a section's
        *((0, 0xFFFF) if extended_numbering else (3, 2)),  # 3; names in section 2
    )
    section = struct.Struct("<IIQQQQIIQQ")
    sections = [
        section.pack(
            0, 0, 0, 0, 0, *((3, 2) if extended_numbering else (0, 0)), 0, 0, 0
        ),
        section.pack(1, 1, 2, 0, 64, len(info), 0, 0, 1, 0),  # PROGBITS, ALLOC
        section.pack(10, 3, 0, 0, names_at, len(names), 0, 0, 1, 0),  # STRTAB
    ]
    body = header + info + names
    return body + bytes(shoff - len(body)) + b"".join(sections)


def add_module(root: Path, relative: str, *modinfo: str) -> bytes:
    """Write ``root/relative`` (compressed as its suffix says); return the ELF."""
    elf = elf_module(*modinfo)
    data = elf
    if relative.endswith(".xz"):
        data = lzma.compress(elf)
    elif relative.endswith(".gz"):
        data = gzip.compress(elf)
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return elf


def names(modules: list[Module]) -> list[str]:
    return [module.name for module in modules]


def cpio(archive: bytes, *args: str, cwd: Path | None = None) -> str:
    """Run the real ``cpio`` on the uncompressed *archive*; return its listing."""
    tool = require_tool("cpio", "cpio")
    done = subprocess.run(
        [tool, "--quiet", *args],
        input=gzip.decompress(archive),
        cwd=cwd,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def extract(archive: bytes, dest: Path, *patterns: str) -> None:
    dest.mkdir(exist_ok=True)
    cpio(archive, "-i", "-d", "--no-absolute-filenames", *patterns, cwd=dest)


def assert_shell_syntax(busybox: Path, script: Path) -> None:
    check = subprocess.run(
        [busybox, "sh", "-n", script], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr


def assert_dependencies_first(modules: list[Module]) -> None:
    """Every module comes once, after what it needs (as modinfo -F depends says)."""
    order = names(modules)
    assert len(set(order)) == len(order), f"a module twice: {order}"
    for module, dependencies in VIRTIO_DEPENDS.items():
        for dependency in dependencies:
            assert order.index(dependency) < order.index(module), order


# find_modules_dir


@pytest.mark.parametrize("lib", ["lib/modules", "usr/lib/modules"])
def test_modules_found_next_to_an_unpacked_package(tmp_path: Path, lib: str) -> None:
    kernel = tmp_path / "boot/vmlinuz-6.1.0-9-cloud-amd64"
    kernel.parent.mkdir()
    kernel.touch()
    modules = tmp_path / lib / "6.1.0-9-cloud-amd64"
    modules.mkdir(parents=True)
    assert find_modules_dir(kernel, None) == modules
    assert find_modules_dir(kernel, "6.1.0-9-cloud-amd64") == modules
    assert find_modules_dir(kernel, "6.1.0-10-cloud-amd64") is None


def test_release_given_for_a_kernel_named_without_one(tmp_path: Path) -> None:
    kernel = tmp_path / "boot/vmlinuz"
    kernel.parent.mkdir()
    kernel.touch()
    (tmp_path / "lib/modules/6.9.0").mkdir(parents=True)
    assert find_modules_dir(kernel, None) is None
    assert find_modules_dir(kernel, "6.9.0") == tmp_path / "lib/modules/6.9.0"


def test_symlink_followed_into_boot(tmp_path: Path) -> None:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/vmlinuz-6.9.0").touch()
    (tmp_path / "vmlinuz").symlink_to("boot/vmlinuz-6.9.0")
    (tmp_path / "lib/modules/6.9.0").mkdir(parents=True)
    assert (
        find_modules_dir(tmp_path / "vmlinuz", None) == tmp_path / "lib/modules/6.9.0"
    )


def test_no_modules_for_a_kernel_tree(tmp_path: Path) -> None:
    kernel = tmp_path / "linux/arch/x86/boot/bzImage"
    kernel.parent.mkdir(parents=True)
    kernel.touch()
    (tmp_path / "linux/arch/x86/lib/modules/6.9.0").mkdir(parents=True)
    assert find_modules_dir(kernel, None) is None
    assert find_modules_dir(kernel, "6.9.0") is None


def test_modules_of_debians_cloud_kernel_found(
    cloud_kernel: debian.CloudKernel,
) -> None:
    assert find_modules_dir(cloud_kernel.vmlinuz, None) == cloud_kernel.modules_dir


# resolve, on Debian's modules (no modules.dep: read from .modinfo)


def test_debians_virtio_modules_in_dependency_order(
    cloud_kernel: debian.CloudKernel,
) -> None:
    assert not (cloud_kernel.modules_dir / "modules.dep").exists()
    modules = resolve(cloud_kernel.modules_dir, ["virtio_blk", "virtio_pci"])
    assert set(names(modules)) == VIRTIO_CLOSURE
    assert_dependencies_first(modules)
    for module in modules:
        assert module.path.name == f"{module.name}.ko"
        assert module.path.is_relative_to(cloud_kernel.modules_dir)


def test_debians_builtin_ext4_skipped(cloud_kernel: debian.CloudKernel) -> None:
    assert resolve(cloud_kernel.modules_dir, ["ext4"]) == []
    default = resolve(cloud_kernel.modules_dir, initramfs.DEFAULT_MODULES, ["ext4"])
    assert set(names(default)) == VIRTIO_CLOSURE


def test_debians_softdep_modules_loaded_first(cloud_kernel: debian.CloudKernel) -> None:
    # xts: softdep=pre: ecb, and ecb is a module in Debian's cloud kernel.
    assert names(resolve(cloud_kernel.modules_dir, ["xts"]))[-2:] == ["ecb", "xts"]


# resolve, on trees made here


def test_modinfo_dependencies_first_each_once(tmp_path: Path) -> None:
    add_module(tmp_path, "kernel/a.ko", "license=GPL", "depends=b,c", "name=a")
    add_module(tmp_path, "kernel/b.ko", "depends=")
    add_module(tmp_path, "kernel/sub/c.ko", "depends=b")
    add_module(tmp_path, "kernel/d.ko", "depends=c")
    assert names(resolve(tmp_path, ["a", "d", "b"])) == ["b", "c", "a", "d"]


def test_soft_pre_dependencies_loaded_when_present(tmp_path: Path) -> None:
    add_module(tmp_path, "a.ko", "depends=", "softdep=pre: b absent post: c")
    add_module(tmp_path, "b.ko", "depends=")
    add_module(tmp_path, "c.ko", "depends=")
    assert names(resolve(tmp_path, ["a"])) == ["b", "a"]


def test_extended_section_numbering_read(tmp_path: Path) -> None:
    elf = elf_module("depends=b", extended_numbering=True)
    (tmp_path / "a.ko").write_bytes(elf)
    add_module(tmp_path, "b.ko", "depends=")
    assert names(resolve(tmp_path, ["a"])) == ["b", "a"]


def test_dashes_read_as_underscores(tmp_path: Path) -> None:
    add_module(tmp_path, "virtio-rng.ko", "depends=virtio-ring")
    add_module(tmp_path, "virtio_ring.ko", "depends=")
    modules = resolve(tmp_path, ["virtio-rng"])
    assert modules == [
        Module("virtio_ring", tmp_path / "virtio_ring.ko"),
        Module("virtio_rng", tmp_path / "virtio-rng.ko"),
    ]


def test_modules_dep_used_when_present(tmp_path: Path) -> None:
    # Not ELF at all: with modules.dep, nothing needs to read them.
    for name in ("a", "b", "c", "s"):
        (tmp_path / f"kernel/{name}.ko").parent.mkdir(exist_ok=True)
        (tmp_path / f"kernel/{name}.ko").write_bytes(b"not read")
    (tmp_path / "modules.dep").write_text(
        "kernel/a.ko: kernel/c.ko kernel/b.ko\n"
        "kernel/b.ko:\n"
        "kernel/c.ko: kernel/b.ko\n"
        "kernel/s.ko:\n"
    )
    (tmp_path / "modules.softdep").write_text(
        "# Soft dependencies extracted from modules themselves.\n"
        "softdep a pre: s post: b\n"
    )
    modules = resolve(tmp_path, ["a"])
    assert names(modules) == ["b", "c", "s", "a"]
    assert modules[-1].path == tmp_path / "kernel/a.ko"


def test_builtin_modules_skipped(tmp_path: Path) -> None:
    add_module(tmp_path, "kernel/fs/ext4/ext4.ko", "depends=")  # stale or updates/
    add_module(tmp_path, "kernel/virtio_blk.ko", "depends=")
    (tmp_path / "modules.builtin").write_text(
        "kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio-pci.ko\n"
    )
    wanted = ["virtio_pci", "virtio_blk", "ext4"]
    assert names(resolve(tmp_path, wanted)) == ["virtio_blk"]


def test_optional_modules_only_when_they_are_files(tmp_path: Path) -> None:
    add_module(tmp_path, "a.ko", "depends=")
    assert names(resolve(tmp_path, ["a"], optional=["ext4"])) == ["a"]
    add_module(tmp_path, "ext4.ko", "depends=")
    assert names(resolve(tmp_path, ["a"], optional=["ext4"])) == ["a", "ext4"]


def test_updates_preferred_as_depmod_does(tmp_path: Path) -> None:
    add_module(tmp_path, "kernel/a.ko", "depends=")
    add_module(tmp_path, "updates/dkms/a.ko", "depends=")
    assert resolve(tmp_path, ["a"])[0].path == tmp_path / "updates/dkms/a.ko"


def test_missing_module_says_what_to_do(tmp_path: Path) -> None:
    add_module(tmp_path, "virtio_pci.ko", "depends=")
    with pytest.raises(InitramfsError, match="virtio_blk is neither in") as err:
        resolve(tmp_path, ["virtio_pci", "virtio_blk"])
    assert str(tmp_path) in str(err.value)
    assert "belongs to this kernel" in str(err.value)


def test_missing_dependency_named(tmp_path: Path) -> None:
    add_module(tmp_path, "virtio_blk.ko", "depends=virtio")
    with pytest.raises(InitramfsError, match="virtio_blk depends on virtio, which"):
        resolve(tmp_path, ["virtio_blk"])


def test_dependency_cycle_refused(tmp_path: Path) -> None:
    add_module(tmp_path, "a.ko", "depends=b")
    add_module(tmp_path, "b.ko", "depends=a")
    with pytest.raises(InitramfsError, match="cycle: a -> b -> a"):
        resolve(tmp_path, ["a"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "not an ELF object"),
        (b"\x7fELF\x01\x01" + bytes(58), "not a 64-bit little-endian ELF object"),
        (elf_module()[:-64], "damaged ELF section headers"),
        (elf_module().replace(b".modinfo", b".modinfX"), "no .modinfo section"),
    ],
    ids=["garbage", "elf32", "truncated", "no-modinfo"],
)
def test_bad_module_files_named(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "a.ko").write_bytes(content)
    with pytest.raises(InitramfsError, match=message) as err:
        resolve(tmp_path, ["a"])
    assert str(tmp_path / "a.ko") in str(err.value)


def test_missing_modules_directory(tmp_path: Path) -> None:
    with pytest.raises(InitramfsError, match="does not exist"):
        resolve(tmp_path / "absent", ["a"])


# Compressed modules


@pytest.mark.parametrize("suffix", [".ko.xz", ".ko.gz"])
def test_compressed_modules_read_and_stored_decompressed(
    tmp_path: Path, busybox: Path, suffix: str
) -> None:
    modules = tmp_path / "modules"
    blk = add_module(modules, f"kernel/virtio_blk{suffix}", "depends=virtio")
    virtio = add_module(modules, f"kernel/virtio{suffix}", "depends=")
    add_module(modules, f"kernel/virtio_pci{suffix}", "depends=virtio")
    archive = build(modules, busybox=busybox)
    extract(archive, tmp_path / "x", "lib/modules/*")
    assert (tmp_path / "x/lib/modules/virtio_blk.ko").read_bytes() == blk
    assert (tmp_path / "x/lib/modules/virtio.ko").read_bytes() == virtio
    assert sorted(p.name for p in (tmp_path / "x/lib/modules").iterdir()) == [
        "virtio.ko",
        "virtio_blk.ko",
        "virtio_pci.ko",
    ]


def test_zstd_modules_decompressed_with_the_zstd_program(tmp_path: Path) -> None:
    zstd = require_tool("zstd", "zstd")
    elf = add_module(tmp_path, "a.ko", "depends=")
    subprocess.run([zstd, "-q", "--rm", str(tmp_path / "a.ko")], check=True)
    (module,) = resolve(tmp_path, ["a"])
    assert module.path.name == "a.ko.zst"
    assert initramfs.module_bytes(module) == elf


def test_zstd_modules_without_zstd_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "virtio_blk.ko.zst").write_bytes(b"(\xb5/\xfd")
    monkeypatch.setattr(initramfs.shutil, "which", lambda _: None)
    with pytest.raises(
        InitramfsError, match=r"virtio_blk \(.*\) is zstd-compressed"
    ) as err:
        resolve(tmp_path, ["virtio_blk"])
    assert "apt-get install zstd" in str(err.value)


def test_damaged_xz_module_named(tmp_path: Path) -> None:
    (tmp_path / "a.ko.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    with pytest.raises(InitramfsError, match=r"cannot decompress .*a\.ko\.xz"):
        resolve(tmp_path, ["a"])


# build: the archive and /init


@pytest.fixture(scope="module")
def debian_initramfs(cloud_kernel: debian.CloudKernel, busybox: Path) -> bytes:
    return build(cloud_kernel.modules_dir, busybox=busybox)


def test_archive_readable_by_cpio_with_busybox_and_modules(
    debian_initramfs: bytes,
) -> None:
    listing = cpio(debian_initramfs, "-t").split()
    dirs = ["bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys"]
    assert listing[: len(dirs) + 2] == [*dirs, "dev/console", "bin/busybox"]
    assert listing[-1] == "init"
    loaded = [Path(name).stem for name in listing if name.startswith("lib/modules/")]
    # Debian's button and evdev are modules: loaded for the ACPI power button;
    # qemu_fw_cfg and pvpanic_mmio (with pvpanic, its dependency) for dumps;
    # virtio_console for kdlab's agent, fuse and virtiofs for shares.
    assert set(loaded) == VIRTIO_CLOSURE | OPTIONAL_CLOSURE
    assert loaded.index("pvpanic") < loaded.index("pvpanic_mmio")


def test_archive_members_owned_by_root_dated_1970(debian_initramfs: bytes) -> None:
    lines = cpio(debian_initramfs, "-t", "-v", "--numeric-uid-gid").splitlines()
    console = next(line for line in lines if line.endswith(" dev/console"))
    assert console.startswith("crw-------")
    assert "5,   1" in console
    for line in lines:
        assert line.split()[2:4] == ["0", "0"], line
        assert " Jan  1  1970 " in line, line


def test_archive_holds_busybox_and_decompressed_modules(
    debian_initramfs: bytes,
    cloud_kernel: debian.CloudKernel,
    busybox: Path,
    tmp_path: Path,
) -> None:
    extract(debian_initramfs, tmp_path, "bin/busybox", "lib/modules/virtio_blk.ko")
    assert (tmp_path / "bin/busybox").read_bytes() == busybox.read_bytes()
    original = next(cloud_kernel.modules_dir.rglob("virtio_blk.ko")).read_bytes()
    assert (tmp_path / "lib/modules/virtio_blk.ko").read_bytes() == original


def test_init_loads_modules_in_order_and_passes_sh_n(
    debian_initramfs: bytes,
    cloud_kernel: debian.CloudKernel,
    busybox: Path,
    tmp_path: Path,
) -> None:
    extract(debian_initramfs, tmp_path, "init")
    init = (tmp_path / "init").read_text()
    assert init.startswith("#!/bin/busybox sh\n")
    order = resolve(
        cloud_kernel.modules_dir,
        initramfs.DEFAULT_MODULES,
        optional=initramfs.OPTIONAL_MODULES,
    )
    assert f"for module in {' '.join(names(order))}; do" in init
    assert_shell_syntax(busybox, tmp_path / "init")


def test_init_without_modules_passes_sh_n(tmp_path: Path, busybox: Path) -> None:
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules/modules.builtin").write_text(
        "kernel/virtio_pci.ko\nkernel/virtio_blk.ko\n"
    )
    extract(build(tmp_path / "modules", busybox=busybox), tmp_path / "x", "init")
    assert_shell_syntax(busybox, tmp_path / "x/init")


def test_build_is_deterministic(
    debian_initramfs: bytes, cloud_kernel: debian.CloudKernel, busybox: Path
) -> None:
    assert build(cloud_kernel.modules_dir, busybox=busybox) == debian_initramfs


def test_dynamic_busybox_refused(tmp_path: Path) -> None:
    with pytest.raises(InitramfsError, match="apt-get install busybox-static"):
        build(tmp_path, busybox=Path(sys.executable))  # dynamically linked
    with pytest.raises(InitramfsError, match="missing: apt-get install busybox-static"):
        build(tmp_path, busybox=tmp_path / "busybox")


# build_userspace: the archive of a VM without an image


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kdlab's agent, compiled as kdlabctl does."""
    try:
        return agent.build(tmp_path_factory.mktemp("agent"))
    except agent.AgentBuildError as err:
        require(False, str(err))
        raise


@pytest.fixture(scope="module")
def userspace_initramfs(
    cloud_kernel: debian.CloudKernel, busybox: Path, agent_binary: Path
) -> bytes:
    return build_userspace(cloud_kernel.modules_dir, agent_binary, busybox=busybox)


def test_userspace_archive_holds_busybox_the_agent_and_the_modules(
    userspace_initramfs: bytes, busybox: Path, agent_binary: Path, tmp_path: Path
) -> None:
    listing = cpio(userspace_initramfs, "-t").split()
    dirs = list(USERSPACE_DIRECTORIES)
    assert listing[: len(dirs) + 2] == [*dirs, "dev/console", "bin/busybox"]
    assert {"mnt", "run", "tmp", "root", "etc/acpi/PWRF"} <= set(dirs)
    assert listing[-1] == "init"
    loaded = [Path(name).stem for name in listing if name.startswith("lib/modules/")]
    # No root disk, but extra disks (virtio_blk); the agent's port
    # (virtio_console), shares (fuse, virtiofs), the power button.
    assert set(loaded) == VIRTIO_CLOSURE | OPTIONAL_CLOSURE
    assert loaded.index("virtio") < loaded.index("virtio_console")
    assert loaded.index("fuse") < loaded.index("virtiofs")
    extract(userspace_initramfs, tmp_path, AGENT, "bin/busybox", "etc/*", "init")
    assert (tmp_path / AGENT).read_bytes() == agent_binary.read_bytes()
    assert (tmp_path / AGENT).stat().st_mode & 0o111 == 0o111
    assert (tmp_path / "bin/busybox").read_bytes() == busybox.read_bytes()
    init = (tmp_path / "init").read_text()
    assert f"for module in {' '.join(loaded)}; do" in init
    assert_shell_syntax(busybox, tmp_path / "init")


def test_userspace_services_are_what_init_runs(
    userspace_initramfs: bytes, tmp_path: Path
) -> None:
    """busybox init's services run /init in a role the script has; acpid's
    handler of the power button powers off through it."""
    extract(userspace_initramfs, tmp_path, "etc/*", "init")
    init = (tmp_path / "init").read_text()
    inittab = (tmp_path / "etc/inittab").read_text().splitlines()
    respawned = [line.split(":", 3)[3] for line in inittab if "::respawn:" in line]
    assert respawned == [
        "/init agent",
        "/init shell",
        "/bin/acpid -f -l /run/acpid.log",
    ]
    for role in ("agent", "shell", "power-button"):
        assert f"\n        {role})\n" in init
    handler = tmp_path / POWER_BUTTON_HANDLER
    assert handler.read_text() == "#!/bin/sh\nexec /init power-button\n"
    assert handler.stat().st_mode & 0o111 == 0o111
    # The role that runs the agent, and PID 1's end: init after the ready line.
    assert f"\n            /{AGENT}\n            status=$?\n" in init
    assert init.rstrip().endswith(
        "ready: a shell on the console, kdlab's agent "
        "for kdlabctl exec; poweroff (or kdlabctl stop) "
        'powers off"\nexec init'
    )


def test_userspace_script_mounts_each_share_of_the_command_line(
    busybox: Path, agent_binary: Path, tmp_path: Path
) -> None:
    """The shares' part of the script, run by busybox sh with mount and mkdir
    recorded: each tag of kdlab.shares= (not after --) on /mnt/TAG, a failure
    named with mount's words, the next share mounted all the same."""
    extract(build_userspace(None, agent_binary, busybox=busybox), tmp_path, "init")
    init = (tmp_path / "init").read_text()
    start = init.index("\nshares=\n")
    shares = init[start : init.index("\nsay ", init.index("mount -t virtiofs"))]
    program = (
        init[init.index("say() {") : init.index("\n}\n") + 3]
        # mount's output is the script's: its calls go to 3, stdout.
        + "exec 3>&1\n"
        + 'mkdir() { echo "mkdir $*"; }\n'
        + 'mount() { echo "mount $*" >&3; [ "$3" != bad ] || ! echo "no $3"; }\n'
        + "cmdline='console=ttyS0 kdlab.shares=src,bad,out -- kdlab.shares=x'\n"
        + shares
    )
    done = subprocess.run(
        [busybox, "sh", "-c", program], capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines() == [
        "mkdir -p /mnt/src",
        "mount -t virtiofs src /mnt/src",
        "mkdir -p /mnt/bad",
        "mount -t virtiofs bad /mnt/bad",
        "kdlab-initramfs: cannot mount share bad on /mnt/bad: no bad",
        "mkdir -p /mnt/out",
        "mount -t virtiofs out /mnt/out",
    ]


def test_userspace_without_modules(
    busybox: Path, agent_binary: Path, tmp_path: Path
) -> None:
    """A kernel whose modules are unknown (a bzImage alone): none in the archive,
    the script loads none and still passes sh -n."""
    archive = build_userspace(None, agent_binary, busybox=busybox)
    assert not [n for n in cpio(archive, "-t").split() if n.startswith("lib/modules/")]
    extract(archive, tmp_path, "init")
    assert "for module in ; do" in (tmp_path / "init").read_text()
    assert_shell_syntax(busybox, tmp_path / "init")


def test_userspace_refuses_an_agent_that_is_not_static(
    busybox: Path, tmp_path: Path
) -> None:
    with pytest.raises(InitramfsError, match="not a static x86-64 executable"):
        build_userspace(None, Path(sys.executable), busybox=busybox)
    with pytest.raises(InitramfsError, match="cannot read"):
        build_userspace(None, tmp_path / "agent", busybox=busybox)


def test_userspace_build_is_deterministic(
    userspace_initramfs: bytes,
    cloud_kernel: debian.CloudKernel,
    busybox: Path,
    agent_binary: Path,
) -> None:
    again = build_userspace(cloud_kernel.modules_dir, agent_binary, busybox=busybox)
    assert again == userspace_initramfs


# Modules of a kernel tree


def test_modules_of_a_tree_come_from_its_modules_order(tmp_path: Path) -> None:
    """After make modules the modules lie among the objects; modules.order lists
    them (.ko before Linux 6.4, .o since); modules.builtin the built-in ones."""
    assert initramfs.tree_modules_dir(tmp_path) is None  # not built: none
    add_module(tmp_path, "drivers/virtio/virtio.ko")
    add_module(tmp_path, "drivers/char/virtio_console.ko", "depends=virtio")
    add_module(tmp_path, "fs/fuse/fuse.ko")
    add_module(tmp_path, "unlisted/stale.ko")
    (tmp_path / "modules.order").write_text(
        "drivers/virtio/virtio.o\ndrivers/char/virtio_console.ko\nfs/fuse/fuse.o\n"
    )
    (tmp_path / "modules.builtin").write_text("kernel/fs/fuse/virtiofs.ko\n")
    assert initramfs.tree_modules_dir(tmp_path) == tmp_path
    found = resolve(tmp_path, ["virtio_console", "virtiofs"], optional=["stale"])
    assert [(m.name, m.path) for m in found] == [
        ("virtio", tmp_path / "drivers/virtio/virtio.ko"),
        ("virtio_console", tmp_path / "drivers/char/virtio_console.ko"),
    ]


# The cache of built archives


def test_a_cached_archive_is_taken_without_compressing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = [initramfs.CpioEntry.file("init", b"#!/bin/sh\n")]
    cache = tmp_path / "cache"
    first = initramfs.pack(entries, cache)
    assert first == initramfs.pack(entries)
    (cached,) = cache.iterdir()

    def compress(_archive: bytes) -> bytes:
        raise AssertionError("compressed again")

    monkeypatch.setattr(initramfs, "_gzip", compress)
    assert initramfs.pack(entries, cache) == first
    other = [initramfs.CpioEntry.file("init", b"#!/bin/sh -e\n")]
    with pytest.raises(AssertionError, match="compressed again"):
        initramfs.pack(other, cache)  # another content: another archive
    assert list(cache.iterdir()) == [cached]


def test_the_cache_keeps_the_most_recently_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    archives = [
        initramfs.pack([initramfs.CpioEntry.file("init", bytes([n]))], cache)
        for n in range(initramfs.CACHE_KEEPS + 1)
    ]
    names = sorted(path.name for path in cache.iterdir())
    assert len(names) == initramfs.CACHE_KEEPS
    # The first one was used least recently: it is gone; using it makes it anew.
    assert (
        initramfs.pack([initramfs.CpioEntry.file("init", b"\0")], cache)
        == (archives[0])
    )


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    entries = [initramfs.CpioEntry.file("init", b"x")]
    assert initramfs.pack(entries, blocked / "cache") == initramfs.pack(entries)


# The cpio writer that tests.support.debian shares


def test_cpio_entries_extracted_as_written(tmp_path: Path) -> None:
    entry = initramfs.CpioEntry
    archive = initramfs.pack(
        [
            entry.directory("tmp", 0o1777),
            entry.directory("etc"),
            entry.file("etc/odd", b"three", 0o640),  # padding after 5 bytes
            entry.file("etc/empty", b""),
        ]
    )
    assert gzip.decompress(archive).startswith(b"070701")
    extract(archive, tmp_path)
    assert (tmp_path / "etc/odd").read_bytes() == b"three"
    assert (tmp_path / "etc/odd").stat().st_mode & 0o7777 == 0o640
    assert (tmp_path / "etc/empty").read_bytes() == b""
    assert cpio(archive, "-t").split() == ["tmp", "etc", "etc/odd", "etc/empty"]
