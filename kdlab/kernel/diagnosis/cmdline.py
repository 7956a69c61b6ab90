"""The kernel command line as the kernel reads it, for what the diagnosis asks."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdlab.kernel.guest import SERIAL_CONSOLE


@dataclass(frozen=True)
class CommandLine:
    """The kernel's parameters (words before ``--``); the last of a key wins."""

    params: dict[str, str]
    flags: frozenset[str]
    consoles: tuple[str, ...]
    """Every ``console=`` in order: the kernel prints on all of them."""

    @classmethod
    def parse(cls, cmdline: str) -> CommandLine:
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
            c.split(",")[0] == SERIAL_CONSOLE or c.startswith(early)
            for c in self.consoles
        )

    @property
    def quiet(self) -> bool:
        level = self.params.get("loglevel", "")
        return "quiet" in self.flags or (level.isdigit() and int(level) <= 4)
