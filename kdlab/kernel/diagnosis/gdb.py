"""Debugging: what keeps gdb from working on the kernel that booted."""

from __future__ import annotations

import re

from kdlab.kernel.diagnosis.boot import Context
from kdlab.kernel.diagnosis.codes import Code, Diagnosis
from kdlab.kernel.findings import Severity

_KERNEL_OFFSET = re.compile(r"^Kernel Offset: (?P<offset>\S+)")
_COMMAND_LINE = re.compile(r"^Command line: ")


def gdb_kaslr(ctx: Context) -> Diagnosis | None:
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
