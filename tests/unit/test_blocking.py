"""kdlabd.core.blocking and the descriptor limit: what keeps kdlabd's loop and
exit free of calls that hang."""

from __future__ import annotations

import asyncio
import gc
import resource
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kdlabd import daemon
from kdlabd.core import blocking
from tests.support import REPO


def test_run_returns_the_result_and_raises_the_error() -> None:
    async def scenario() -> None:
        assert await blocking.run(lambda: 6 * 7, seconds=5, what="sum") == 42
        with pytest.raises(ZeroDivisionError):
            await blocking.run(lambda: 1 // 0, seconds=5, what="division")

    asyncio.run(scenario())


def test_run_gives_up_after_its_time_limit_and_the_loop_stays_free() -> None:
    release = threading.Event()

    async def scenario() -> float:
        # As in kdlabd: asyncio's own executor would wait for the thread at the end.
        asyncio.get_running_loop().set_default_executor(blocking.DaemonThreads())
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beating = asyncio.ensure_future(ticker())
        started = time.monotonic()
        with pytest.raises(blocking.Unanswered, match="stuck call did not return"):
            await blocking.run(release.wait, seconds=0.3, what="stuck call")
        waited = time.monotonic() - started
        beating.cancel()
        assert ticks > 5, "the loop ran meanwhile"
        return waited

    try:
        assert asyncio.run(scenario()) < 2
    finally:
        release.set()


def test_a_call_whose_caller_is_cancelled_fails_quietly() -> None:
    """The caller of run() cancelled, the thread's later error is dropped, not
    logged by asyncio as "Task exception was never retrieved" (which failed
    the bench: a diagnosis cancelled while it read a log that then vanished)."""
    reported: list[dict[str, object]] = []
    release = threading.Event()

    def fails_late() -> None:
        release.wait(5)
        raise FileNotFoundError("the log went away")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        caller = asyncio.ensure_future(
            blocking.run(fails_late, seconds=30, what="reading a log")
        )
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        release.set()
        await asyncio.sleep(0.2)  # the thread fails, its task ends
        gc.collect()  # asyncio reports a lost exception when the task is freed
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert reported == []


def test_a_stuck_call_does_not_hold_the_exit() -> None:
    """With DaemonThreads as the loop's executor, a process whose call never
    returns still exits (asyncio's own executor would wait for ever)."""
    program = textwrap.dedent(
        """
        import asyncio, threading
        from kdlabd.core import blocking

        async def main():
            asyncio.get_running_loop().set_default_executor(blocking.DaemonThreads())
            never = threading.Event()
            try:
                await blocking.run(never.wait, seconds=0.2, what="a hung libvirt call")
            except blocking.Unanswered:
                print("gave up", blocking.busy_threads())

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "gave up 1"


@pytest.mark.parametrize(
    ("limits", "raised"),
    # (A hard limit above this machine's cannot be set without CAP_SYS_RESOURCE.)
    [("256:4096", 4096), ("1024:1024", 1024)],
)
def test_descriptor_soft_limit_is_raised_at_start(limits: str, raised: int) -> None:
    """Without systemd (no LimitNOFILE=) kdlabd raises its soft limit itself."""
    program = (
        "import resource; from kdlabd.daemon import raise_descriptor_limit; "
        "print(raise_descriptor_limit(), "
        "resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    done = subprocess.run(
        ["prlimit", f"--nofile={limits}", sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(raised)] * 2


def test_descriptor_soft_limit_stops_at_the_units(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A generous hard limit (containers: 2^20) is not taken whole."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 1 << 20))
    monkeypatch.setattr(resource, "setrlimit", lambda _which, pair: calls.append(pair))
    assert daemon.raise_descriptor_limit() == daemon.DESCRIPTOR_LIMIT
    assert calls == [(daemon.DESCRIPTOR_LIMIT, 1 << 20)]
