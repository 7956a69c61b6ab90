"""Kernel crashes and warnings: Oops, BUG, stalls, panics, WARN() and the like.

The first failure of a boot is the cause; what follows is a consequence. An
Oops in a disk driver is reported as the Oops, not as the missing root device
it leads to, and a panic that follows an Oops ("Fatal exception") is part of
the Oops.
"""

from __future__ import annotations

from collections.abc import Iterable

from kdlab.kernel.diagnosis.boot import Boot, Context
from kdlab.kernel.diagnosis.codes import Code, Diagnosis, fatal
from kdlab.kernel.diagnosis.log import MAX_EVIDENCE
from kdlab.kernel.diagnosis.reports import (
    BUG_AT,
    COMM,
    KERNEL_RIP,
    PANIC,
    REPORT_NOISE,
    WARN_AT,
    WARN_CHECK,
)
from kdlab.kernel.findings import Severity


def _report(boot: Boot, start: int, context: Iterable[int] = ()) -> tuple[str, ...]:
    """The telling lines of the report at *start*: its headline, the task, where
    it happened, and the first frames of the call trace."""
    chosen = [*context, start]
    frames = -1  # counted from "Call Trace:"
    for index in range(start + 1, min(len(boot.lines), start + 80)):
        text = boot.lines[index].text
        if text.startswith("---[ end") or len(chosen) >= MAX_EVIDENCE:
            break
        if text.startswith("RIP: ") and not KERNEL_RIP.match(text):
            break  # user-space registers: the kernel's part is told
        wanted = KERNEL_RIP.match(text) or text.startswith("CPU: ")
        if not wanted and (REPORT_NOISE.match(text) or frames >= 3):
            continue
        chosen.append(index)
        if text == "Call Trace:" or frames >= 0:
            frames += 1
    return boot.shown(chosen)


def _where(boot: Boot, start: int) -> tuple[str | None, str | None]:
    """The kernel function (``func+0x17/0xb0``) and the task of a crash report."""
    rip = boot.find(KERNEL_RIP, start, start + 40)
    comm = boot.find(COMM, start, start + 40)
    return (rip[0][1]["where"] if rip else None, comm[0][1]["comm"] if comm else None)


def _debug_fix(ctx: Context, where: str | None, *, stop_at: str | None = None) -> str:
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


def kernel_crash(ctx: Context) -> Diagnosis | None:
    """The boot's first crash: an Oops, a BUG, a stall or a panic."""
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
        return fatal(
            Code.KERNEL_PANIC,
            f"kernel panic: {crash.headline.partition(': ')[2]}{task}",
            _debug_fix(ctx, None),
            _report(boot, crash.index, context),
        )
    then = "; the kernel then panicked" if boot.find(PANIC, crash.index + 1) else ""
    evidence = _report(boot, crash.index)
    if crash.code is Code.KERNEL_STALL:
        cause = f"the kernel is stuck: {crash.headline}{place}{then}"
        return fatal(crash.code, cause, _debug_fix(ctx, where), evidence)
    bug_at = BUG_AT.match(crash.headline)
    if bug_at:
        cause = f"a BUG_ON() failed at {bug_at['where']}{place}{task}{then}"
        fix = _debug_fix(ctx, where, stop_at=bug_at["where"])
        return fatal(crash.code, cause, fix, evidence)
    kind = "kernel oops" if crash.code is Code.KERNEL_OOPS else "kernel bug"
    cause = f"{kind}: {crash.headline}{place}{task}{then}"
    return fatal(crash.code, cause, _debug_fix(ctx, where), evidence)


_CUT_HERE = "------------[ cut here ]------------"


def kernel_warning(ctx: Context) -> Diagnosis | None:
    """A WARN(), a lockdep report, or another stack trace the kernel survived."""
    boot = ctx.boot
    for index, line in enumerate(boot.lines):
        at = WARN_AT.match(line.text)
        check = WARN_CHECK.match(line.text)
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


def _stack_trace(ctx: Context) -> Diagnosis | None:
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
            if not REPORT_NOISE.match(boot.lines[i].text)
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
