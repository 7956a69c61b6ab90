"""Reading a VM's console log for the boot diagnosis (:mod:`kdlab.kernel.diagnosis`)."""

from __future__ import annotations

import os
from pathlib import Path

from kdlab.kernel.diagnosis import HEAD_SIZE, TAIL_SIZE


def read_console_log(path: Path) -> str:
    """The parts of the console log at *path* that the diagnosis reads.

    A log can grow without bound (a guest printing in a loop); only its first
    :data:`HEAD_SIZE` and last :data:`TAIL_SIZE` bytes are read.
    """
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(0)
        if size <= HEAD_SIZE + TAIL_SIZE:
            data = file.read()
        else:
            head = file.read(HEAD_SIZE)
            file.seek(size - TAIL_SIZE)
            data = head + b"\n" + file.read()
    return data.decode("utf-8", errors="replace")
