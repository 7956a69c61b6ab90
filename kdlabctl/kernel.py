"""``kdlabctl kernel ...``: configure, check and build a kernel tree for kdlab VMs.

The recipe kdlab automates (``make x86_64_defconfig``, the KVM guest fragment, debug
info and ``GDB_SCRIPTS`` on, ``DEBUG_INFO_REDUCED`` off) as three commands that work
on a source tree or an ``O=`` build directory:

- ``check``: what in a ``.config`` would stop a VM from booting or being debugged,
  with the fix for each (:mod:`kdlab.kernel.kconfig`).
- ``configure``: the recipe, or with ``--minimal`` tinyconfig plus
  :data:`MINIMAL_FRAGMENT`; either way the result passes ``check``.
- ``build``: ``make bzImage scripts_gdb`` with a progress line, the compiler's last
  words on failure, and the paths to give ``kdlabctl create``.

These commands run locally as the user and need no kdlabd: each ``cmd_*`` takes the
client like every command group's, and ignores it (``needs_daemon`` is False).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from kdlab.errors import EXIT_FAILURE, EXIT_OK
from kdlab.kernel import kconfig as rules
from kdlab.kernel.findings import Severity, errors
from kdlab.kernel.kconfig import ConfigFinding
from kdlabctl import kconfig
from kdlabctl.kconfig import KernelError

if TYPE_CHECKING:
    from kdlabctl.client import Client

__all__ = [
    "MINIMAL_FRAGMENT",
    "Artifacts",
    "KernelError",
    "KernelFiles",
    "build",
    "cmd_build",
    "cmd_check",
    "cmd_configure",
    "define",
    "tree_artifacts",
]

MINIMAL_FRAGMENT = """\
# kdlab's minimal kernel: merged into tinyconfig. Boots a whole-disk ext4 on virtio
# (or kdlab's busybox initramfs) with its console on ttyS0, runs a Debian image's
# systemd to a login prompt, powers off on ACPI, runs kdlabctl exec's commands,
# mounts shared directories, and is debuggable with gdb.

# The machine: a 64-bit PC under QEMU, KVM or TCG.
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_PCI=y
CONFIG_PCI_MSI=y

# Messages on the serial console, with symbolic oops traces.
CONFIG_PRINTK=y
CONFIG_PRINTK_TIME=y
CONFIG_BUG=y
CONFIG_KALLSYMS=y
CONFIG_TTY=y
CONFIG_UNIX98_PTYS=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y

# Starting userspace: a gzip'd initramfs, ELF and #! programs, /dev, /proc, /sys.
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_DEVTMPFS=y
CONFIG_DEVTMPFS_MOUNT=y
CONFIG_PROC_FS=y
CONFIG_PROC_SYSCTL=y
CONFIG_SYSFS=y

# The root disk: virtio-blk on virtio-pci, ext4, built in (no initramfs needed).
CONFIG_BLOCK=y
CONFIG_BLK_DEV=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_EXT4_FS=y

# systemd (README "REQUIREMENTS") and glibc; all of it is off in tinyconfig.
# BASE_FULL: Debian's sysctl.d raises kernel.pid_max past a small kernel's limit.
CONFIG_BASE_FULL=y
CONFIG_MULTIUSER=y
CONFIG_FUTEX=y
CONFIG_POSIX_TIMERS=y
CONFIG_EPOLL=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_EVENTFD=y
CONFIG_SHMEM=y
CONFIG_TMPFS=y
CONFIG_FILE_LOCKING=y
CONFIG_FHANDLE=y
CONFIG_INOTIFY_USER=y
CONFIG_ADVISE_SYSCALLS=y
CONFIG_CGROUPS=y
CONFIG_SYSVIPC=y
CONFIG_NET=y
CONFIG_UNIX=y
# IPv4 for loopback services; kdlab's VMs have no NIC, so no IPv6 to build.
CONFIG_INET=y
# CONFIG_IPV6 is not set
CONFIG_AUTOFS_FS=y
CONFIG_DMI=y
CONFIG_DMIID=y
CONFIG_RTC_CLASS=y
CONFIG_RTC_DRV_CMOS=y
# Mounted by many Debian fstabs; a kernel without them stalls the boot.
CONFIG_CONFIGFS_FS=y
CONFIG_SECURITYFS=y

# kdlabctl stop: the ACPI power button, read by systemd-logind from evdev.
CONFIG_ACPI=y
CONFIG_INPUT=y
CONFIG_ACPI_BUTTON=y
CONFIG_INPUT_EVDEV=y

# kdlabctl exec: kdlab's agent on a virtio-serial port (ptys for exec -t are
# UNIX98_PTYS above). --share: directories over virtiofs, a FUSE filesystem.
CONFIG_VIRTIO_CONSOLE=y
CONFIG_FUSE_FS=y
CONFIG_VIRTIO_FS=y

# Dumps (kdlabctl drgn, crash): the kernel's VMCOREINFO (CRASH_CORE, which
# PROC_KCORE selects) handed to QEMU through fw_cfg, pvpanic to tell kdlabd of
# a panic at once (QEMU's ISA device binds through ACPI), echo c >
# /proc/sysrq-trigger to crash on purpose, SLUB (not tinyconfig's SLOB) for
# crash.
CONFIG_SLUB=y
CONFIG_PROC_KCORE=y
CONFIG_CRASH_CORE=y
CONFIG_FW_CFG_SYSFS=y
CONFIG_PVPANIC=y
CONFIG_PVPANIC_MMIO=y
CONFIG_MAGIC_SYSRQ=y

# gdb: full DWARF, the lx-* helpers, the kernel where vmlinux says it is.
CONFIG_DEBUG_KERNEL=y
CONFIG_DEBUG_INFO=y
# CONFIG_DEBUG_INFO_NONE is not set
CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y
# CONFIG_DEBUG_INFO_REDUCED is not set
CONFIG_GDB_SCRIPTS=y
# CONFIG_RANDOMIZE_BASE is not set
"""

BZIMAGE = Path("arch/x86/boot/bzImage")
TAIL_LINES = 40
# Executables kbuild needs before it can say so itself, and their Debian packages.
BUILD_TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
}
# Headers whose absence kbuild reports only as a compiler error deep in a tool.
BUILD_HEADERS = {
    "gelf.h": "libelf-dev",  # objtool
    "openssl/opensslv.h": "libssl-dev",  # certs/extract-cert, sign-file
}


@dataclass(frozen=True)
class KernelFiles:
    """What a new VM boots, as the user names the files (kdlabctl opens them)."""

    kernel: str | None = None  # a bzImage
    tree: str | None = None  # or a built kernel tree: its bzImage and vmlinux
    vmlinux: str | None = None
    initrd: str | None = None
    modules: str | None = None  # /lib/modules/RELEASE, for kdlabctl's initramfs
    # Without an image or initrd: kdlab's userspace initramfs (False: none at all).
    initramfs: bool = True


@dataclass(frozen=True)
class Artifacts:
    """What a build left for kdlab: the kernel to boot and the files gdb wants."""

    bzimage: Path
    vmlinux: Path | None
    gdb_script: Path | None  # vmlinux-gdb.py: the lx-* helpers
    release: str  # uname -r of the build


def tree_artifacts(path: Path | str) -> Artifacts:
    """The built kernel of a source tree or ``O=`` directory, for ``kdlabctl create``.

    Raises :class:`KernelError` (saying how to build it) when nothing is built.
    """
    path = Path(path)
    tree, build = kconfig.directories(path)
    if build is None:
        raise KernelError(
            f"{path} is neither a kernel source tree nor an O= build directory"
        )
    bzimage = build / BZIMAGE
    release_file = build / "include/config/kernel.release"
    if not bzimage.is_file() or not release_file.is_file():
        hint = " (built with O=DIR? give DIR)" if tree == build else ""
        raise KernelError(
            f"no bzImage in {build}{hint}: build it first: kdlabctl kernel build {path}"
        )
    vmlinux = build / "vmlinux"
    gdb_script = build / "vmlinux-gdb.py"
    return Artifacts(
        bzimage=bzimage,
        vmlinux=vmlinux if vmlinux.is_file() else None,
        gdb_script=gdb_script if gdb_script.is_file() else None,
        release=release_file.read_text().strip(),
    )


# Running make.


@dataclass(frozen=True)
class Dirs:
    """A source tree and the directory it builds into (the tree itself, or O=)."""

    tree: Path
    build: Path

    @property
    def config(self) -> Path:
        return self.build / ".config"

    def make(self, *targets: str, jobs: int | None = None) -> list[str]:
        out = [] if self.build == self.tree else [f"O={self.build}"]
        parallel = [f"-j{jobs}"] if jobs else []
        return [
            "make",
            "-C",
            str(self.tree),
            "--no-print-directory",
            *out,
            *parallel,
            *targets,
        ]


def resolve_dirs(path: Path, out: Path | None, *, create: bool = False) -> Dirs:
    """The tree and build directory for PATH [-O OUT].

    PATH is a source tree (building in itself, or in OUT), or an ``O=`` directory.
    """
    path = path.absolute()
    if out is not None:
        if not kconfig.is_source_tree(path):
            raise KernelError(f"-O needs a kernel source tree, and {path} is none")
        out = out.absolute()
        if create:
            out.mkdir(parents=True, exist_ok=True)
        elif not out.is_dir():
            raise KernelError(f"{out} does not exist: kdlabctl kernel configure first")
        return Dirs(path, out)
    tree, build = kconfig.directories(path)
    if tree is None or build is None:
        raise KernelError(
            f"{path} is neither a kernel source tree nor an O= build directory"
        )
    return Dirs(tree, build)


def missing_build_tools() -> list[str]:
    """Debian packages whose programs or headers a kernel build lacks here."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    missing += [
        pkg
        for header, pkg in BUILD_HEADERS.items()
        if not any(
            (Path(d) / header).is_file()
            for d in ("/usr/include", "/usr/include/x86_64-linux-gnu")
        )
    ]
    return missing


def _require_build_tools() -> None:
    missing = missing_build_tools()
    if missing:
        raise KernelError(
            f"building a kernel needs {', '.join(missing)}: "
            f"apt-get install {' '.join(missing)}"
        )


async def _run(command: Sequence[str], cwd: Path | None = None) -> str:
    """Run one configuration step; its output, or a KernelError ending with it."""
    import asyncio

    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    if process.returncode != 0:
        tail = "\n".join(text.splitlines()[-TAIL_LINES:])
        raise KernelError(
            f"{shlex.join(command)} exited with status {process.returncode}:\n{tail}"
        )
    return text


# kernel check.


def check_config(location: kconfig.Location) -> list[ConfigFinding]:
    """The findings for a located ``.config``."""
    try:
        text = location.config.read_text(errors="replace")
    except OSError as err:
        raise KernelError(f"cannot read {location.config}: {err.strerror}") from None
    unbuilt = kconfig.unbuilt_gdb_scripts(location.build)
    return rules.check(rules.parse(text), unbuilt)


def format_findings(findings: Sequence[ConfigFinding]) -> str:
    """A table of severity, option and problem, each row followed by its fix."""
    from kdlabctl import output

    rows = [[f.severity.value, f.option, f.problem] for f in findings]
    lines = output.table(["SEVERITY", "OPTION", "PROBLEM"], rows).splitlines()
    indent = " " * (lines[0].index("PROBLEM"))
    text = [lines[0]]
    for line, finding in zip(lines[1:], findings, strict=True):
        text += [line, f"{indent}fix: {finding.fix}"]
    return "\n".join(text)


def summary(findings: Sequence[ConfigFinding], config: Path) -> str:
    counts = collections.Counter(f.severity for f in findings)
    parts = [f"{counts[s]} {s.value}{'' if counts[s] == 1 else 's'}" for s in Severity]
    verdict = "fails" if counts[Severity.ERROR] else "passes"
    return f"{config}: {', '.join(parts)}: {verdict} kdlab's check"


async def cmd_check(_client: Client | None, args: argparse.Namespace) -> int:
    try:
        location = kconfig.locate(args.path)
        findings = check_config(location)
    except KernelError as err:
        return _fail(err)
    if args.json:
        print(rules.report_json(findings, location.config))
    else:
        if findings:
            print(format_findings(findings))
        print(summary(findings, location.config))
    return EXIT_FAILURE if errors(findings) else EXIT_OK


# kernel configure.


def recipe_steps(dirs: Dirs, keep: bool) -> list[list[str]]:
    """The seed recipe: defconfig, the KVM guest fragment, kdlab's edits."""
    # `make kvmconfig` became the kvm_guest.config fragment in Linux 5.10.
    kvm = (
        "kvm_guest.config"
        if (dirs.tree / "kernel/configs/kvm_guest.config").is_file()
        else "kvmconfig"
    )
    edits = [
        arg
        for option, on in rules.wanted_options().items()
        for arg in ("-e" if on else "-d", option)
    ]
    start = [] if keep else [dirs.make("x86_64_defconfig"), dirs.make(kvm)]
    scripts_config = [str(dirs.tree / "scripts/config"), "--file", str(dirs.config)]
    return [*start, scripts_config + edits, dirs.make("olddefconfig")]


def fragment_misses(config: rules.Config, fragment: str) -> list[str]:
    """Options of *fragment* that the configured kernel does not have as asked:
    renamed or gone in this kernel version, or held back by a dependency."""
    wanted = rules.parse(fragment)
    unset = re.findall(r"^# (CONFIG_\w+) is not set$", fragment, re.MULTILINE)
    return [o for o, v in wanted.items() if config.get(o) != v] + [
        o for o in unset if o in config
    ]


async def configure(dirs: Dirs, *, minimal: bool, keep: bool) -> list[str]:
    """Write a ``.config`` that passes the check; return fragment options it lacks."""
    import tempfile

    if minimal:
        with tempfile.NamedTemporaryFile(
            "w", prefix="kdlab-minimal.", suffix=".config"
        ) as fragment:
            fragment.write(MINIMAL_FRAGMENT)
            fragment.flush()
            merge = [str(dirs.tree / "scripts/kconfig/merge_config.sh"), "-m"]
            # merge_config.sh writes .config (and its temporaries) in the cwd.
            await _step(dirs.make("tinyconfig"))
            await _step([*merge, ".config", fragment.name], cwd=dirs.build)
            await _step(dirs.make("olddefconfig"))
    else:
        for step in recipe_steps(dirs, keep):
            await _step(step)
    configured = rules.parse(dirs.config.read_text())
    return fragment_misses(configured, MINIMAL_FRAGMENT) if minimal else []


async def _step(command: list[str], cwd: Path | None = None) -> None:
    print(f"  {shlex.join(_short(command))}", file=sys.stderr)
    await _run(command, cwd)


def _short(command: list[str]) -> list[str]:
    """A step as a person would type it: no -C, no --no-print-directory."""
    if command[:2] == ["make", "-C"]:
        return ["make", *command[4:]]
    return command


def _check_clean_tree(dirs: Dirs) -> None:
    # Kbuild refuses an O= build from a configured tree, after its own long message.
    if dirs.build != dirs.tree and (
        (dirs.tree / ".config").exists() or (dirs.tree / "include/config").exists()
    ):
        raise KernelError(
            f"{dirs.tree} is configured in-tree, and kbuild refuses O= builds from "
            f"such a tree: run make mrproper in it (after saving its .config), or "
            f"configure without -O"
        )


def _save_old_config(dirs: Dirs) -> Path | None:
    """Keep the user's .config: each make step overwrites .config.old."""
    if not dirs.config.is_file():
        return None
    saved = dirs.build / ".config.before-kdlab"
    shutil.copy2(dirs.config, saved)
    return saved


async def cmd_configure(_client: Client | None, args: argparse.Namespace) -> int:
    try:
        dirs = resolve_dirs(Path(args.path), _path(args.out), create=True)
        _check_clean_tree(dirs)
        if args.keep_config and not dirs.config.is_file():
            raise KernelError(f"no {dirs.config} to keep: leave out --keep-config")
        _require_build_tools()
        saved = _save_old_config(dirs)
        if saved is not None:
            print(
                f"kdlabctl: the previous .config is saved as {saved}", file=sys.stderr
            )
        misses = await configure(dirs, minimal=args.minimal, keep=args.keep_config)
        findings = check_config(kconfig.locate(dirs.build))
    except KernelError as err:
        return _fail(err)
    if misses:
        print(
            "kdlabctl: warning: this kernel did not take "
            f"{', '.join(misses)} from kdlab's fragment",
            file=sys.stderr,
        )
    if errors(findings):
        print(format_findings(errors(findings)), file=sys.stderr)
        return _fail(
            KernelError(f"{dirs.config} still fails the check: set the options above")
        )
    if findings:
        print(format_findings(findings))
    print(summary(findings, dirs.config))
    return EXIT_OK


# kernel build.


def build_targets(config: rules.Config) -> list[str]:
    """bzImage and the lx-* helpers; modules when there are any."""
    targets = ["bzImage", "scripts_gdb"]
    if config.get("CONFIG_MODULES") == "y" and "m" in config.values():
        targets.append("modules")
    return targets


_KBUILD_STEP = re.compile(r"^\s{2}([A-Z][A-Z0-9_-]*)\s+(\S.*)$")


class Progress:
    """One line on a terminal: spinner, elapsed time, lines, kbuild's last step.

    Off a terminal (CI logs) it prints a plain line every 30 seconds instead.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self.lines = 0
        self.last_step = ""
        self._spinner = itertools.cycle("|/-\\")
        self._last_plain = self.start

    def feed(self, line: str) -> None:
        self.lines += 1
        if match := _KBUILD_STEP.match(line):
            self.last_step = f"{match.group(1)} {match.group(2)}"

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60}:{seconds % 60:02d}"

    def draw(self) -> None:
        status = f"{self.elapsed()}  {self.lines} lines  {self.last_step}"
        if self.tty:
            width = shutil.get_terminal_size().columns
            line = f"{next(self._spinner)} {status}"[: width - 1]
            self.stream.write(f"\r\x1b[K{line}")
            self.stream.flush()
        elif time.monotonic() - self._last_plain >= 30:
            self._last_plain = time.monotonic()
            print(f"kdlabctl: building, {status}", file=self.stream, flush=True)

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    async def tick(self) -> None:
        import asyncio

        while True:
            self.draw()
            await asyncio.sleep(0.2)


@dataclass(frozen=True)
class MakeResult:
    status: int
    tail: list[str]  # the last TAIL_LINES lines
    first_errors: list[str]  # with -j, the first error may scroll out of the tail


_ERROR = re.compile(r"\berror\b|\*\*\*")


def _is_error(line: str) -> bool:
    """A compiler's or make's error, not a kbuild step on a file named error.c."""
    return _ERROR.search(line) is not None and not _KBUILD_STEP.match(line)


async def make_with_progress(command: list[str]) -> MakeResult:
    """Run make, showing progress; its exit status and last words."""
    import asyncio

    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        limit=1 << 20,  # a long compiler line must not end the build
    )
    assert process.stdout is not None
    progress = Progress(sys.stderr)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    first_errors: list[str] = []
    ticker = asyncio.create_task(progress.tick())
    try:
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            progress.feed(line)
            tail.append(line)
            if len(first_errors) < 10 and _is_error(line):
                first_errors.append(line)
        status = await process.wait()
    finally:
        ticker.cancel()
        progress.clear()
    return MakeResult(status, list(tail), first_errors)


def _print_failure(result: MakeResult) -> None:
    earlier = [line for line in result.first_errors if line not in result.tail]
    if earlier:
        print("first errors:", *earlier, "...", sep="\n", file=sys.stderr)
    print(f"last {len(result.tail)} lines of make:", file=sys.stderr)
    print("\n".join(result.tail), file=sys.stderr)


def _describe(artifacts: Artifacts) -> str:
    rows = [
        ("bzImage", str(artifacts.bzimage)),
        ("vmlinux", str(artifacts.vmlinux or "- (missing)")),
        ("vmlinux-gdb.py", str(artifacts.gdb_script or "- (missing)")),
        ("release", artifacts.release),
    ]
    return "\n".join(f"{label + ':':<16}{value}" for label, value in rows)


async def cmd_build(_client: Client | None, args: argparse.Namespace) -> int:
    return await build(args.path, args.out, args.jobs)


async def build(path: str, out: str | None, jobs: int) -> int:
    """``make`` the tree at *path* (in ``O=`` *out*) with *jobs* jobs: an exit code."""
    try:
        dirs = resolve_dirs(Path(path), _path(out))
        findings = check_config(kconfig.locate(dirs.build))
        _require_build_tools()
    except KernelError as err:
        return _fail(err)
    if errors(findings):
        print(
            f"kdlabctl: warning: {summary(findings, dirs.config)} "
            f"(kdlabctl kernel check {path})",
            file=sys.stderr,
        )
    config = rules.parse(dirs.config.read_text(errors="replace"))
    command = dirs.make(*build_targets(config), jobs=jobs)
    print(f"  {shlex.join(_short(command))}", file=sys.stderr)
    started = time.monotonic()
    result = await make_with_progress(command)
    if result.status != 0:
        _print_failure(result)
        return _fail(KernelError(f"make exited with status {result.status}"))
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    print(f"built in {minutes}:{seconds:02d}", file=sys.stderr)
    try:
        built = tree_artifacts(dirs.build)
    except KernelError as err:
        return _fail(err)
    print(_describe(built))
    if built.vmlinux is not None:
        from kdlabctl import gdbcache

        gdbcache.warm(built.vmlinux)  # for the next `kdlabctl gdb` of this tree
    return EXIT_OK


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _fail(err: KernelError) -> int:
    print(f"kdlabctl: {err}", file=sys.stderr)
    return EXIT_FAILURE


def _jobs(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("-j needs a positive number")
    return value


def define(kernel: argparse.ArgumentParser) -> None:
    """The subcommands of ``kdlabctl kernel`` (*kernel*, the group's parser)."""
    kernel.description = __doc__.split("\n\n", 1)[0] if __doc__ else None
    verbs = kernel.add_subparsers(
        dest="kernel_command", metavar="COMMAND", required=True
    )

    def verb(name: str, fn: object, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = verbs.add_parser(
            name, help=help_text, description=help_text
        )
        sub.set_defaults(func=fn, needs_daemon=False)
        return sub

    where = "a kernel source tree, an O= build directory or a .config file"
    check = verb("check", cmd_check, "check a .config for kdlab; exit 1 on errors")
    check.add_argument("path", metavar="PATH", help=where)
    check.add_argument("--json", action="store_true", help="machine-readable output")

    configure = verb(
        "configure",
        cmd_configure,
        "write a .config that boots and debugs in kdlab "
        "(x86_64_defconfig + kvm_guest.config + debug info and gdb scripts)",
    )
    configure.add_argument("path", metavar="PATH", help="a kernel source tree")
    kind = configure.add_mutually_exclusive_group()
    kind.add_argument(
        "--minimal",
        action="store_true",
        help="tinyconfig plus only what kdlab's VMs need: builds in minutes",
    )
    kind.add_argument(
        "--keep-config",
        action="store_true",
        help="edit the existing .config instead of starting from x86_64_defconfig",
    )
    configure.add_argument(
        "-O", dest="out", metavar="DIR", help="build directory (make O=DIR)"
    )

    build = verb("build", cmd_build, "make bzImage, vmlinux and the gdb scripts (lx-*)")
    build.add_argument(
        "path", metavar="PATH", help="a kernel source tree or O= build directory"
    )
    build.add_argument(
        "-j",
        dest="jobs",
        type=_jobs,
        default=len(os.sched_getaffinity(0)),
        metavar="N",
        help="parallel jobs (default: the CPUs available)",
    )
    build.add_argument(
        "-O", dest="out", metavar="DIR", help="build directory (make O=DIR)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdlabctl.kernel ...``: the commands without kdlabctl's bus setup."""
    import asyncio

    parser = argparse.ArgumentParser(prog="kdlabctl")
    define(parser.add_subparsers(dest="command", required=True).add_parser("kernel"))
    args = parser.parse_args(argv)
    try:
        return int(asyncio.run(args.func(None, args)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
