"""init: the program the kernel runs as PID 1, missing or ended."""

from __future__ import annotations

import re
import signal

from kdlab.kernel.diagnosis.boot import Context
from kdlab.kernel.diagnosis.codes import Code, Diagnosis, errno_text, fatal
from kdlab.kernel.diagnosis.root import MOUNTED_ROOT

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


NO_INIT_FIX = (
    "check that the image is a root filesystem, or pass init=PATH (e.g. init=/bin/sh)"
)


def init_missing(ctx: Context) -> Diagnosis | None:
    """The kernel found no init to run on the root filesystem."""
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
    mounted = boot.last(MOUNTED_ROOT, stop=index)
    runs = [i for i, _ in boot.find(_RUN_INIT, stop=index)]
    evidence = boot.shown([*([mounted[0]] if mounted else []), *runs[-5:], index])
    if failed is not None:
        error = int(failed["error"])
        meaning = _INIT_ERRORS.get(error, f"cannot be run{errno_text(error)}")
        return fatal(
            Code.INIT_MISSING,
            f"init {failed['init']} {meaning}",
            "pass an init that the root filesystem has (init=PATH), or fix the image",
            evidence,
        )
    tried = ", ".join(boot.lines[i].text.split()[1] for i in runs)
    return fatal(
        Code.INIT_MISSING,
        f"the root filesystem has no init (tried: {tried or 'the usual places'})",
        NO_INIT_FIX,
        evidence,
    )


_KILL_INIT = re.compile(r"^Attempted to kill init! exitcode=(?P<status>0x[0-9a-fA-F]+)")


def init_died(ctx: Context) -> Diagnosis | None:
    """init ran, then ended: the kernel panics without a PID 1."""
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
    return fatal(
        Code.INIT_DIED,
        f"init (PID 1) {how}, and the kernel cannot run without it",
        "PID 1 must never end: read its last output above the panic; a debug "
        "shell as init ends with poweroff -f, not exit",
        ctx.boot.shown([*before, index]),
    )
