"""A problem kdlab found in a kernel, and what to do about it.

Both checks of a kernel speak this one language: ``kdlabctl kernel check``
judges a ``.config`` before a boot (:mod:`kdlab.kernel.kconfig`), and kdlabd's
boot diagnosis reads a console log after one (:mod:`kdlab.kernel.diagnosis`).
The same problem gets the same fix from either.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar


class Severity(enum.StrEnum):
    """How bad a finding is. The values are on the wire: the VM's ``Diagnosis``
    property and ``kdlabctl kernel check --json`` spell them so."""

    ERROR = "error"
    """The VM cannot boot, show output or be debugged; fails the config check."""
    WARNING = "warning"
    """It works only with help (an initramfs), in some images, or the kernel
    survived it."""
    NOTE = "note"
    """kdlab handles it, or it may be nothing; worth knowing."""


CodeT = TypeVar("CodeT", bound=str)


@dataclass(frozen=True)
class Finding(Generic[CodeT]):
    """One problem, how bad it is, and what to change.

    The *code* is stable, for scripts and clients to match on: a boot's
    finding has a :class:`~kdlab.kernel.diagnosis.Code`, a config's a string.
    """

    code: CodeT
    severity: Severity
    problem: str
    """One line: what is wrong, with the names involved (``root=/dev/sda``)."""
    fix: str
    """One line: what to change (``use root=/dev/vda``)."""
    evidence: tuple[str, ...] = ()
    """The lines of a boot's console log the finding is based on."""
    option: str = ""
    """The ``CONFIG_`` option a config's finding is about."""
    fix_quotes_evidence: bool = False
    """The fix names something only the evidence said (a filesystem type, a
    device the guest printed): it is then private like the evidence."""


def errors(findings: Iterable[Finding[CodeT]]) -> list[Finding[CodeT]]:
    """The findings that fail a check: those of severity error."""
    return [f for f in findings if f.severity is Severity.ERROR]
