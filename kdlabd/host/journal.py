"""kdlabd's journal as intent files ``KIND-NAME`` in one directory (see
:mod:`kdlabd.core.journal`); the details of an intent are its file's JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


class FileJournal:
    """Intent files ``KIND-NAME`` in *directory* (made on the first intent)."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory

    def begin(
        self, kind: str, name: str, details: Mapping[str, str] | None = None
    ) -> None:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._dir / f"{kind}-{name}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if details:
                os.write(fd, json.dumps(dict(details)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def details(self, kind: str, name: str) -> dict[str, str]:
        try:
            text = (self._dir / f"{kind}-{name}").read_text()
            found = json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}
        if not isinstance(found, dict):
            return {}
        return {str(key): str(value) for key, value in found.items()}

    def pending(self, kind: str) -> list[str]:
        prefix = f"{kind}-"
        try:
            entries = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        return sorted(e.removeprefix(prefix) for e in entries if e.startswith(prefix))

    def done(self, kind: str, name: str) -> None:
        (self._dir / f"{kind}-{name}").unlink(missing_ok=True)
