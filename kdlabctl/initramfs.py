"""kdlab's small busybox initramfs, built as the user, in one of two modes.

- root (:func:`build`): it mounts a virtio root disk. Distribution kernels (Debian's
  cloud kernel, for one) build ``virtio_blk`` and ``virtio_pci`` as modules: booted
  directly on a virtio disk, they stop at ``VFS: Unable to mount root fs``.
- userspace (:func:`build_userspace`): a VM without an image boots into it and stays
  there: a shell on the console, kdlab's agent for ``kdlabctl exec``, the shared
  directories mounted, the kernel's modules loaded when it has them as modules.

kdlabctl builds it from the modules unpacked next to the kernel (or the modules of a
kernel tree), on the client side and as the user, and passes it to kdlabd as the initrd
descriptor like any other file of the user's.

Modules are resolved without depmod, which may not be installed: Debian's package has
no ``modules.dep`` (its postinst runs depmod), so without one the tree is indexed here
and each needed module's dependencies are read from its ``.modinfo`` ELF section.

The archive is a gzip'd newc cpio written here, deterministic (mtime 0, owned by root):
no root is needed to hold ``/dev/console``. Its ``/init``, and the lines it prints, are
:mod:`kdlab.kernel.initramfs`'s. Stdlib only, like the rest of kdlabctl's up-front
code: no libvirt, lxml or dbus-next.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kdlab.kernel.guest import (
    AGENT_DRIVERS,
    DUMP_DRIVERS,
    POWER_BUTTON_DRIVERS,
    ROOT_DISK_DRIVERS,
    ROOT_FS,
    SHARE_DRIVERS,
)
from kdlab.kernel.initramfs import (
    AGENT,
    DIRECTORIES,
    POWER_BUTTON_HANDLER,
    USERSPACE_DIRECTORIES,
    init_script,
    inittab,
    module_path,
    power_button_handler,
    userspace_script,
)

BUSYBOX = Path("/bin/busybox")
DEFAULT_MODULES = tuple(ROOT_DISK_DRIVERS.values())
"""What a virtio root disk needs: an error if the kernel has them neither way."""
ROOT_FS_MODULES = (ROOT_FS,)
"""Loaded too when they are modules; a kernel without them may mount another root."""
POWER_BUTTON_MODULES = tuple(POWER_BUTTON_DRIVERS.values())
"""Loaded when they are modules: systemd-logind powers off on the ACPI button
(a graceful ``kdlabctl stop``) only through them."""
DUMP_MODULES = tuple(DUMP_DRIVERS.values())
"""Loaded when they are modules: a dump has VMCOREINFO, and kdlabd hears of a
panic from pvpanic, only through them."""

GUEST_SERVICE_MODULES = (*AGENT_DRIVERS.values(), *SHARE_DRIVERS.values())
"""Loaded when they are modules: ``kdlabctl exec`` reaches kdlab's agent, and a
shared directory is mounted, only through them."""

OPTIONAL_MODULES = (
    *ROOT_FS_MODULES,
    *POWER_BUTTON_MODULES,
    *DUMP_MODULES,
    *GUEST_SERVICE_MODULES,
)
"""What :func:`build` loads besides the wanted modules, when they are modules."""
USERSPACE_MODULES = (*DEFAULT_MODULES, *OPTIONAL_MODULES)
"""What :func:`build_userspace` loads when they are modules; none is required (the
shell comes up without any, and the console says what is missing). virtio_blk
and ext4 are for a VM's extra disks."""

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")
MODULES_ORDER = "modules.order"


class InitramfsError(Exception):
    """The initramfs cannot be built; the message says what to do about it."""


@dataclass(frozen=True)
class Module:
    """A loadable kernel module: its name (``-`` read as ``_``) and its file."""

    name: str
    path: Path


def find_modules_dir(kernel: Path, release: str | None) -> Path | None:
    """The modules of *kernel* when it was unpacked from a distribution's package.

    For ``ROOT/boot/vmlinuz-RELEASE`` that is ``ROOT/lib/modules/RELEASE`` (or
    ``ROOT/usr/lib/modules/RELEASE``); *release* defaults to the file name's suffix.
    A kernel in a build tree (``arch/x86/boot/bzImage``) has none there: None.
    """
    candidates = [kernel.absolute()]
    if kernel.is_symlink():  # Debian's /vmlinuz points into /boot
        candidates.append(kernel.resolve())
    for path in candidates:
        if path.parent.name != "boot" or not path.name.startswith("vmlinuz"):
            continue
        version = release or path.name.partition("vmlinuz-")[2]
        root = path.parent.parent
        for modules in (root / "lib/modules", root / "usr/lib/modules"):
            if version and (modules / version).is_dir():
                return modules / version
    return None


def tree_modules_dir(build: Path) -> Path | None:
    """The modules of a kernel built in *build* (a tree or ``O=`` directory):
    *build* itself once ``make modules`` wrote ``modules.order``, else None
    (the kernel has none, or they are not built)."""
    return build if (build / MODULES_ORDER).is_file() else None


def resolve(
    modules_dir: Path, wanted: Iterable[str], optional: Iterable[str] = ()
) -> list[Module]:
    """The modules to load for *wanted*, dependencies first, each once.

    Built-in modules (``modules.builtin``) are skipped. A wanted module that is
    neither a file in *modules_dir* nor built in is an :class:`InitramfsError`; an
    *optional* one is loaded only when it is a file there.
    """
    tree = _ModuleTree.load(modules_dir)
    for name in map(_normalised, wanted):
        tree.require(name, wanted_by=None)
        tree.add(name)
    for name in map(_normalised, optional):
        if name in tree.files:
            tree.add(name)
    return tree.order


def resolve_built(
    directory: Path, wanted: Iterable[str]
) -> tuple[list[Module], list[str]]:
    """The modules built in *directory* (a kernel tree, or an out-of-tree
    module's) to load for *wanted* (every one there when none is named),
    dependencies first; and the dependencies not built there, which the
    running kernel must have (built in, or loaded)."""
    files = _index(directory)
    if not files:
        raise InitramfsError(
            f"no modules (*.ko) in {directory}: build them first "
            "(make modules, or make -C KERNEL M=DIR modules)"
        )
    names = [_normalised(name) for name in wanted] or sorted(files)
    missing = [name for name in names if name not in files]
    if missing:
        raise InitramfsError(f"no module {', '.join(missing)} is built in {directory}")
    tree = _ModuleTree(directory, files, frozenset(), _needs_from_modinfo, [], set())
    for name in names:
        tree.add(name)
    return tree.order, sorted(tree.outside or ())


def build(
    modules_dir: Path,
    wanted: Iterable[str] = DEFAULT_MODULES,
    busybox: Path = BUSYBOX,
    cache: Path | None = None,
) -> bytes:
    """A gzip'd newc initramfs that loads *wanted* and switches to the real root.

    Its ``/init`` (:mod:`kdlab.kernel.initramfs`) reads ``root=`` (default
    ``/dev/vda``; ``UUID=``/``LABEL=`` too), ``rootfstype=``, ``rootflags=``,
    ``ro``/``rw`` (read-only unless ``rw``, as the kernel does) and ``init=`` from
    the kernel command line. Whatever fails is named on the console in a
    ``kdlab-initramfs:`` line, followed by an emergency shell. *cache*: see
    :func:`pack`.
    """
    binary = static_busybox(busybox)
    modules = resolve(modules_dir, wanted, optional=OPTIONAL_MODULES)
    init = init_script([m.name for m in modules])
    return pack(_entries(DIRECTORIES, binary, modules, init), cache)


def build_userspace(
    modules_dir: Path | None,
    agent: Path,
    busybox: Path = BUSYBOX,
    cache: Path | None = None,
) -> bytes:
    """A gzip'd newc initramfs that is the whole system of a VM without a disk.

    Its ``/init`` (:func:`kdlab.kernel.initramfs.userspace_script`) loads
    :data:`USERSPACE_MODULES` from *modules_dir* when they are modules there
    (None: a kernel whose modules are unknown, everything it has is built in),
    mounts the shares of ``kdlab.shares=``, then leaves PID 1 to busybox init,
    which keeps the *agent* (kdlab's, a static binary: :mod:`kdlab.agent`)
    and a shell on the console running. *cache*: see :func:`pack`.
    """
    binary = static_busybox(busybox)
    agent_binary = _read(agent)
    if not _is_static_x86_64(agent_binary):
        raise InitramfsError(
            f"kdlab's agent {agent} is not a static x86-64 executable: remove it "
            "from the cache, kdlabctl builds it again"
        )
    modules = (
        resolve(modules_dir, (), optional=USERSPACE_MODULES) if modules_dir else []
    )
    init = userspace_script([m.name for m in modules])
    entries = _entries(
        USERSPACE_DIRECTORIES,
        binary,
        modules,
        init,
        CpioEntry.file(AGENT, agent_binary),
        CpioEntry.file("etc/inittab", inittab(), 0o644),
        CpioEntry.file(POWER_BUTTON_HANDLER, power_button_handler()),
    )
    return pack(entries, cache)


def _entries(
    directories: Iterable[str],
    busybox: bytes,
    modules: Iterable[Module],
    init: bytes,
    *files: CpioEntry,
) -> list[CpioEntry]:
    """The archive of either mode: its directories, the console's node, busybox,
    the modules, *files* and ``/init``."""
    return [
        *(CpioEntry.directory(name) for name in directories),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.file("bin/busybox", busybox),
        *(CpioEntry.file(module_path(m.name), module_bytes(m), 0o644) for m in modules),
        *files,
        CpioEntry.file("init", init),
    ]


def static_busybox(path: Path = BUSYBOX) -> bytes:
    """The bytes of *path*, which must be a static x86-64 busybox (busybox-static)."""
    try:
        binary = path.read_bytes()
    except FileNotFoundError:
        raise InitramfsError(
            f"{path} is missing: apt-get install busybox-static"
        ) from None
    except OSError as err:
        raise InitramfsError(f"cannot read {path}: {err.strerror}") from None
    if not _is_static_x86_64(binary):
        raise InitramfsError(
            f"{path} is not a static x86-64 executable (from the busybox package?):"
            " apt-get install busybox-static"
        )
    return binary


def module_bytes(module: Module) -> bytes:
    """The module's ELF object, decompressed: busybox insmod reads no compressed one."""
    data = _read(module.path)
    try:
        if module.path.name.endswith(".xz"):
            return lzma.decompress(data)
        if module.path.name.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as err:
        raise InitramfsError(f"cannot decompress {module.path}: {err}") from None
    if module.path.name.endswith(".zst"):
        return _unzstd(module)
    return data


# The cpio archive.


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive, owned by root and dated 1970."""

    name: str  # relative, e.g. "bin/busybox"; parents come earlier in the archive
    mode: int  # with the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)  # major, minor of a device node

    @classmethod
    def directory(cls, name: str, permissions: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | permissions)

    @classmethod
    def file(cls, name: str, data: bytes, permissions: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFREG | permissions, data)

    @classmethod
    def char_device(
        cls, name: str, major: int, minor: int, permissions: int = 0o600
    ) -> CpioEntry:
        return cls(name, stat.S_IFCHR | permissions, rdev=(major, minor))


def pack(entries: Iterable[CpioEntry], cache: Path | None = None) -> bytes:
    """*entries* as a gzip'd ``cpio -H newc`` archive: an initramfs for the kernel.

    With a *cache* directory, an archive packed before is taken from there: it
    is named by the digest of its uncompressed contents, so it is what packing
    would give. Compressing is most of a build's time (0.35 s of 0.45 s for
    Debian's modules); a cache that cannot be read or written is only slower.
    """
    archive = _newc(entries)
    if cache is None:
        return _gzip(archive)
    cached = cache / f"{hashlib.sha256(archive).hexdigest()}.cpio.gz"
    with contextlib.suppress(OSError):
        data = cached.read_bytes()
        os.utime(cached)  # recently used: kept by _prune
        return data
    data = _gzip(archive)
    with contextlib.suppress(OSError):
        cache.mkdir(parents=True, exist_ok=True)
        _write_atomically(cached, data)
        _prune(cache)
    return data


CACHE_KEEPS = 8
"""How many initramfs archives a cache keeps: the most recently used."""


def _gzip(archive: bytes) -> bytes:
    # gzip(1)'s default level: 9 takes twice as long (0.35 s) for 0.4 % less.
    return gzip.compress(archive, compresslevel=6, mtime=0)


def _write_atomically(path: Path, data: bytes) -> None:
    """*path* appears complete or not at all (a concurrent build writes the same)."""
    fd, temporary = tempfile.mkstemp(prefix=".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _prune(cache: Path) -> None:
    """Remove all but the :data:`CACHE_KEEPS` most recently used archives."""
    archives = sorted(
        cache.glob("*.cpio.gz"), key=lambda path: path.stat().st_mtime, reverse=True
    )
    for old in archives[CACHE_KEEPS:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


def _newc(entries: Iterable[CpioEntry]) -> bytes:
    archive = bytearray()
    trailer = CpioEntry("TRAILER!!!", 0)
    for ino, entry in enumerate([*entries, trailer], start=1):
        name = entry.name.encode() + b"\0"
        links = 2 if stat.S_ISDIR(entry.mode) else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        # namesize check
        fields = [ino, entry.mode, 0, 0, links, 0, len(entry.data), 0, 0]
        fields += [*entry.rdev, len(name), 0]
        archive += b"070701" + b"".join(b"%08X" % field for field in fields) + name
        archive += bytes(-len(archive) % 4)
        archive += entry.data
        archive += bytes(-len(archive) % 4)
    return bytes(archive)


# Finding modules and their dependencies.


@dataclass(frozen=True)
class _Needs:
    """What a module needs loaded before it: ``depends`` always, ``pre`` if there."""

    depends: tuple[str, ...]
    pre: tuple[str, ...]


@dataclass
class _ModuleTree:
    """One ``lib/modules/RELEASE``, and the load order resolved in it so far."""

    root: Path
    files: Mapping[str, Path]
    builtin: frozenset[str]
    needs: Callable[[Module], _Needs]
    order: list[Module]
    outside: set[str] | None = None
    """Dependencies not here, which the running kernel must have (built in
    or loaded); None: such a dependency is an error."""

    @classmethod
    def load(cls, root: Path) -> _ModuleTree:
        if not root.is_dir():
            raise InitramfsError(f"modules directory {root} does not exist")
        builtin = frozenset(_names_in_list(root / "modules.builtin"))
        if (root / "modules.dep").is_file():
            files, needs = _from_modules_dep(root)
        elif (root / MODULES_ORDER).is_file() and not (root / "kernel").is_dir():
            # A kernel tree (or O= directory) after make modules: the modules
            # lie among the sources, modules.order lists them.
            files, needs = _index_build(root), _needs_from_modinfo
        else:
            files, needs = _index(root), _needs_from_modinfo
        return cls(root, files, builtin, needs, [])

    def require(self, name: str, wanted_by: str | None) -> None:
        """Raise unless *name* is a module here or built in."""
        if name in self.files or name in self.builtin:
            return
        if wanted_by and self.outside is not None:
            self.outside.add(name)
            return
        if wanted_by:
            raise InitramfsError(
                f"module {wanted_by} depends on {name}, which is not in {self.root}:"
                " the modules directory is incomplete"
            )
        raise InitramfsError(
            f"module {name} is neither in {self.root} nor built into the kernel"
            f" (modules.builtin): check that {self.root} belongs to this kernel,"
            " build the kernel with it, or give an initrd of your own"
        )

    def add(self, name: str, chain: tuple[str, ...] = ()) -> None:
        """Append *name* to the order after what it needs, unless it is there."""
        if name in self.builtin or name in (self.outside or ()):
            return
        if any(m.name == name for m in self.order):
            return
        if name in chain:
            cycle = " -> ".join([*chain[chain.index(name) :], name])
            raise InitramfsError(f"modules depend on each other in a cycle: {cycle}")
        module = Module(name, self.files[name])
        needs = self.needs(module)
        for dependency in needs.depends:
            self.require(dependency, wanted_by=name)
            self.add(dependency, (*chain, name))
        for dependency in needs.pre:
            if dependency in self.files:  # a soft dependency may be absent
                self.add(dependency, (*chain, name))
        self.order.append(module)


def _normalised(name: str) -> str:
    return name.replace("-", "_")


def _is_module(file_name: str) -> bool:
    return file_name.endswith(_MODULE_SUFFIXES)


def _module_name(path: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` -> ``virtio_rng``."""
    # Module names have no dots (they become C identifiers): all after one is suffix.
    return _normalised(path.rpartition("/")[2].partition(".")[0])


def _names_in_list(path: Path) -> list[str]:
    """Module names in a list of paths such as ``modules.builtin``; [] if absent."""
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        return []
    return [_module_name(line) for line in lines if _is_module(line)]


def _index(root: Path) -> dict[str, Path]:
    """Every module file under *root* by name, preferring ``updates/`` as depmod."""
    found: list[tuple[bool, str]] = []
    for directory, _, names in os.walk(root):  # not into the build/, source/ links
        for file_name in filter(_is_module, names):
            relative = Path(directory, file_name).relative_to(root).as_posix()
            found.append((not relative.startswith("updates/"), relative))
    files: dict[str, Path] = {}
    for _, relative in sorted(found):
        files.setdefault(_module_name(relative), root / relative)
    return files


def _index_build(root: Path) -> dict[str, Path]:
    """The modules of a kernel tree by name, as its ``modules.order`` lists them
    (``drivers/char/virtio_console.o`` since Linux 6.4, ``.ko`` before)."""
    files: dict[str, Path] = {}
    for line in _read(root / MODULES_ORDER).decode().split():
        module = root / (line.removesuffix(".o").removesuffix(".ko") + ".ko")
        if module.is_file():
            files.setdefault(_module_name(line), module)
    return files


def _from_modules_dep(
    root: Path,
) -> tuple[dict[str, Path], Callable[[Module], _Needs]]:
    """Files and dependencies as depmod recorded them, with modules.softdep's."""
    files: dict[str, Path] = {}
    depends: dict[str, tuple[str, ...]] = {}
    for line in _read(root / "modules.dep").decode().splitlines():
        target, _, dependencies = line.partition(":")
        if not target.strip():
            continue
        name = _module_name(target.strip())
        files[name] = root / target.strip()
        # depmod lists the whole closure; ordering it again here is harmless.
        depends[name] = tuple(map(_module_name, dependencies.split()))
    pre = _softdeps_file(root / "modules.softdep")
    return files, lambda m: _Needs(depends[m.name], pre.get(m.name, ()))


def _softdeps_file(path: Path) -> dict[str, tuple[str, ...]]:
    """The ``pre:`` modules of each ``softdep NAME pre: ... post: ...`` line."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    pre: dict[str, tuple[str, ...]] = {}
    for line in lines:
        words = line.split()
        if len(words) > 2 and words[0] == "softdep":
            pre[_normalised(words[1])] = _pre_softdeps(" ".join(words[2:]))
    return pre


def _pre_softdeps(softdep: str) -> tuple[str, ...]:
    """``pre: a b post: c`` -> (a, b); words outside ``pre:`` are not for before."""
    names: list[str] = []
    in_pre = False
    for word in softdep.split():
        if word in ("pre:", "post:"):
            in_pre = word == "pre:"
        elif in_pre:
            names.append(_normalised(word))
    return tuple(names)


def _needs_from_modinfo(module: Module) -> _Needs:
    depends: list[str] = []
    pre: list[str] = []
    for key, value in _modinfo(module):
        if key == "depends":
            depends += [_normalised(d) for d in value.split(",") if d]
        elif key == "softdep":
            pre += _pre_softdeps(value)
    return _Needs(tuple(depends), tuple(pre))


def _modinfo(module: Module) -> list[tuple[str, str]]:
    """The ``key=value`` strings of the module's ``.modinfo`` section."""
    section = _elf64_section(module_bytes(module), ".modinfo", module.path)
    entries = (e.partition("=") for e in section.decode(errors="replace").split("\0"))
    return [(key, value) for key, separator, value in entries if separator]


# ELF.


class _Section(NamedTuple):
    name: str
    offset: int
    size: int


def _elf64_section(elf: bytes, wanted: str, path: Path) -> bytes:
    """The contents of section *wanted* of the ELF64 object *elf* (read from *path*)."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF":
        raise InitramfsError(f"{path} is not an ELF object")
    if elf[4:6] != b"\x02\x01":  # ELFCLASS64, ELFDATA2LSB
        raise InitramfsError(f"{path} is not a 64-bit little-endian ELF object")
    try:
        for section in _sections(elf):
            if section.name == wanted:
                return _contents(elf, section.offset, section.size)
    except (struct.error, ValueError, IndexError):
        raise InitramfsError(f"{path}: damaged ELF section headers") from None
    raise InitramfsError(f"{path} has no {wanted} section: is it a kernel module?")


def _sections(elf: bytes) -> list[_Section]:
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if not shoff:
        return []

    def header(index: int) -> tuple[int, int, int, int]:
        # sh_name sh_type sh_flags sh_addr sh_offset sh_size sh_link
        fields = struct.unpack_from("<IIQQQQI", elf, shoff + index * shentsize)
        return fields[0], fields[4], fields[5], fields[6]

    # With 0xff00 sections or more, the count and the name table's index are in
    # section 0 (ELF's extended numbering).
    if shnum == 0:
        shnum = header(0)[2]
    if shstrndx == 0xFFFF:
        shstrndx = header(0)[3]
    headers = [header(index) for index in range(shnum)]
    _, names_offset, names_size, _ = headers[shstrndx]
    names = _contents(elf, names_offset, names_size)
    return [
        _Section(_c_string(names, name), offset, size)
        for name, offset, size, _ in headers
    ]


def _contents(elf: bytes, offset: int, size: int) -> bytes:
    if offset + size > len(elf):
        raise ValueError("section beyond the end of the file")
    return elf[offset : offset + size]


def _c_string(table: bytes, offset: int) -> str:
    return table[offset : table.index(b"\0", offset)].decode(errors="replace")


def _is_static_x86_64(elf: bytes) -> bool:
    """Whether *elf* is a 64-bit little-endian x86-64 executable without PT_INTERP."""
    elfclass64, little_endian, em_x86_64, pt_interp = 2, 1, 62, 3
    if len(elf) < 64 or elf[:4] != b"\x7fELF":
        return False
    if elf[4] != elfclass64 or elf[5] != little_endian:
        return False
    (machine,) = struct.unpack_from("<H", elf, 0x12)
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    try:
        types = [
            struct.unpack_from("<I", elf, phoff + i * phentsize)[0]
            for i in range(phnum)
        ]
    except struct.error:
        return False
    return bool(machine == em_x86_64 and pt_interp not in types)


# Files.


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InitramfsError(f"cannot read {path}: {err.strerror}") from None


def _unzstd(module: Module) -> bytes:
    """Decompress with the zstd program: the stdlib has no zstd before Python 3.14."""
    zstd = shutil.which("zstd")
    if zstd is None:
        raise InitramfsError(
            f"module {module.name} ({module.path}) is zstd-compressed and the zstd"
            " program is missing: apt-get install zstd, or decompress the modules"
            " (zstd -d) and run depmod on them"
        )
    done = subprocess.run(
        [zstd, "-q", "-d", "-c", "--", str(module.path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip()
        raise InitramfsError(f"cannot decompress {module.path}: {error}")
    return done.stdout
