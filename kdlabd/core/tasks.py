"""Work the loop starts and nobody awaits: held until it ends, its failure logged."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Background:
    """Tasks started in the background (a refresh after an event, a reload).

    asyncio holds only a weak reference to a task, so one nobody keeps may be
    collected before it ends; these are kept until they end. A failure is
    logged as *failed* (the owner's event name) with the error's message:
    nobody is left to raise it to.
    """

    def __init__(self, failed: str) -> None:
        self._failed = failed
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run *work* on the running loop."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def close(self) -> None:
        """Cancel what still runs and wait for it to end (kdlabd stops)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error(self._failed, error=str(error))
