"""Boot diagnosis: what went wrong in a boot, read from its serial console log.

:func:`diagnose` takes the text of a VM's console log and what kdlab knows about
the VM (:class:`BootFacts`) and names the problem, if there is one, as a
:class:`Diagnosis`: a stable code, a one-line cause, a one-line fix, and the log
lines it is based on. It is a pure function, so that every case can be tested on
recorded logs: no I/O, no clock, no libvirt.

The rules form one ordered table (``_MATCHERS``), one small matcher per problem,
most specific first; the first that recognizes the boot wins. Two principles
shape them:

- The first failure of a boot is the cause; what follows is a consequence. An
  Oops in a disk driver is reported as the Oops, not as the missing root device
  it leads to, and a panic that follows an Oops ("Fatal exception") is part of
  the Oops.
- The kernel's message says *what* failed; the facts say *why*. "VFS: Unable to
  mount root fs" is the same text whether the VM has no disk, the kernel has no
  virtio_blk, or root= names the wrong disk; the VM's disks, its initrd and the
  partition list the kernel printed tell these apart.

Logs are read as they come from a serial port: CRLF or LF, terminal escapes
(busybox's shell asks for the cursor position with ESC[6n), printk timestamps or
none, kernel messages glued to the end of a shell prompt, a log cut off at any
point. A log may hold several boots (a guest that reboots keeps its QEMU process
and its log); the last boot is diagnosed first. Only the start and the end of a
very large log are read: everything diagnosed here is printed early in a boot
or at its end.

The kernel messages matched are those of Linux 6.1 (``init/do_mounts.c``,
``init/main.c``, ``kernel/panic.c``, ``arch/x86/kernel/dumpstack.c``), checked
against logs recorded from Debian's 6.1 kernel under QEMU
(``tests/golden/consoles``), and those of kdlab's own initramfs
(``kdlabctl/initramfs.py``), whose wording a test keeps in step.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

DEFAULT_PATIENCE = 10.0
"""Seconds a running VM may stay silent (or wait for its root disk) before
:func:`diagnose` calls it a failure rather than a boot still under way."""

MAX_EVIDENCE = 8
"""At most this many log lines are quoted as a diagnosis's evidence."""

HEAD_SIZE = 1 << 20
TAIL_SIZE = 2 << 20
"""The parts of a large log that are read (characters of a string, bytes of a
file): root-mount and console problems show within the first few hundred
kilobytes of a boot, crashes at its end."""


class Severity(enum.StrEnum):
    """How bad a finding is: an ``error`` stops the boot or the kernel."""

    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


class Code(enum.StrEnum):
    """What was found. The values are stable: clients may match on them."""

    NO_CONSOLE_OUTPUT = "no-console-output"
    ROOT_NO_DISK = "root-no-disk"
    ROOT_DRIVER_MISSING = "root-driver-missing"
    ROOT_DEVICE_MISSING = "root-device-missing"
    ROOT_PARTITIONED = "root-partitioned"
    ROOT_FS_MISSING = "root-fs-missing"
    ROOT_MOUNT_FAILED = "root-mount-failed"
    ROOT_INVALID = "root-invalid"
    DEVTMPFS_MISSING = "devtmpfs-missing"
    INITRAMFS_MODULE_FAILED = "initramfs-module-failed"
    INITRD_INVALID = "initrd-invalid"
    INIT_MISSING = "init-missing"
    INIT_DIED = "init-died"
    KERNEL_OOPS = "kernel-oops"
    KERNEL_BUG = "kernel-bug"
    KERNEL_STALL = "kernel-stall"
    KERNEL_PANIC = "kernel-panic"
    KERNEL_WARNING = "kernel-warning"
    GDB_KASLR = "gdb-kaslr"


# What anyone may read of a diagnosis: the cause without the guest's words.
# A cause quotes the console (a panic message, a task name, a path), which
# only those who may read the VM's log may see.
SUMMARIES: dict[Code, str] = {
    Code.NO_CONSOLE_OUTPUT: "the kernel printed nothing on the serial console",
    Code.ROOT_NO_DISK: "root= names a disk but the VM has none",
    Code.ROOT_DRIVER_MISSING: "the kernel has no driver for the root disk",
    Code.ROOT_DEVICE_MISSING: "the root device does not exist",
    Code.ROOT_PARTITIONED: "root= names a whole disk that is partitioned",
    Code.ROOT_FS_MISSING: "the kernel cannot read the root filesystem",
    Code.ROOT_MOUNT_FAILED: "the root filesystem could not be mounted",
    Code.ROOT_INVALID: "root= is not a device the kernel understands",
    Code.DEVTMPFS_MISSING: "the kernel has no devtmpfs",
    Code.INITRAMFS_MODULE_FAILED: "the initramfs could not load a module",
    Code.INITRD_INVALID: "the initrd is not one the kernel can unpack",
    Code.INIT_MISSING: "no init program was found",
    Code.INIT_DIED: "init exited",
    Code.KERNEL_OOPS: "kernel oops",
    Code.KERNEL_BUG: "kernel bug",
    Code.KERNEL_STALL: "the kernel is stuck",
    Code.KERNEL_PANIC: "kernel panic",
    Code.KERNEL_WARNING: "the kernel warned",
    Code.GDB_KASLR: "KASLR is on while a debugger is expected",
}


@dataclass(frozen=True)
class Diagnosis:
    """One problem of a boot, and what to do about it."""

    code: Code
    severity: Severity
    cause: str
    """One line: what went wrong, with the names involved (``root=/dev/sda``)."""
    fix: str
    """One line: what to change (``use root=/dev/vda``)."""
    evidence: tuple[str, ...] = ()
    """Up to :data:`MAX_EVIDENCE` lines of the log the diagnosis is based on."""
    fix_quotes_console: bool = False
    """The fix names something only the console said (a filesystem type, a
    device): it is then its owner's to read, like the cause."""

    @property
    def summary(self) -> str:
        """The cause as anyone may read it: no text of the guest's console."""
        return SUMMARIES[self.code]

    def public_fix(self, name: str) -> str:
        """The fix as anyone may read it: a crash's fix names the code location
        the console reported, so only the way to the report is public."""
        if self.code in _CRASHES:
            return f"its owner reads the report: kdlabctl logs {name}"
        if self.fix_quotes_console:
            return f"its owner reads the fix: kdlabctl show {name}"
        return self.fix


_CRASHES = frozenset(
    {
        Code.KERNEL_OOPS,
        Code.KERNEL_BUG,
        Code.KERNEL_STALL,
        Code.KERNEL_PANIC,
        Code.KERNEL_WARNING,
    }
)


@dataclass(frozen=True)
class BootFacts:
    """What kdlab knows about the VM whose boot is diagnosed."""

    cmdline: str
    """The effective kernel command line (see :mod:`kdlabd.core.cmdline`)."""
    disks: tuple[str, ...]
    """The VM's disk targets in order, e.g. ``("vda",)``; ``()`` without a disk."""
    has_initrd: bool
    gdbstub: bool
    seconds_since_start: float
    """How long the guest's CPUs have run in this boot: time spent paused
    (waiting for gdb, stopped at a breakpoint) does not count."""
    running: bool
    """The guest's CPUs run (False: it stopped or crashed, or it is paused)."""
    name: str = ""
    """The VM's name, for the commands a fix suggests (``NAME`` when empty)."""
    paused: bool = False
    """The guest's CPUs wait (for gdb, at a breakpoint): the boot is not over."""

    @property
    def over(self) -> bool:
        """Whether the boot has ended (the VM stopped or crashed)."""
        return not self.running and not self.paused


def diagnose(
    log: str, facts: BootFacts, *, patience: float = DEFAULT_PATIENCE
) -> Diagnosis | None:
    """The problem the console *log* of a boot shows, or None when it shows none.

    *patience* is how many seconds a running VM may print nothing (or wait for
    its root device) before that counts as a failure.
    """
    boots = _split_boots(_lines(_excerpt(log)))
    command_line = _CommandLine.parse(facts.cmdline)
    for age, boot in enumerate(reversed(boots)):
        context = _Context(_Boot(boot), facts, command_line, patience, latest=age == 0)
        found = _first_match(context)
        if found is None:
            continue
        if age == 0:
            return found
        # The VM rebooted (on_reboot=restart) into the same kernel and command
        # line, so a fatal problem of an earlier boot is still this VM's problem.
        if found.severity is Severity.ERROR:
            cause = f"{found.cause} (in an earlier boot; the VM has rebooted since)"
            return dataclasses.replace(found, cause=cause)
    return None


def read_console_log(path: Path) -> str:
    """The parts of the console log at *path* that :func:`diagnose` reads.

    A log can grow without bound (a guest printing in a loop); only its first
    :data:`HEAD_SIZE` and last :data:`TAIL_SIZE` bytes are read.
    """
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        if size <= HEAD_SIZE + TAIL_SIZE:
            data = file.read()
        else:
            head = file.read(HEAD_SIZE)
            file.seek(size - TAIL_SIZE)
            data = head + b"\n" + file.read()
    return data.decode("utf-8", errors="replace")


# Reading a serial console log.


@dataclass(frozen=True)
class _Line:
    """One line of the log: the message alone, and the line as evidence shows it."""

    text: str
    shown: str


# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC strings, and
# two-byte escapes such as ESC c (reset, which SeaBIOS prints); a lone ESC at
# the end of a truncated log too. A string never runs past its line, so that a
# stray ESC P in a garbled log cannot swallow the rest of it.
_ESCAPE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(?:\x07|\x1b\\)?"
    r"|[PX^_][^\x1b\n]*(?:\x1b\\)?|[ -/]*[0-~])?"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# printk's "[%5lu.%06lu]", with CONFIG_PRINTK_CALLER's "[    T1]" after it.
_TIMESTAMP = re.compile(r"\[\s*\d+\.\d{6}\](?:\[\s*[CT]\d+\])?")


def _excerpt(log: str) -> str:
    if len(log) <= HEAD_SIZE + TAIL_SIZE:
        return log
    return log[:HEAD_SIZE] + "\n" + log[-TAIL_SIZE:]


def _lines(log: str) -> list[_Line]:
    text = _ESCAPE.sub("", log.replace("\r\n", "\n").replace("\r", "\n"))
    lines: list[_Line] = []
    for raw in text.split("\n"):
        line = _CONTROL.sub("", raw)
        # A kernel message printed while a shell waits for input ends up on the
        # prompt's line ("/ # [    2.28] tsc: ..."): split before each stamp.
        starts = [m.start() for m in _TIMESTAMP.finditer(line) if m.start() > 0]
        for begin, end in zip([0, *starts], [*starts, len(line)], strict=True):
            part = line[begin:end]
            stamp = _TIMESTAMP.match(part)
            message = part[stamp.end() :] if stamp else part
            lines.append(_Line(message.strip(), part.rstrip()))
    return lines


def _split_boots(lines: list[_Line]) -> list[list[_Line]]:
    """The log's boots, split before each kernel banner; never empty."""
    starts = [
        i for i, line in enumerate(lines) if line.text.startswith("Linux version ")
    ]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [lines[a:b] for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]


# The command line.


@dataclass(frozen=True)
class _CommandLine:
    """The kernel's parameters (words before ``--``); the last of a key wins."""

    params: dict[str, str]
    flags: frozenset[str]
    consoles: tuple[str, ...]
    """Every ``console=`` in order: the kernel prints on all of them."""

    @classmethod
    def parse(cls, cmdline: str) -> _CommandLine:
        params: dict[str, str] = {}
        flags: set[str] = set()
        consoles: list[str] = []
        # The kernel's own splitting: blanks separate, double quotes group.
        for word in re.findall(r'(?:[^\s"]|"[^"]*")+', cmdline):
            if word == "--":
                break
            key, equals, value = word.partition("=")
            if equals:
                params[key] = value.replace('"', "")
                if key == "console":
                    consoles.append(params[key])
            else:
                flags.add(key)
        return cls(params, frozenset(flags), tuple(consoles))

    @property
    def root(self) -> str | None:
        return self.params.get("root")

    @property
    def root_device(self) -> str | None:
        """``vda`` for ``root=/dev/vda``; None for a tag (``UUID=``) or a number."""
        root = self.root
        if root is None or not root.startswith("/dev/"):
            return None
        return root.removeprefix("/dev/") or None

    @property
    def root_tag(self) -> str | None:
        """``UUID`` for ``root=UUID=...`` (also LABEL, PARTUUID, PARTLABEL)."""
        tag, equals, _ = (self.root or "").partition("=")
        return (
            tag
            if equals and tag in ("UUID", "LABEL", "PARTUUID", "PARTLABEL")
            else None
        )

    @property
    def serial_console(self) -> bool:
        """Whether the kernel is told to print on the first serial port."""
        # console=ttyS0[,115200n8], or the 8250 by its I/O port.
        early = ("uart,io,0x3f8", "uart8250,io,0x3f8")
        return any(
            c.split(",")[0] == "ttyS0" or c.startswith(early) for c in self.consoles
        )

    @property
    def quiet(self) -> bool:
        level = self.params.get("loglevel", "")
        return "quiet" in self.flags or (level.isdigit() and int(level) <= 4)


# Block devices.

# printk_all_partitions(): "fe00      65536 vda " (the device number as
# %02x%02x, or %03x:%05x when larger), partitions indented, each disk followed by
# " driver: NAME" or " (driver?)", which 6.1 prints as a line of its own.
_PARTITION_ROW = re.compile(
    r"^(?:[0-9a-f]{4}|[0-9a-f]{3}:[0-9a-f]{5})\s+(?P<kib>\d+)\s+(?P<name>[a-z]\S*)"
)
_PARTITION_LIST = (
    'Please append a correct "root=" boot option; here are the available partitions:',
    "List of all partitions:",
)
# A disk's partition scan: " vda: vda1 vda2 < vda5 >".
_PARTITION_SCAN = re.compile(r"^(?P<disk>[a-z][a-z0-9]*): (?P<parts>[a-z0-9<> ]+)$")
# A driver naming its disk: "virtio_blk virtio0: [vda] 131072 512-byte logical
# blocks (67.1 MB/64.0 MiB)"; sd prints the same.
_DISK_PROBED = re.compile(r"\[(?P<name>[a-z][a-z0-9]*)\] \d+ \d+-byte logical blocks")
_DEVICE_NAME = re.compile(r"[a-z][a-z0-9]*")
_PSEUDO_DISK = re.compile(r"(?:loop|ram|zram|nbd|sr|fd|nullb)\d+")


def _partition_of(name: str, disk: str) -> bool:
    """Whether *name* is a partition of *disk*: vda1 of vda, nvme0n1p2 of nvme0n1."""
    rest = name.removeprefix(disk)
    if rest == name or not rest:
        return False
    if disk[-1].isdigit():
        return rest.startswith("p") and rest[1:].isdigit()
    return rest.isdigit()


@dataclass(frozen=True)
class _Devices:
    """Block devices a boot showed, with sizes in KiB where the kernel gave them."""

    sizes: dict[str, int]

    def __contains__(self, name: object) -> bool:
        return name in self.sizes

    def disks(self) -> list[str]:
        return [
            n for n in self.sizes if not any(_partition_of(n, d) for d in self.sizes)
        ]

    def partitions(self, disk: str) -> list[str]:
        return [n for n in self.sizes if _partition_of(n, disk)]

    def best_root(self, disk: str) -> str:
        """The device to mount as root on *disk*: its largest partition, or itself.

        Largest, not first: cloud images keep small boot partitions (vda14,
        vda15) beside the root.
        """
        parts = self.partitions(disk)
        return max(parts, key=lambda p: self.sizes[p]) if parts else disk


# Crashes.

_PANIC = re.compile(r"^Kernel panic - not syncing: ?(?P<reason>.*)$")
_BUG_AT = re.compile(r"^kernel BUG at (?P<where>\S+?)!?$")
_BUG = re.compile(r"^(?:\S+: )?BUG: (?P<what>.+)$")
# These BUG: lines open an Oops (a fault in kernel mode), not a bug check.
_FAULT_BUG = re.compile(
    r"^(?:kernel NULL pointer dereference|unable to handle (?:page fault|kernel))"
)
# die()'s header: "Oops: 0000 [#1] PREEMPT SMP NOPTI", "general protection
# fault, probably for non-canonical address 0x...: 0000 [#1] ...".
_DIE = re.compile(r"^[A-Za-z][A-Za-z ]*(?:,[^:]*)?: [0-9a-f]{4} \[#\d+\]")
_DIE_TAIL = re.compile(r": [0-9a-f]{4} \[#\d+\].*$")
_STALL = re.compile(
    r"^(?:INFO: task \S+ blocked for more than \d+ seconds"
    r"|rcu: INFO: \S+ (?:self-)?detected stall"
    r"|(?:watchdog: )?BUG: soft lockup"
    r"|(?:NMI )?watchdog: Watchdog detected hard LOCKUP)"
)
_WARN_AT = re.compile(r"^WARNING: CPU: \d+ PID: \d+ at (?P<file>\S+) (?P<where>\S+)")
# lockdep and RCU checks: "WARNING: possible circular locking dependency
# detected" under a row of "=".
_WARN_CHECK = re.compile(r"^WARNING: (?P<what>.+)$")
_KERNEL_RIP = re.compile(r"^RIP: 0010:(?P<where>\S+)")
_COMM = re.compile(r"^CPU: \d+ PID: \d+ Comm: (?P<comm>\S+)")
# Lines of a crash report that a reader of the evidence does not need.
_REPORT_NOISE = re.compile(
    r"^(?:Hardware name:|Code:|Modules linked in:|</?TASK>|dump_stack|panic\+"
    r"|#PF: error_code|PGD |(?:[A-Z0-9]{2,3}|ORIG_RAX): +[0-9a-f]{4,}"
    r"|[A-Z]S: |CR\d: |RSP: |$)"
)


@dataclass(frozen=True)
class _Crash:
    """The first sign of a kernel crash in a boot."""

    index: int
    code: Code
    headline: str


def _crash_code(text: str) -> Code | None:
    """The kind of crash whose report starts with *text*, if one does."""
    if _STALL.match(text):
        return Code.KERNEL_STALL
    if _BUG_AT.match(text):
        return Code.KERNEL_BUG
    bug = _BUG.match(text)
    if bug:
        return Code.KERNEL_OOPS if _FAULT_BUG.match(bug["what"]) else Code.KERNEL_BUG
    if _DIE.match(text):
        return Code.KERNEL_OOPS
    if _PANIC.match(text):
        return Code.KERNEL_PANIC
    return None


# What a serial port shows that is neither the guest kernel nor its programs:
# SeaBIOS (which copies the screen to the serial port when a VM has no display),
# the kernel's real-mode setup and decompressor.
_FIRMWARE = re.compile(
    r"^(?:SeaBIOS|Booting from |Probing EDD|iPXE|Machine UUID|Press ESC"
    r"|Decompressing Linux|Parsing ELF|Performing relocations|Booting the kernel"
    r"|early console in|$)"
)


class _Boot:
    """One boot's lines, and what several matchers ask of them, found once."""

    def __init__(self, lines: Sequence[_Line]) -> None:
        self.lines = lines

    def find(
        self, pattern: re.Pattern[str], start: int = 0, stop: int | None = None
    ) -> list[tuple[int, re.Match[str]]]:
        stop = len(self.lines) if stop is None else min(stop, len(self.lines))
        return [
            (i, m)
            for i in range(max(0, start), stop)
            if (m := pattern.match(self.lines[i].text)) is not None
        ]

    def last(
        self, pattern: re.Pattern[str], start: int = 0, stop: int | None = None
    ) -> tuple[int, re.Match[str]] | None:
        found = self.find(pattern, start, stop)
        return found[-1] if found else None

    def shown(self, indices: Iterable[int]) -> tuple[str, ...]:
        """The lines at *indices* as evidence: in order, once, the first eight."""
        chosen = sorted({i for i in indices if 0 <= i < len(self.lines)})
        return tuple(self.lines[i].shown for i in chosen[:MAX_EVIDENCE])

    def said(self, prefix: str, start: int, stop: int) -> list[int]:
        return [
            i
            for i in range(max(0, start), min(stop, len(self.lines)))
            if self.lines[i].text.startswith(prefix)
        ]

    @cached_property
    def silent(self) -> bool:
        """Whether only firmware spoke: the kernel printed no line."""
        return all(_FIRMWARE.match(line.text) for line in self.lines)

    @cached_property
    def crash(self) -> _Crash | None:
        for index, line in enumerate(self.lines):
            code = _crash_code(line.text)
            if code is not None:
                # "...: 0000 [#1] PREEMPT SMP NOPTI": the code and the config.
                headline = _DIE_TAIL.sub("", line.text)
                return _Crash(index, code, headline)
        return None

    @cached_property
    def partition_list(self) -> tuple[int, list[int], _Devices] | None:
        """The kernel's last list of all partitions: its header, rows, devices."""
        headers = [
            i for i, line in enumerate(self.lines) if line.text in _PARTITION_LIST
        ]
        if not headers:
            return None
        rows: list[int] = []
        sizes: dict[str, int] = {}
        for index in range(headers[-1] + 1, len(self.lines)):
            text = self.lines[index].text
            row = _PARTITION_ROW.match(text)
            if row:
                rows.append(index)
                sizes[row["name"]] = int(row["kib"])
            elif text and text != "(driver?)" and not text.startswith("driver: "):
                break
        return headers[-1], rows, _Devices(sizes)

    @cached_property
    def partition_scans(self) -> dict[str, list[str]]:
        """Each disk's partitions as its partition scan printed them."""
        scans: dict[str, list[str]] = {}
        for _, scan in self.find(_PARTITION_SCAN):
            disk = scan["disk"]
            # A disk whose name ends in a digit shows "nvme0n1: p1" for nvme0n1p1.
            short = disk[-1].isdigit()
            parts = [
                disk + p if short and p.startswith("p") else p
                for p in scan["parts"].split()
                if p not in ("<", ">")
            ]
            if parts and all(_partition_of(p, disk) for p in parts):
                scans[disk] = parts
        return scans

    @cached_property
    def seen(self) -> _Devices:
        """Block devices named anywhere: the partition list, probes, scans."""
        listed = self.partition_list
        sizes = dict(listed[2].sizes) if listed else {}
        for index in range(len(self.lines)):
            probed = _DISK_PROBED.search(self.lines[index].text)
            if probed:
                sizes.setdefault(probed["name"], 0)
        for disk, parts in self.partition_scans.items():
            for name in (disk, *parts):
                sizes.setdefault(name, 0)
        return _Devices(sizes)


# Matching.


@dataclass(frozen=True)
class _Context:
    """A boot being diagnosed, with the facts; *latest*: the log's last boot."""

    boot: _Boot
    facts: BootFacts
    cmd: _CommandLine
    patience: float
    latest: bool

    @property
    def name(self) -> str:
        return self.facts.name or "NAME"

    @property
    def panic(self) -> tuple[int, str] | None:
        """The panic that is this boot's first crash: its line and its reason."""
        crash = self.boot.crash
        if crash is None or crash.code is not Code.KERNEL_PANIC:
            return None
        return crash.index, crash.headline.partition(": ")[2]

    def crashed_before(self, index: int) -> bool:
        crash = self.boot.crash
        return crash is not None and crash.index < index

    @property
    def overdue(self) -> bool:
        """Whether the running VM has had the time any boot step may take."""
        facts = self.facts
        return (
            self.latest
            and not facts.over
            and facts.seconds_since_start >= self.patience
        )


_Matcher = Callable[[_Context], Diagnosis | None]


def _first_match(context: _Context) -> Diagnosis | None:
    for matcher in _MATCHERS:
        found = matcher(context)
        if found is not None:
            return found
    return None


def _error(code: Code, cause: str, fix: str, evidence: tuple[str, ...]) -> Diagnosis:
    return Diagnosis(code, Severity.ERROR, cause, fix, evidence)


# No output.


def _no_console_output(ctx: _Context) -> Diagnosis | None:
    facts = ctx.facts
    if not ctx.latest or not ctx.boot.silent:
        return None
    # A boot still under way (running, or paused for the debugger) has its
    # patience of running time to print something.
    if not facts.over and facts.seconds_since_start < ctx.patience:
        return None
    if not facts.over:
        seconds = facts.seconds_since_start
        when = (
            f"no kernel message on the serial console after {seconds:.0f} s of running"
        )
    else:
        when = "the VM stopped before the kernel printed anything on the serial console"
    evidence = ctx.boot.shown(i for i, line in enumerate(ctx.boot.lines) if line.text)
    if not ctx.cmd.serial_console:
        consoles = " ".join(f"console={c}" for c in ctx.cmd.consoles)
        where = f"{consoles} prints elsewhere" if consoles else "no console= at all"
        return _error(
            Code.NO_CONSOLE_OUTPUT,
            f"{when}: console=ttyS0 is missing from the command line ({where})",
            "add console=ttyS0 to the command line: kdlab logs the first serial port",
            evidence,
        )
    if ctx.cmd.quiet and not facts.over:
        # quiet keeps the kernel silent unless something goes wrong, and a quiet
        # init may print nothing either: not a failure by itself.
        return Diagnosis(
            Code.NO_CONSOLE_OUTPUT,
            Severity.NOTE,
            f"{when}, but quiet (or a low loglevel=) hides the kernel's messages",
            "drop quiet and loglevel= from the command line to see the boot",
            evidence,
        )
    return _error(
        Code.NO_CONSOLE_OUTPUT,
        f"{when} although console=ttyS0 is set: the kernel has no 8250 serial "
        "console, or it stops before its console starts",
        "set CONFIG_SERIAL_8250=y and CONFIG_SERIAL_8250_CONSOLE=y; add "
        "earlyprintk=serial,ttyS0,115200 to see where it stops",
        evidence,
    )


# The root filesystem: why the kernel, or an initramfs, mounted none.

_FS_CONFIG = {
    "ext2": "CONFIG_EXT4_FS",
    "ext3": "CONFIG_EXT4_FS",
    "ext4": "CONFIG_EXT4_FS",
    "xfs": "CONFIG_XFS_FS",
    "btrfs": "CONFIG_BTRFS_FS",
    "vfat": "CONFIG_VFAT_FS",
    "f2fs": "CONFIG_F2FS_FS",
    "erofs": "CONFIG_EROFS_FS",
    "squashfs": "CONFIG_SQUASHFS",
    "iso9660": "CONFIG_ISO9660_FS",
    "9p": "CONFIG_9P_FS",
    "virtiofs": "CONFIG_VIRTIO_FS",
}
DEFAULT_ROOT_FS = "ext4"
"""What kdlab's images hold: assumed when the command line has no rootfstype=."""

_ERRNO_MEANING = {
    -2: "no such device node",
    -6: "no such device",
    -19: "no such filesystem type",
    -22: "no filesystem the kernel knows",
}


def _fs_config(fstype: str) -> str:
    return _FS_CONFIG.get(fstype, f"CONFIG_{fstype.upper()}_FS") + "=y"


def _error_text(error: int | None) -> str:
    if error is None:
        return ""
    meaning = _ERRNO_MEANING.get(error) or os.strerror(-error).lower()
    return f" (error {error}: {meaning})"


@dataclass(frozen=True)
class _RootAttempt:
    """What a boot showed about its root device, for :func:`_explain_root`."""

    devices: _Devices
    evidence: tuple[str, ...]
    error: int | None = None
    """The errno of the kernel's failed mount."""
    fstypes: tuple[str, ...] = ()
    """The filesystems the kernel tried or has, when the log says."""
    fstype: str | None = None
    """The type a mount was asked for, when the log says (else rootfstype=)."""
    device: str | None = None
    """The device a mount was tried on, when the log says (else root=)."""


def _explain_root(ctx: _Context, attempt: _RootAttempt) -> Diagnosis:
    """Why no root was mounted, from the devices the boot showed and the facts."""
    facts, cmd, devices, evidence = (
        ctx.facts,
        ctx.cmd,
        attempt.devices,
        attempt.evidence,
    )
    root_text = f"root={cmd.root}" if cmd.root else "no root= on the command line"
    if not facts.disks:
        return _error(
            Code.ROOT_NO_DISK,
            f"the VM has no disk, so there is no root device ({root_text})",
            "give the VM a root disk: kdlabctl create --image IMAGE (it is /dev/vda)",
            evidence,
        )
    visible = [d for d in facts.disks if d in devices]
    if not visible:
        return _driver_missing(ctx, root_text, evidence)
    suggestion = f"root=/dev/{devices.best_root(visible[0])}"
    if cmd.root is None and attempt.device is None:
        return _error(
            Code.ROOT_DEVICE_MISSING,
            f"{root_text}: the kernel does not know which disk holds the root",
            f"add {suggestion} to the command line",
            evidence,
        )
    device = attempt.device or cmd.root_device
    if device is None:
        return _tagged_root(ctx, suggestion, evidence)
    if device not in devices:
        return _device_missing(ctx, device, devices, evidence)
    if device in devices.disks() and devices.partitions(device):
        parts = " ".join(devices.partitions(device))
        return _error(
            Code.ROOT_PARTITIONED,
            f"root=/dev/{device} is a partitioned disk ({parts}), not a filesystem",
            f"use root=/dev/{devices.best_root(device)}, or boot a whole-disk image",
            evidence,
        )
    return _mount_failed(ctx, device, attempt)


def _driver_missing(
    ctx: _Context, root_text: str, evidence: tuple[str, ...]
) -> Diagnosis:
    disks = ", ".join(f"/dev/{d}" for d in ctx.facts.disks)
    if ctx.facts.has_initrd:
        why = "the initramfs did not load virtio_pci and virtio_blk"
    else:
        why = "virtio_blk and virtio_pci are not built in, and no initramfs loads them"
    also = ""
    root = ctx.cmd.root_device
    if root is not None and not any(
        root == d or _partition_of(root, d) for d in ctx.facts.disks
    ):
        also = f"; {root_text} names none of its disks either"
    return _error(
        Code.ROOT_DRIVER_MISSING,
        f"the kernel does not see the VM's disk {disks}: {why}{also}",
        "set CONFIG_VIRTIO_BLK=y and CONFIG_VIRTIO_PCI=y, or create the VM with "
        "--modules DIR (an initramfs that loads them)",
        evidence,
    )


def _tagged_root(
    ctx: _Context, suggestion: str, evidence: tuple[str, ...]
) -> Diagnosis:
    if ctx.cmd.root_tag in ("UUID", "LABEL") and not ctx.facts.has_initrd:
        return _error(
            Code.ROOT_DEVICE_MISSING,
            f"root={ctx.cmd.root} needs an initramfs: the kernel alone finds only "
            "root=/dev/NAME and root=PARTUUID=",
            f"use {suggestion}, or create the VM with --modules DIR (an initramfs)",
            evidence,
        )
    return _error(
        Code.ROOT_DEVICE_MISSING,
        f"no disk of the VM matches root={ctx.cmd.root}",
        f"use {suggestion}, or check the image's identifiers (blkid)",
        evidence,
    )


def _device_missing(
    ctx: _Context, device: str, devices: _Devices, evidence: tuple[str, ...]
) -> Diagnosis:
    parent = next((d for d in devices.disks() if _partition_of(device, d)), None)
    if parent is not None and not devices.partitions(parent):
        return _error(
            Code.ROOT_DEVICE_MISSING,
            f"root=/dev/{device} but /dev/{parent} has no partitions "
            "(a whole-disk image)",
            f"use root=/dev/{parent}",
            evidence,
        )
    disks = [d for d in ctx.facts.disks if d in devices]
    target = parent or disks[0]
    what = "disk is" if len(disks) == 1 else "disks are"
    names = ", ".join(f"/dev/{d}" for d in disks)
    return _error(
        Code.ROOT_DEVICE_MISSING,
        f"root=/dev/{device} but the VM's {what} {names}",
        f"use root=/dev/{devices.best_root(target)}",
        evidence,
    )


def _mount_failed(ctx: _Context, device: str, attempt: _RootAttempt) -> Diagnosis:
    named = attempt.fstype or ctx.cmd.params.get("rootfstype")
    fstype = named or DEFAULT_ROOT_FS
    found = _mount_failure(device, fstype, named, attempt)
    # The fix of a missing filesystem names its type; a failed mount's, the device too.
    named_device = found.code is Code.ROOT_MOUNT_FAILED
    quoted = not _public_fstype(ctx, fstype) or (
        named_device and not _public_device(ctx, device)
    )
    return dataclasses.replace(found, fix_quotes_console=quoted)


def _public_device(ctx: _Context, device: str) -> bool:
    """Whether *device* is one of the VM's disks (or a partition of one), or the
    command line's root=: not a name that only the console said."""
    disks = "|".join(re.escape(disk) for disk in ctx.facts.disks)
    return device == ctx.cmd.root_device or (
        bool(disks) and re.fullmatch(rf"(?:{disks})p?\d{{0,3}}", device) is not None
    )


def _public_fstype(ctx: _Context, fstype: str) -> bool:
    """Whether *fstype* is one kdlab knows, or the command line's rootfstype=."""
    return fstype in _FS_CONFIG or fstype == ctx.cmd.params.get("rootfstype")


def _mount_failure(
    device: str,
    fstype: str,
    named: str | None,
    attempt: _RootAttempt,
) -> Diagnosis:
    """A root filesystem type the kernel lacks, or a mount of it that failed."""
    # ENODEV from the kernel's mount: the type rootfstype= names is unknown.
    if (attempt.fstypes and fstype not in attempt.fstypes) or (
        named and attempt.error == -19
    ):
        has = f" (it has: {' '.join(attempt.fstypes)})" if attempt.fstypes else ""
        return _error(
            Code.ROOT_FS_MISSING,
            f"the kernel cannot mount /dev/{device}: it has no {fstype} filesystem "
            f"built in{has}",
            f"set {_fs_config(fstype)}",
            attempt.evidence,
        )
    return _error(
        Code.ROOT_MOUNT_FAILED,
        f"the kernel found /dev/{device} but could not mount it"
        f"{_error_text(attempt.error)}",
        f"check that /dev/{device} holds a {fstype} filesystem "
        f"({_fs_config(fstype)}); a partitioned image needs root=/dev/{device}1",
        attempt.evidence,
    )


_CANNOT_OPEN = re.compile(
    r'^VFS: Cannot open root device "[^"]*" or \S+: error (?P<error>-\d+)'
)
_TRIED = re.compile(r"^No filesystem could mount root, tried:(?P<names>.*)$")
_FS_NAME = re.compile(r"[a-z0-9_]+")
_ROOT_LINES = re.compile(
    r"^(?:/dev/root: |VFS: Cannot open root device|Waiting for root device|EXT4-fs \()"
)


def _root_mount_failed(ctx: _Context) -> Diagnosis | None:
    """The kernel's own root mount failed: ``VFS: Unable to mount root fs``."""
    panic = ctx.panic
    if panic is None or not panic[1].startswith("VFS: Unable to mount root fs"):
        return None
    boot, index = ctx.boot, panic[0]
    opened = boot.last(_CANNOT_OPEN, stop=index)
    tried = boot.last(_TRIED, stop=index)
    chosen = [i for i, _ in boot.find(_ROOT_LINES, stop=index)][-2:]
    listed = boot.partition_list
    if listed is not None:
        chosen += [listed[0], *listed[1][:3]]
    chosen += [tried[0]] if tried else []
    attempt = _RootAttempt(
        devices=boot.seen,
        evidence=boot.shown([*chosen[-(MAX_EVIDENCE - 1) :], index]),
        error=int(opened[1]["error"]) if opened else None,
        fstypes=_tried_names(boot, tried),
    )
    return _explain_root(ctx, attempt)


def _tried_names(
    boot: _Boot, tried: tuple[int, re.Match[str]] | None
) -> tuple[str, ...]:
    """The filesystems of "No filesystem could mount root, tried: ...".

    Older kernels print the names on that line; 6.1 prints each as a record of
    its own (" ext3", " ext2", " ext4", then an empty one).
    """
    if tried is None:
        return ()
    index, match = tried
    names = match["names"].split()
    for line in boot.lines[index + 1 : index + 64]:
        if not _FS_NAME.fullmatch(line.text):
            break
        names.append(line.text)
    return tuple(names)


_WAITING = re.compile(r"^Waiting for root device (?P<root>\S+?)\.*$")
_MOUNTED_ROOT = re.compile(r"^VFS: Mounted root \((?P<fs>\S+) filesystem\)")


def _root_wait(ctx: _Context) -> Diagnosis | None:
    """With ``rootwait`` the kernel waits for a missing root device for ever."""
    if not ctx.overdue:
        return None
    boot = ctx.boot
    waiting = boot.last(_WAITING)
    if waiting is None or boot.find(_MOUNTED_ROOT, waiting[0]):
        return None
    if ctx.crashed_before(waiting[0]) or ctx.cmd.root_device in boot.seen:
        return None
    probes = [
        i for i in range(len(boot.lines)) if _DISK_PROBED.search(boot.lines[i].text)
    ]
    evidence = boot.shown([*probes[-3:], waiting[0]])
    return _explain_root(ctx, _RootAttempt(boot.seen, evidence))


# kdlab's initramfs (kdlabctl/initramfs.py) names what failed in lines of its
# own, then offers an emergency shell: no panic follows.

_KDLAB = "kdlab-initramfs: "
_KDLAB_MOUNTED = re.compile(r"^kdlab-initramfs: mounted ")
_KDLAB_DEVTMPFS = re.compile(r"^kdlab-initramfs: cannot mount devtmpfs")
_KDLAB_MODULE = re.compile(r"^kdlab-initramfs: cannot load module (?P<module>[^\s:]+)")
_KDLAB_UNSUPPORTED = re.compile(
    r"^kdlab-initramfs: root=(?P<root>\S*) is not supported"
)
_KDLAB_NO_DEVICE = re.compile(
    r"^kdlab-initramfs: root device (?P<root>\S+) did not appear\b.*?"
    r"block devices: (?P<devices>.*)$"
)
_KDLAB_CANNOT_MOUNT = re.compile(
    r"^kdlab-initramfs: cannot mount (?P<what>\S+)(?: \((?P<device>\S+)\))? on \S+"
    r"(?: with type (?P<type>\S+)(?P<any> or any)?)?"
    r".*?this kernel mounts: (?P<known>.*)$"
)
_KDLAB_NO_INIT = re.compile(
    r"^kdlab-initramfs: init (?P<init>\S+) is not on the root filesystem"
    r" (?P<root>.+?)(?::|$)"
)


def _kdlab_initramfs(ctx: _Context) -> Diagnosis | None:
    boot = ctx.boot
    # Leaving the emergency shell tries again: only the latest attempt counts.
    mounted = boot.last(_KDLAB_MOUNTED)
    start = mounted[0] + 1 if mounted else 0
    failures = [
        (index, pattern, match)
        for pattern in (
            _KDLAB_UNSUPPORTED,
            _KDLAB_NO_DEVICE,
            _KDLAB_CANNOT_MOUNT,
            _KDLAB_NO_INIT,
        )
        for index, match in boot.find(pattern, start)
    ]
    if not failures:
        return None
    index, pattern, match = max(failures, key=lambda failure: failure[0])
    if ctx.crashed_before(index):
        return None  # a crash came first: it is the cause
    evidence = boot.shown(boot.said(_KDLAB, start, index + 1)[-4:])
    if pattern is _KDLAB_UNSUPPORTED:
        return _error(
            Code.ROOT_INVALID,
            f"kdlab's initramfs cannot look up root={match['root']}",
            "use root=/dev/NAME, root=UUID=... or root=LABEL=...",
            evidence,
        )
    if pattern is _KDLAB_NO_INIT:
        return _error(
            Code.INIT_MISSING,
            f"the root filesystem {match['root']} has no {match['init']}",
            "check that the image is a root filesystem, or pass init=PATH "
            "(e.g. init=/bin/sh)",
            evidence,
        )
    if pattern is _KDLAB_NO_DEVICE:
        return _initramfs_no_device(ctx, start, index, match)
    return _initramfs_cannot_mount(ctx, index, match, evidence)


def _initramfs_no_device(
    ctx: _Context, start: int, index: int, match: re.Match[str]
) -> Diagnosis:
    boot = ctx.boot
    said = boot.said(_KDLAB, start, index + 1)
    evidence = boot.shown(said[-4:])
    if boot.last(_KDLAB_DEVTMPFS, start, index) is not None:
        return _error(
            Code.DEVTMPFS_MISSING,
            "the kernel has no devtmpfs, so no device node appears in /dev",
            "set CONFIG_DEVTMPFS=y",
            boot.shown(said[:1] + said[-2:]),
        )
    listed = match["devices"]
    # "none: is the disk's driver loaded?" when /sys/block is empty.
    names = [] if listed.startswith("none") else listed.split()
    disks = [
        d for d in names if _DEVICE_NAME.fullmatch(d) and not _PSEUDO_DISK.fullmatch(d)
    ]
    modules = boot.find(_KDLAB_MODULE, start, index)
    if not disks and modules:
        failed = ", ".join(dict.fromkeys(m["module"] for _, m in modules))
        return _error(
            Code.INITRAMFS_MODULE_FAILED,
            f"the initramfs could not load {failed}, so no disk appeared",
            "the initramfs needs this kernel's own modules: build it from the "
            "kernel's /lib/modules/RELEASE (--modules DIR)",
            boot.shown([*(i for i, _ in modules[:3]), *said[-2:]]),
        )
    sizes = dict.fromkeys(disks, 0)
    for disk, parts in boot.partition_scans.items():
        if disk in sizes:
            sizes.update(dict.fromkeys(parts, 0))
    return _explain_root(ctx, _RootAttempt(_Devices(sizes), evidence))


def _initramfs_cannot_mount(
    ctx: _Context, index: int, match: re.Match[str], evidence: tuple[str, ...]
) -> Diagnosis:
    boot = ctx.boot
    device = (match["device"] or match["what"]).removeprefix("/dev/")
    # The kernel's complaint about the device and busybox mount's, just before.
    complaints = [
        i
        for i in range(max(0, index - 20), index)
        if f"({device})" in boot.lines[i].text
        or boot.lines[i].text.startswith((f"{device}: ", "mount: "))
    ]
    sizes = dict.fromkeys([*ctx.facts.disks, device], 0)
    for disk, parts in boot.partition_scans.items():
        sizes.update(dict.fromkeys([disk, *parts], 0))
    attempt = _RootAttempt(
        _Devices(sizes),
        (*boot.shown(complaints[-3:]), *evidence)[:MAX_EVIDENCE],
        fstypes=tuple(match["known"].split()),
        fstype=None if match["any"] else match["type"],
        device=device,
    )
    return _explain_root(ctx, attempt)


# The initrd image itself.

_UNPACK_FAILED = re.compile(
    r"^(?:Initramfs unpacking failed: (?P<why>.*)"
    r"|RAMDISK: Couldn't find valid RAM disk image)"
)


def _initrd_invalid(ctx: _Context, *, fatal: bool) -> Diagnosis | None:
    """An initrd the kernel could not unpack: the cause of what fails next."""
    found = ctx.boot.last(_UNPACK_FAILED)
    panic = ctx.panic
    if found is None or (panic is not None) != fatal:
        return None
    why = found[1]["why"] or "it is not an initramfs the kernel can read"
    return Diagnosis(
        Code.INITRD_INVALID,
        Severity.ERROR if fatal else Severity.WARNING,
        f"the kernel could not unpack the initrd: {why}"
        + ("" if fatal else "; it booted without it"),
        "give a newc cpio archive, compressed with a method the kernel has "
        "(CONFIG_RD_GZIP=y, CONFIG_RD_ZSTD=y, ...)",
        ctx.boot.shown([found[0], *([panic[0]] if panic else [])]),
    )


def _initrd_broken(ctx: _Context) -> Diagnosis | None:
    return _initrd_invalid(ctx, fatal=True)


def _initrd_ignored(ctx: _Context) -> Diagnosis | None:
    return _initrd_invalid(ctx, fatal=False)


# init.

_RUN_INIT = re.compile(r"^Run (?P<init>\S+) as init process$")
_REQUESTED_INIT = re.compile(
    r"^Requested init (?P<init>\S+) failed \(error (?P<error>-\d+)\)"
)
_INIT_NOT_RUN = re.compile(
    r"^Starting init: (?P<init>\S+) exists but couldn't execute it"
    r" \(error (?P<error>-\d+)\)"
)
_INIT_ERRORS = {
    -2: "does not exist on the root filesystem",
    -8: "is not an executable for this kernel (another architecture, or a script "
    "whose interpreter is missing)",
    -13: "is not executable (its mode, or a noexec mount)",
    -20: "is not under a directory",
}


def _init_missing(ctx: _Context) -> Diagnosis | None:
    panic = ctx.panic
    if panic is None:
        return None
    index, reason = panic
    boot = ctx.boot
    failed = _REQUESTED_INIT.match(reason)
    if failed is None and reason.startswith("No working init found"):
        last = boot.last(_INIT_NOT_RUN, stop=index)
        failed = last[1] if last else None
    elif failed is None:
        return None
    mounted = boot.last(_MOUNTED_ROOT, stop=index)
    runs = [i for i, _ in boot.find(_RUN_INIT, stop=index)]
    evidence = boot.shown([*([mounted[0]] if mounted else []), *runs[-5:], index])
    if failed is not None:
        error = int(failed["error"])
        meaning = _INIT_ERRORS.get(error, f"cannot be run{_error_text(error)}")
        return _error(
            Code.INIT_MISSING,
            f"init {failed['init']} {meaning}",
            "pass an init that the root filesystem has (init=PATH), or fix the image",
            evidence,
        )
    tried = ", ".join(boot.lines[i].text.split()[1] for i in runs)
    return _error(
        Code.INIT_MISSING,
        f"the root filesystem has no init (tried: {tried or 'the usual places'})",
        "check that the image is a root filesystem, or pass init=PATH "
        "(e.g. init=/bin/sh)",
        evidence,
    )


_KILL_INIT = re.compile(r"^Attempted to kill init! exitcode=(?P<status>0x[0-9a-fA-F]+)")


def _init_died(ctx: _Context) -> Diagnosis | None:
    panic = ctx.panic
    killed = _KILL_INIT.match(panic[1]) if panic else None
    if panic is None or killed is None:
        return None
    # A wait status: the signal in the low 7 bits, else the exit status above.
    status = int(killed["status"], 16)
    number = status & 0x7F
    if number:
        try:
            how = f"was killed by {signal.Signals(number).name}"
        except ValueError:
            how = f"was killed by signal {number}"
    else:
        how = f"exited with status {status >> 8 & 0xFF}"
    # What init printed last usually says why it ended.
    index = panic[0]
    started = ctx.boot.last(_RUN_INIT, stop=index)
    since = started[0] if started else index - 2
    before = [i for i in range(since + 1, index) if ctx.boot.lines[i].text][-3:]
    before = [*([started[0]] if started else []), *before]
    return _error(
        Code.INIT_DIED,
        f"init (PID 1) {how}, and the kernel cannot run without it",
        "PID 1 must never end: read its last output above the panic; a debug "
        "shell as init ends with poweroff -f, not exit",
        ctx.boot.shown([*before, index]),
    )


# Kernel crashes and warnings.


def _report(boot: _Boot, start: int, context: Iterable[int] = ()) -> tuple[str, ...]:
    """The telling lines of the report at *start*: its headline, the task, where
    it happened, and the first frames of the call trace."""
    chosen = [*context, start]
    frames = -1  # counted from "Call Trace:"
    for index in range(start + 1, min(len(boot.lines), start + 80)):
        text = boot.lines[index].text
        if text.startswith("---[ end") or len(chosen) >= MAX_EVIDENCE:
            break
        if text.startswith("RIP: ") and not _KERNEL_RIP.match(text):
            break  # user-space registers: the kernel's part is told
        wanted = _KERNEL_RIP.match(text) or text.startswith("CPU: ")
        if not wanted and (_REPORT_NOISE.match(text) or frames >= 3):
            continue
        chosen.append(index)
        if text == "Call Trace:" or frames >= 0:
            frames += 1
    return boot.shown(chosen)


def _where(boot: _Boot, start: int) -> tuple[str | None, str | None]:
    """The kernel function (``func+0x17/0xb0``) and the task of a crash report."""
    rip = boot.find(_KERNEL_RIP, start, start + 40)
    comm = boot.find(_COMM, start, start + 40)
    return (rip[0][1]["where"] if rip else None, comm[0][1]["comm"] if comm else None)


def _debug_fix(ctx: _Context, where: str | None, *, stop_at: str | None = None) -> str:
    steps = [f"the whole report: kdlabctl logs {ctx.name}"]
    if where is not None:
        location = where.split("/")[0]
        steps.append(f"its source line: gdb vmlinux -batch -ex 'list *({location})'")
    if ctx.facts.gdbstub:
        if stop_at is not None:
            steps.append(f"stop there: kdlabctl gdb {ctx.name}, then break {stop_at}")
        else:
            steps.append(f"look at it live: kdlabctl gdb {ctx.name}")
    return "; ".join(steps)


def _kernel_crash(ctx: _Context) -> Diagnosis | None:
    boot, crash = ctx.boot, ctx.boot.crash
    if crash is None:
        return None
    where, comm = _where(boot, crash.index)
    place = f" in {where}" if where else ""
    task = f" (task {comm})" if comm else ""
    if crash.code is Code.KERNEL_PANIC:
        # The line before a panic often says what led to it ("sysrq: Trigger a
        # crash", a driver's last words).
        before = crash.index - 1
        context = [before] if before >= 0 and boot.lines[before].text else []
        return _error(
            Code.KERNEL_PANIC,
            f"kernel panic: {crash.headline.partition(': ')[2]}{task}",
            _debug_fix(ctx, None),
            _report(boot, crash.index, context),
        )
    then = "; the kernel then panicked" if boot.find(_PANIC, crash.index + 1) else ""
    evidence = _report(boot, crash.index)
    if crash.code is Code.KERNEL_STALL:
        cause = f"the kernel is stuck: {crash.headline}{place}{then}"
        return _error(crash.code, cause, _debug_fix(ctx, where), evidence)
    bug_at = _BUG_AT.match(crash.headline)
    if bug_at:
        cause = f"a BUG_ON() failed at {bug_at['where']}{place}{task}{then}"
        fix = _debug_fix(ctx, where, stop_at=bug_at["where"])
        return _error(crash.code, cause, fix, evidence)
    kind = "kernel oops" if crash.code is Code.KERNEL_OOPS else "kernel bug"
    cause = f"{kind}: {crash.headline}{place}{task}{then}"
    return _error(crash.code, cause, _debug_fix(ctx, where), evidence)


_CUT_HERE = "------------[ cut here ]------------"


def _kernel_warning(ctx: _Context) -> Diagnosis | None:
    """A WARN(), a lockdep report, or another stack trace the kernel survived."""
    boot = ctx.boot
    for index, line in enumerate(boot.lines):
        at = _WARN_AT.match(line.text)
        check = _WARN_CHECK.match(line.text)
        above = boot.lines[index - 1].text if index else ""
        if at:
            # WARN(cond, fmt, ...) prints its message between "cut here" and here.
            said = index >= 2 and boot.lines[index - 2].text == _CUT_HERE
            message = f": {above}" if said and above else ""
            return Diagnosis(
                Code.KERNEL_WARNING,
                Severity.WARNING,
                f"kernel warning at {at['file']} in {at['where']}{message}",
                _debug_fix(ctx, at["where"], stop_at=at["file"]),
                _report(boot, index, [index - 1] if message else []),
            )
        if check and above and set(above) == {"="}:
            return Diagnosis(
                Code.KERNEL_WARNING,
                Severity.WARNING,
                f"kernel warning: {check['what']}",
                _debug_fix(ctx, None),
                _report(boot, index),
            )
    return _stack_trace(ctx)


def _stack_trace(ctx: _Context) -> Diagnosis | None:
    boot = ctx.boot
    trace = next(
        (i for i, line in enumerate(boot.lines) if line.text == "Call Trace:"), None
    )
    if trace is None:
        return None
    # Its headline: the nearest line above that is not part of the dump.
    dump = ("CPU: ", "RIP: ", "task:", "Tainted", "Not tainted", '"echo 0 >')
    headline = next(
        (
            i
            for i in range(trace - 1, max(-1, trace - 20), -1)
            if not _REPORT_NOISE.match(boot.lines[i].text)
            and not boot.lines[i].text.startswith(dump)
        ),
        trace,
    )
    return Diagnosis(
        Code.KERNEL_WARNING,
        Severity.WARNING,
        f"the kernel printed a stack trace after: {boot.lines[headline].text}",
        _debug_fix(ctx, None),
        _report(boot, headline),
    )


# Debugging.

_KERNEL_OFFSET = re.compile(r"^Kernel Offset: (?P<offset>\S+)")
_COMMAND_LINE = re.compile(r"^Command line: ")


def _gdb_kaslr(ctx: _Context) -> Diagnosis | None:
    """KASLR with a gdbstub: vmlinux's addresses are not where the kernel runs.

    x86 has no ``kaslr`` parameter: KASLR is on (with CONFIG_RANDOMIZE_BASE)
    unless ``nokaslr`` is given, so the command line decides. The log tells only
    when the kernel panics ("Kernel Offset: disabled" without KASLR).
    """
    cmd = ctx.cmd
    if not ctx.latest or not ctx.facts.gdbstub or "nokaslr" in cmd.flags:
        return None
    offsets = ctx.boot.find(_KERNEL_OFFSET)
    if any(m["offset"] == "disabled" for _, m in offsets):
        return None
    banner = [i for i, _ in ctx.boot.find(_COMMAND_LINE)][:1]
    if "kaslr" in cmd.flags:
        said, fix = (
            "kaslr",
            "remove kaslr from the command line (kdlab then adds nokaslr)",
        )
    else:
        said, fix = "no nokaslr", "add nokaslr to the command line"
    return Diagnosis(
        Code.GDB_KASLR,
        Severity.WARNING,
        f"the gdbstub is on but so is KASLR ({said} on the command line): the kernel "
        "runs at a random offset, so breakpoints set from vmlinux never hit",
        fix,
        ctx.boot.shown([*banner, *(i for i, _ in offsets)]),
    )


_MATCHERS: tuple[_Matcher, ...] = (
    _no_console_output,
    _initrd_broken,
    _kdlab_initramfs,
    _root_mount_failed,
    _root_wait,
    _init_missing,
    _init_died,
    _kernel_crash,
    _kernel_warning,
    _initrd_ignored,
    _gdb_kaslr,
)
"""Most specific first: the first that recognizes the boot names its problem.

Errors come before warnings; the root and init matchers before the general
crash one, which would otherwise report their panics as a bare panic."""
