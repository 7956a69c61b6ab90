"""A journal of multi-step operations, so a crash in the middle leaves no orphan.

Before an operation makes its first volume (or, for an image build, starts
its first process), it writes an intent file; when it completes (or rolls
back) it removes it. An intent file found at start-up belongs to an operation
that died with kdlabd (kill -9, power cut), and reconciliation finishes the
job of rolling it back. An intent may carry what the rollback needs to know
(a build's scratch directory and the token naming its processes), as JSON.

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
import json
import os
import signal
from pathlib import Path

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


class Journal:
    """Intent files ``KIND-NAME`` in one directory."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def begin(
        self, kind: str, name: str, details: dict[str, str] | None = None
    ) -> None:
        """Record that *kind* of *name* is under way, until :meth:`done`.

        *details* are kept with it (:meth:`details`); the record is on disk
        when this returns.
        """
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._dir / f"{kind}-{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if details:
                os.write(fd, json.dumps(details).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def details(self, kind: str, name: str) -> dict[str, str]:
        """What :meth:`begin` kept with *kind* of *name* (empty if nothing or torn)."""
        try:
            text = (self._dir / f"{kind}-{name}").read_text()
            found = json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}
        if not isinstance(found, dict):
            return {}
        return {str(key): str(value) for key, value in found.items()}

    def pending(self, kind: str) -> list[str]:
        """Names whose *kind* operation never finished."""
        prefix = f"{kind}-"
        try:
            entries = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        return sorted(e.removeprefix(prefix) for e in entries if e.startswith(prefix))

    def done(self, kind: str, name: str) -> None:
        (self._dir / f"{kind}-{name}").unlink(missing_ok=True)
