"""Blocking calls off the event loop: worker threads that never hold kdlabd's exit.

kdlabd's loop must never block: libvirt calls, stream aborts, reads of a
caller's descriptor and socket connects run in threads. Some of those can hang
for as long as libvirtd or a file server does (``virStreamAbort`` on a
connection libvirtd stopped reading waits until a keepalive gives up, 30 s or
more). Two things keep such a thread from freezing kdlabd:

- :func:`run` gives a call a time limit: the caller gets :class:`Unanswered`
  when it is over, and the thread is left to finish on its own;
- :class:`DaemonThreads`, the loop's default executor (so ``asyncio.to_thread``
  uses it too), runs each call in a daemon thread of its own. asyncio's
  default executor is joined when the loop ends and Python joins its threads
  again at exit, so one stuck call used to keep a SIGTERMed kdlabd alive for
  ever; a daemon thread is simply dropped at exit. A thread per call also
  means a few hung calls (or long uploads) never starve the others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from kdlab.errors import InvalidArgument

log = structlog.get_logger(__name__)

T = TypeVar("T")

_THREAD_PREFIX = "kdlabd-"
_thread_ids = itertools.count(1)


class Unanswered(Exception):
    """A blocking call did not return within its time limit (it may still run)."""

    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"{what} did not return within {seconds:g} s")
        self.what = what
        self.seconds = seconds


class DaemonThreads(concurrent.futures.ThreadPoolExecutor):
    """Runs every call in a new daemon thread; shutting down never waits for them.

    A ThreadPoolExecutor only by type (asyncio's default executor must be
    one): its pool of non-daemon threads, joined at exit, is never started.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def work() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as err:
                future.set_exception(err)
            else:
                future.set_result(result)

        threading.Thread(target=work, name=thread_name("call"), daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to wait for: a call still running is dropped at exit."""


def thread_name(kind: str) -> str:
    """A name for a thread of kdlabd's own, as :func:`busy_threads` counts them."""
    return f"{_THREAD_PREFIX}{kind}-{next(_thread_ids)}"


def busy_threads() -> int:
    """How many of kdlabd's threads (blocking calls, console writers) still run."""
    return sum(t.name.startswith(_THREAD_PREFIX) for t in threading.enumerate())


async def run(fn: Callable[[], T], *, seconds: float, what: str) -> T:
    """*fn()* in a worker thread; :class:`Unanswered` if it takes over *seconds*.

    The thread is not interrupted (Python cannot): it finishes, or fails,
    whenever the call returns, and its result is dropped.
    """
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        # Our caller was cancelled (a VM stopped while its log was read): the
        # thread goes on, and its outcome has nobody left to hear it either.
        task.add_done_callback(_dropped)
        raise
    if not done:
        task.cancel()
        # The thread's late result or error has nobody left to hear it.
        task.add_done_callback(_dropped)
        log.warning("blocking.unanswered", call=what, seconds=seconds)
        raise Unanswered(what, seconds)
    return task.result()


def _dropped(task: asyncio.Future[Any]) -> None:
    """Retrieve a late call's outcome, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


DESCRIPTOR_SECONDS = 10.0
"""How long reading a caller's descriptor may take (a file on a stuck network
or FUSE filesystem never answers)."""


async def from_caller(look: Callable[[], T], what: str) -> T:
    """*look* at a caller's descriptor in a thread, within a time limit."""
    try:
        return await run(
            look, seconds=DESCRIPTOR_SECONDS, what=f"reading the {what} descriptor"
        )
    except Unanswered:
        raise InvalidArgument(
            f"{what}: reading the file took over {DESCRIPTOR_SECONDS:g} s; pass a "
            "file on a filesystem that answers (a local copy)"
        ) from None
