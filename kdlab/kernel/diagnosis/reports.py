"""The kernel's crash reports: the lines that open one, and what is in them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdlab.kernel.diagnosis.codes import Code

PANIC = re.compile(r"^Kernel panic - not syncing: ?(?P<reason>.*)$")
BUG_AT = re.compile(r"^kernel BUG at (?P<where>\S+?)!?$")
_BUG = re.compile(r"^(?:\S+: )?BUG: (?P<what>.+)$")
# These BUG: lines open an Oops (a fault in kernel mode), not a bug check.
_FAULT_BUG = re.compile(
    r"^(?:kernel NULL pointer dereference|unable to handle (?:page fault|kernel))"
)
# die()'s header: "Oops: 0000 [#1] PREEMPT SMP NOPTI", "general protection
# fault, probably for non-canonical address 0x...: 0000 [#1] ...".
_DIE = re.compile(r"^[A-Za-z][A-Za-z ]*(?:,[^:]*)?: [0-9a-f]{4} \[#\d+\]")
DIE_TAIL = re.compile(r": [0-9a-f]{4} \[#\d+\].*$")
_STALL = re.compile(
    r"^(?:INFO: task \S+ blocked for more than \d+ seconds"
    r"|rcu: INFO: \S+ (?:self-)?detected stall"
    r"|(?:watchdog: )?BUG: soft lockup"
    r"|(?:NMI )?watchdog: Watchdog detected hard LOCKUP)"
)
WARN_AT = re.compile(r"^WARNING: CPU: \d+ PID: \d+ at (?P<file>\S+) (?P<where>\S+)")
# lockdep and RCU checks: "WARNING: possible circular locking dependency
# detected" under a row of "=".
WARN_CHECK = re.compile(r"^WARNING: (?P<what>.+)$")
KERNEL_RIP = re.compile(r"^RIP: 0010:(?P<where>\S+)")
COMM = re.compile(r"^CPU: \d+ PID: \d+ Comm: (?P<comm>\S+)")
# Lines of a crash report that a reader of the evidence does not need.
REPORT_NOISE = re.compile(
    r"^(?:Hardware name:|Code:|Modules linked in:|</?TASK>|dump_stack|panic\+"
    r"|#PF: error_code|PGD |(?:[A-Z0-9]{2,3}|ORIG_RAX): +[0-9a-f]{4,}"
    r"|[A-Z]S: |CR\d: |RSP: |$)"
)


@dataclass(frozen=True)
class Crash:
    """The first sign of a kernel crash in a boot."""

    index: int
    code: Code
    headline: str


def crash_code(text: str) -> Code | None:
    """The kind of crash whose report starts with *text*, if one does."""
    if _STALL.match(text):
        return Code.KERNEL_STALL
    if BUG_AT.match(text):
        return Code.KERNEL_BUG
    bug = _BUG.match(text)
    if bug:
        return Code.KERNEL_OOPS if _FAULT_BUG.match(bug["what"]) else Code.KERNEL_BUG
    if _DIE.match(text):
        return Code.KERNEL_OOPS
    if PANIC.match(text):
        return Code.KERNEL_PANIC
    return None
