"""Following a kdlabd job to its end, with a progress bar on a terminal."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

from kdlab.wire import JOB_INTERFACE

if TYPE_CHECKING:
    from kdlabctl.client import Client

POLL_SECONDS = 0.2
BAR_WIDTH = 30


def bar(progress: float, status: str, width: int = BAR_WIDTH) -> str:
    """``[#########.........]  30% status``"""
    filled = round(progress * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {progress * 100:3.0f}% {status}"


async def follow(client: Client, path: str) -> dict[str, Any]:
    """Show the job's progress until it ends; Ctrl-C cancels it. Returns its end."""
    tty = sys.stderr.isatty()
    last_status = ""
    try:
        while True:
            props = await client.properties(path, JOB_INTERFACE)
            if tty:
                line = bar(props["Progress"], props["Status"])[:120]
                print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
            elif props["Status"] != last_status and props["State"] == "running":
                print(props["Status"], file=sys.stderr, flush=True)
            last_status = props["Status"]
            if props["State"] != "running":
                if tty:
                    print(file=sys.stderr)
                return props
            await asyncio.sleep(POLL_SECONDS)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nkdlabctl: cancelling the job", file=sys.stderr)
        await client.call(path, JOB_INTERFACE, "Cancel")
        raise
