"""Console and command line: a boot that printed nothing where kdlab listens."""

from __future__ import annotations

from kdlab.kernel.diagnosis.boot import Context
from kdlab.kernel.diagnosis.codes import Code, Diagnosis, fatal
from kdlab.kernel.findings import Severity
from kdlab.kernel.guest import SERIAL_CONSOLE
from kdlab.kernel.kconfig import CONSOLE, options_text


def no_console_output(ctx: Context) -> Diagnosis | None:
    """The kernel printed nothing on the serial port kdlab logs."""
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
        return fatal(
            Code.NO_CONSOLE_OUTPUT,
            f"{when}: console={SERIAL_CONSOLE} is missing from the command line "
            f"({where})",
            f"add console={SERIAL_CONSOLE} to the command line: kdlab logs the first "
            "serial port",
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
    return fatal(
        Code.NO_CONSOLE_OUTPUT,
        f"{when} although console={SERIAL_CONSOLE} is set: the kernel has no 8250 "
        "serial console, or it stops before its console starts",
        f"set {options_text(CONSOLE)}; add earlyprintk=serial,{SERIAL_CONSOLE},115200 "
        "to see where it stops",
        evidence,
    )
