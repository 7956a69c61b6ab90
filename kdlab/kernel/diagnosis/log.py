"""Reading a serial console log: its lines as the kernel said them, its boots.

Logs are read as they come from a serial port: CRLF or LF, terminal escapes
(busybox's shell asks for the cursor position with ESC[6n), printk timestamps or
none, kernel messages glued to the end of a shell prompt, a log cut off at any
point. A log may hold several boots (a guest that reboots keeps its QEMU process
and its log). Only the start and the end of a very large log are read:
everything diagnosed is printed early in a boot or at its end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_EVIDENCE = 8
"""At most this many log lines are quoted as a diagnosis's evidence."""

HEAD_SIZE = 1 << 20
TAIL_SIZE = 2 << 20
"""The parts of a large log that are read (characters of a string, bytes of a
file): root-mount and console problems show within the first few hundred
kilobytes of a boot, crashes at its end."""


@dataclass(frozen=True)
class Line:
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


def excerpt(log: str) -> str:
    if len(log) <= HEAD_SIZE + TAIL_SIZE:
        return log
    return log[:HEAD_SIZE] + "\n" + log[-TAIL_SIZE:]


def parse_lines(log: str) -> list[Line]:
    text = _ESCAPE.sub("", log.replace("\r\n", "\n").replace("\r", "\n"))
    lines: list[Line] = []
    for raw in text.split("\n"):
        line = _CONTROL.sub("", raw)
        # A kernel message printed while a shell waits for input ends up on the
        # prompt's line ("/ # [    2.28] tsc: ..."): split before each stamp.
        starts = [m.start() for m in _TIMESTAMP.finditer(line) if m.start() > 0]
        for begin, end in zip([0, *starts], [*starts, len(line)], strict=True):
            part = line[begin:end]
            stamp = _TIMESTAMP.match(part)
            message = part[stamp.end() :] if stamp else part
            lines.append(Line(message.strip(), part.rstrip()))
    return lines


def split_boots(lines: list[Line]) -> list[list[Line]]:
    """The log's boots, split before each kernel banner; never empty."""
    starts = [
        i for i, line in enumerate(lines) if line.text.startswith("Linux version ")
    ]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    return [lines[a:b] for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]
