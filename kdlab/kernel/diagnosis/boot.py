"""A boot being diagnosed: what kdlab knows of the VM, and its lines of the log."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from kdlab.kernel.diagnosis.cmdline import CommandLine
from kdlab.kernel.diagnosis.codes import Code, Diagnosis
from kdlab.kernel.diagnosis.devices import (
    DISK_PROBED,
    PARTITION_LIST,
    PARTITION_ROW,
    PARTITION_SCAN,
    Devices,
    partition_of,
)
from kdlab.kernel.diagnosis.log import MAX_EVIDENCE, Line
from kdlab.kernel.diagnosis.reports import DIE_TAIL, Crash, crash_code


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


# What a serial port shows that is neither the guest kernel nor its programs:
# SeaBIOS (which copies the screen to the serial port when a VM has no display),
# the kernel's real-mode setup and decompressor.
_FIRMWARE = re.compile(
    r"^(?:SeaBIOS|Booting from |Probing EDD|iPXE|Machine UUID|Press ESC"
    r"|Decompressing Linux|Parsing ELF|Performing relocations|Booting the kernel"
    r"|early console in|$)"
)


class Boot:
    """One boot's lines, and what several matchers ask of them, found once."""

    def __init__(self, lines: Sequence[Line]) -> None:
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
    def crash(self) -> Crash | None:
        for index, line in enumerate(self.lines):
            code = crash_code(line.text)
            if code is not None:
                # "...: 0000 [#1] PREEMPT SMP NOPTI": the code and the config.
                headline = DIE_TAIL.sub("", line.text)
                return Crash(index, code, headline)
        return None

    @cached_property
    def partition_list(self) -> tuple[int, list[int], Devices] | None:
        """The kernel's last list of all partitions: its header, rows, devices."""
        headers = [
            i for i, line in enumerate(self.lines) if line.text in PARTITION_LIST
        ]
        if not headers:
            return None
        rows: list[int] = []
        sizes: dict[str, int] = {}
        for index in range(headers[-1] + 1, len(self.lines)):
            text = self.lines[index].text
            row = PARTITION_ROW.match(text)
            if row:
                rows.append(index)
                sizes[row["name"]] = int(row["kib"])
            elif text and text != "(driver?)" and not text.startswith("driver: "):
                break
        return headers[-1], rows, Devices(sizes)

    @cached_property
    def partition_scans(self) -> dict[str, list[str]]:
        """Each disk's partitions as its partition scan printed them."""
        scans: dict[str, list[str]] = {}
        for _, scan in self.find(PARTITION_SCAN):
            disk = scan["disk"]
            # A disk whose name ends in a digit shows "nvme0n1: p1" for nvme0n1p1.
            short = disk[-1].isdigit()
            parts = [
                disk + p if short and p.startswith("p") else p
                for p in scan["parts"].split()
                if p not in ("<", ">")
            ]
            if parts and all(partition_of(p, disk) for p in parts):
                scans[disk] = parts
        return scans

    @cached_property
    def seen(self) -> Devices:
        """Block devices named anywhere: the partition list, probes, scans."""
        listed = self.partition_list
        sizes = dict(listed[2].sizes) if listed else {}
        for index in range(len(self.lines)):
            probed = DISK_PROBED.search(self.lines[index].text)
            if probed:
                sizes.setdefault(probed["name"], 0)
        for disk, parts in self.partition_scans.items():
            for name in (disk, *parts):
                sizes.setdefault(name, 0)
        return Devices(sizes)


@dataclass(frozen=True)
class Context:
    """A boot being diagnosed, with the facts; *latest*: the log's last boot."""

    boot: Boot
    facts: BootFacts
    cmd: CommandLine
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


Matcher = Callable[[Context], Diagnosis | None]
"""One problem's rule: its diagnosis when it recognizes the boot, else None."""
