"""kdlabd.core.tasks.Background: work nobody awaits still ends, and is heard of."""

from __future__ import annotations

import asyncio
import gc

from structlog.testing import capture_logs

from kdlabd.core.tasks import Background


def test_a_failure_is_logged_under_the_owners_event_and_not_left_unretrieved() -> None:
    unretrieved: list[object] = []
    finished: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("the reason")

    async def works() -> None:
        await asyncio.sleep(0)
        finished.append("works")

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: unretrieved.append(context)
        )
        background = Background("owner.work_failed")
        background.start(fails())
        background.start(works())
        gc.collect()  # a task only the loop knows of may be collected mid-way
        for _ in range(10):
            await asyncio.sleep(0)

    with capture_logs() as logs:
        asyncio.run(scenario())
        gc.collect()
    assert logs == [
        {"event": "owner.work_failed", "error": "the reason", "log_level": "error"}
    ]
    assert finished == ["works"]
    assert unretrieved == []


def test_a_cancelled_task_is_not_a_failure() -> None:
    async def scenario() -> None:
        background = Background("owner.work_failed")
        background.start(asyncio.sleep(3600))
        await asyncio.sleep(0)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.sleep(0)

    with capture_logs() as logs:
        asyncio.run(scenario())
    assert logs == []
