"""A journal of multi-step operations, so a crash in the middle leaves no orphan.

Before an operation makes its first volume (or, for an image build, starts
its first process), it records its intent; when it completes (or rolls back)
it removes it. An intent found at start-up belongs to an operation that died
with kdlabd (kill -9, power cut), and reconciliation finishes the job of
rolling it back. An intent may carry what the rollback needs to know (a
build's scratch directory and the token naming its processes). The records
are the host's (files, :mod:`kdlabd.host.journal`), behind :class:`Journal`.

:func:`crash_point` lets tests kill kdlabd at a named step
(``KDLAB_TEST_CRASH_AT=create.kernel-uploaded``), :func:`fault_point`
makes a named step raise an unexpected exception
(``KDLAB_TEST_FAULT_AT=call.ListVMs``), and :func:`hold_point` makes an
operation wait at one until it is cancelled
(``KDLAB_TEST_HOLD_AT=image.upload-started``), to see what others may do
meanwhile; without those variables they do nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping
from typing import Protocol

CRASH_ENV = "KDLAB_TEST_CRASH_AT"
FAULT_ENV = "KDLAB_TEST_FAULT_AT"
HOLD_ENV = "KDLAB_TEST_HOLD_AT"


class InjectedFault(RuntimeError):
    """The bug a test planted with :data:`FAULT_ENV`."""


def crash_point(name: str) -> None:
    """Die here, as kill -9 would, when the test environment asks for it."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name: str) -> None:
    """Raise here, as a bug would, when the test environment asks for it."""
    if os.environ.get(FAULT_ENV) == name:
        raise InjectedFault(f"fault injected at {name} ({FAULT_ENV})")


async def hold_point(name: str) -> None:
    """Wait here until cancelled, when the test environment asks for it."""
    if os.environ.get(HOLD_ENV) == name:
        await asyncio.Event().wait()


class Journal(Protocol):
    """Intent records of operations under way, by kind and name.

    :mod:`kdlabd.host.journal` keeps them as files that survive kdlabd.
    """

    def begin(
        self, kind: str, name: str, details: Mapping[str, str] | None = None
    ) -> None:
        """Record that *kind* of *name* is under way, until :meth:`done`.

        *details* are kept with it (:meth:`details`); the record is durable
        when this returns.
        """

    def details(self, kind: str, name: str) -> dict[str, str]:
        """What :meth:`begin` kept with *kind* of *name* (empty if nothing or torn)."""

    def pending(self, kind: str) -> list[str]:
        """Names whose *kind* operation never finished."""

    def done(self, kind: str, name: str) -> None:
        """The operation ended (completed or rolled back): forget its record."""
