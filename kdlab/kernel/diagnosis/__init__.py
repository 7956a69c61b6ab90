"""Boot diagnosis: what went wrong in a boot, read from its serial console log.

:func:`diagnose` takes the text of a VM's console log and what kdlab knows about
the VM (:class:`BootFacts`) and names the problem, if there is one, as a
:data:`Diagnosis`: a stable code, a one-line cause, a one-line fix, and the log
lines it is based on. It is a pure function, so that every case can be tested on
recorded logs: no I/O, no clock, no libvirt. (kdlabd reads the log.)

The rules form one ordered table (:data:`MATCHERS`), one small matcher per
problem, most specific first; the first that recognizes the boot wins. The
matchers live by theme:

- :mod:`.console`: nothing printed where kdlab listens (console=, quiet);
- :mod:`.root`: no root mounted, and why (no disk, no driver, wrong root=, no
  filesystem);
- :mod:`.initramfs`: kdlab's initramfs failing (or its userspace coming up
  without a module, the agent's port or a share), an initrd the kernel
  cannot unpack;
- :mod:`.init`: init missing, or ended;
- :mod:`.crashes`: Oops, BUG, stalls, panics and warnings;
- :mod:`.gdb`: KASLR while a debugger is expected;

on what they share: :mod:`.log` (reading a serial log), :mod:`.boot` (a boot
and its facts), :mod:`.cmdline`, :mod:`.devices`, :mod:`.reports` (the lines of
a crash report) and :mod:`.codes`. Two principles shape them: the first failure
of a boot is the cause, what follows is a consequence; the kernel's message says
*what* failed, the facts say *why*.

A log may hold several boots (a guest that reboots keeps its QEMU process and
its log); the last boot is diagnosed first.

The kernel messages matched are those of Linux 6.1 (``init/do_mounts.c``,
``init/main.c``, ``kernel/panic.c``, ``arch/x86/kernel/dumpstack.c``), checked
against logs recorded from Debian's 6.1 kernel under QEMU
(``tests/golden/consoles``), and those of kdlab's own initramfs, read with the
catalogue its script is generated from (:mod:`kdlab.kernel.initramfs`).
"""

from __future__ import annotations

import dataclasses

from kdlab.kernel.diagnosis.boot import Boot, BootFacts, Context, Matcher
from kdlab.kernel.diagnosis.cmdline import CommandLine
from kdlab.kernel.diagnosis.codes import (
    SUMMARIES,
    Code,
    Diagnosis,
    public_fix,
    summary,
)
from kdlab.kernel.diagnosis.console import no_console_output
from kdlab.kernel.diagnosis.crashes import kernel_crash, kernel_warning
from kdlab.kernel.diagnosis.gdb import gdb_kaslr
from kdlab.kernel.diagnosis.init import init_died, init_missing
from kdlab.kernel.diagnosis.initramfs import (
    initrd_broken,
    initrd_ignored,
    kdlab_initramfs,
    kdlab_userspace,
)
from kdlab.kernel.diagnosis.log import (
    HEAD_SIZE,
    MAX_EVIDENCE,
    TAIL_SIZE,
    excerpt,
    parse_lines,
    split_boots,
)
from kdlab.kernel.diagnosis.root import root_mount_failed, root_wait
from kdlab.kernel.findings import Severity

__all__ = [
    "DEFAULT_PATIENCE",
    "HEAD_SIZE",
    "MATCHERS",
    "MAX_EVIDENCE",
    "SUMMARIES",
    "TAIL_SIZE",
    "BootFacts",
    "Code",
    "Diagnosis",
    "diagnose",
    "public_fix",
    "summary",
]


DEFAULT_PATIENCE = 10.0
"""Seconds a running VM may stay silent (or wait for its root disk) before
:func:`diagnose` calls it a failure rather than a boot still under way."""


def diagnose(
    log: str, facts: BootFacts, *, patience: float = DEFAULT_PATIENCE
) -> Diagnosis | None:
    """The problem the console *log* of a boot shows, or None when it shows none.

    *patience* is how many seconds a running VM may print nothing (or wait for
    its root device) before that counts as a failure.
    """
    boots = split_boots(parse_lines(excerpt(log)))
    command_line = CommandLine.parse(facts.cmdline)
    for age, boot in enumerate(reversed(boots)):
        context = Context(Boot(boot), facts, command_line, patience, latest=age == 0)
        found = _first_match(context)
        if found is None:
            continue
        if age == 0:
            return found
        # The VM rebooted (on_reboot=restart) into the same kernel and command
        # line, so a fatal problem of an earlier boot is still this VM's problem.
        if found.severity is Severity.ERROR:
            cause = f"{found.problem} (in an earlier boot; the VM has rebooted since)"
            return dataclasses.replace(found, problem=cause)
    return None


def _first_match(context: Context) -> Diagnosis | None:
    for matcher in MATCHERS:
        found = matcher(context)
        if found is not None:
            return found
    return None


MATCHERS: tuple[Matcher, ...] = (
    no_console_output,
    initrd_broken,
    kdlab_initramfs,
    root_mount_failed,
    root_wait,
    init_missing,
    init_died,
    kernel_crash,
    kernel_warning,
    kdlab_userspace,
    initrd_ignored,
    gdb_kaslr,
)
"""Most specific first: the first that recognizes the boot names its problem.

Errors come before warnings; the root and init matchers before the general
crash one, which would otherwise report their panics as a bare panic."""
