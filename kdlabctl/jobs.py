"""Following a kdlabd job to its end, with a progress bar on a terminal.

The job's PropertiesChanged and Completed signals drive the bar: kdlabctl
reads the job once and then only listens (:meth:`Client.watch_job`).
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from kdlab.errors import EXIT_FAILURE, EXIT_OK, exit_code_for
from kdlab.states import JobState

if TYPE_CHECKING:
    from kdlabctl.client import Client, Job

BAR_WIDTH = 30


def bar(progress: float, status: str, width: int = BAR_WIDTH) -> str:
    """``[#########.........]  30% status``"""
    filled = round(progress * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {progress * 100:3.0f}% {status}"


async def follow(client: Client, path: str) -> Job:
    """Show the job's progress until it ends; Ctrl-C cancels it. Returns its end."""
    tty = sys.stderr.isatty()
    last_status = ""
    try:
        async with client.watch_job(path) as watch:
            while True:
                job = watch.current
                if tty:
                    line = bar(job.progress, job.status)[:120]
                    print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
                elif job.status != last_status and job.state is JobState.RUNNING:
                    print(job.status, file=sys.stderr, flush=True)
                last_status = job.status
                if job.state is not JobState.RUNNING or watch.ended:
                    if tty:
                        print(file=sys.stderr)
                    return job
                await watch.changed()
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nkdlabctl: cancelling the job", file=sys.stderr)
        await client.cancel_job(path)
        raise


async def finish(client: Client, path: str, *, quiet: bool = False) -> int:
    """Follow the job at *path* to its end (:func:`follow`): its exit code, with
    its last status on stdout unless *quiet*, or why it failed on stderr."""
    end = await follow(client, path)
    if end.state is not JobState.SUCCEEDED:
        what = f"{end.kind} of {end.target} {end.state}"
        print(f"kdlabctl: {what}: {end.status}", file=sys.stderr)
        return exit_code_for(end.error) if end.error else EXIT_FAILURE
    if not quiet:
        print(end.status)
    return EXIT_OK
