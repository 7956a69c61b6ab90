"""The JSON files kdlabd keeps next to what libvirt writes into its pools
(a dump, a recording): what libvirt cannot keep about a volume, and, being
written last and atomically, the mark of a complete one."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdlabd.core import blocking
from kdlabd.core.host import Host

SUFFIX = ".json"
SECONDS = 10.0
"""Time limit of reading or writing one."""


def encode(record: Any, fields: Iterable[str]) -> bytes:
    """The sidecar of the dataclass *record*: its *fields* as JSON."""
    data = asdict(record)
    return json.dumps({k: data[k] for k in fields}, sort_keys=True).encode()


def decode(text: bytes, fields: Iterable[str]) -> dict[str, Any] | None:
    """The *fields* a sidecar holds; None when it is torn or lacks one."""
    try:
        data = json.loads(text)
        return {k: data[k] for k in fields}
    except (ValueError, KeyError, TypeError):
        return None


async def read(host: Host, path: Path) -> bytes | None:
    """The sidecar at *path*; None when it cannot be read (gone, or a
    filesystem that does not answer)."""
    try:
        return await blocking.run(
            lambda: host.read_range(path, 0, 1 << 20),
            seconds=SECONDS,
            what=f"reading {path}",
        )
    except (OSError, blocking.Unanswered):
        return None


async def write(host: Host, path: Path, text: bytes) -> None:
    """Write the sidecar at *path* atomically (all of it or none)."""
    await blocking.run(
        lambda: host.write_atomically(path, text),
        seconds=SECONDS,
        what=f"writing {path}",
    )
