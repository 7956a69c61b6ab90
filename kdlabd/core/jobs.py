"""Long operations (image uploads and builds) as jobs clients can watch and cancel.

A job runs as an asyncio task. Its work reports progress with
:meth:`Job.report` (on the loop) or :meth:`Job.report_from_thread` (from a
worker thread, which also stops the work once the job is cancelled). A
finished job stays visible for a while so a client that looks late still
sees how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog

from kdlab.errors import Internal, KdlabError, NoSuchJob
from kdlab.states import JobState
from kdlabd.core.observers import Observers

log = structlog.get_logger(__name__)

T = TypeVar("T")

KEEP_FINISHED_SECONDS = 300.0
_NOTIFY_INTERVAL = 0.1


class JobCancelled(Exception):
    """Raised inside a job's work once the job was cancelled."""


@dataclass(eq=False)
class Job:
    """One long operation: what it does, for whom, and how far it got."""

    id: int
    kind: str
    target: str
    owner_uid: int
    progress: float = 0.0
    status: str = "starting"
    state: JobState = JobState.RUNNING
    message: str = ""
    error: str = ""
    """The D-Bus error name of a failure ("" otherwise), for exit codes."""
    _notify: Callable[[Job], None] = field(default=lambda _job: None, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _last_notified: float = field(default=0.0, repr=False)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def report(self, progress: float, status: str | None = None) -> None:
        """Publish progress (0..1) and optionally a status line. Loop thread only.

        Watchers hear of a change at most every 0.1 s, so a fast upload does
        not flood the bus.
        """
        if self.cancelled:
            raise JobCancelled
        self.progress = max(0.0, min(1.0, progress))
        if status is not None:
            self.status = status
        now = time.monotonic()
        if now - self._last_notified >= _NOTIFY_INTERVAL or self.progress >= 1.0:
            self._last_notified = now
            self._notify(self)

    def report_from_thread(self, progress: float, status: str | None = None) -> None:
        """:meth:`report` for worker threads; raises JobCancelled once cancelled."""
        if self.cancelled:
            raise JobCancelled
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._report_quietly, progress, status)

    def _report_quietly(self, progress: float, status: str | None) -> None:
        if not self.cancelled:
            self.report(progress, status)


async def finish_on_cancel(work: Awaitable[T]) -> T:
    """Await *work* (say, a worker thread) and, if cancelled, let it wind down first.

    A thread cannot be interrupted: a cancelled job's thread stops at its next
    progress report and cleans up; the job ends only after that, so nothing
    it made is left behind.
    """
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await future
        raise


class JobObserver(Protocol):
    """Told about every job from its start to its removal (the bus layer exports
    objects)."""

    def job_added(self, job: Job) -> None: ...

    def job_changed(self, job: Job) -> None: ...

    def job_finished(self, job: Job) -> None: ...

    def job_removed(self, job: Job) -> None: ...


Work = Callable[[Job], Awaitable[None]]


class JobManager:
    """Runs jobs and keeps them visible until a while after they end."""

    def __init__(self, keep_finished: float = KEEP_FINISHED_SECONDS) -> None:
        self._observers: Observers[JobObserver] = Observers()
        self._keep_finished = keep_finished
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def subscribe(self, observer: JobObserver) -> Callable[[], None]:
        """Tell *observer* of every job from now on; returns the function that
        ends the subscription."""
        return self._observers.subscribe(observer)

    def start(self, kind: str, target: str, owner_uid: int, work: Work) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(next(self._ids), kind, target, owner_uid, _loop=loop)
        job._notify = self._changed
        self._jobs[job.id] = job
        for observer in self._observers:
            observer.job_added(job)
        self._tasks[job.id] = loop.create_task(self._run(job, work))
        log.info("job.started", job=job.id, kind=kind, target=target)
        return job

    def get(self, job_id: int) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NoSuchJob(
                f"no job {job_id} (finished jobs are kept a few minutes)"
            ) from None

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def running_on(self, target: str) -> Job | None:
        """The running job that works on *target*, if any."""
        return next(
            (
                j
                for j in self._jobs.values()
                if j.target == target and j.state is JobState.RUNNING
            ),
            None,
        )

    def running_of(self, owner_uid: int) -> int:
        """How many jobs of *owner_uid* are running."""
        return sum(
            j.owner_uid == owner_uid and j.state is JobState.RUNNING
            for j in self._jobs.values()
        )

    def cancel(self, job_id: int) -> None:
        job = self.get(job_id)
        if job.state is not JobState.RUNNING:
            return
        job._cancel.set()
        # Soon, not now: a task cancelled before its first step never runs its
        # work at all, so the work's clean-up (closing its descriptor, freeing
        # its image name) would never run and the job would stay "running". The
        # first step was scheduled when the job started: it comes first.
        asyncio.get_running_loop().call_soon(self._tasks[job_id].cancel)

    async def wait(self, job_id: int) -> Job:
        """Wait for the job to end (for tests and callers that block)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task})
        return self.get(job_id)

    async def _run(self, job: Job, work: Work) -> None:
        try:
            await work(job)
        except (asyncio.CancelledError, JobCancelled):
            self._finish(job, JobState.CANCELLED, "cancelled")
        except KdlabError as err:
            job.error = err.dbus_name()
            self._finish(job, JobState.FAILED, str(err))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("job.internal_error", job=job.id, incident=incident)
            job.error = Internal.dbus_name()
            self._finish(job, JobState.FAILED, f"internal error (incident {incident})")
        else:
            job.progress = 1.0
            self._finish(job, JobState.SUCCEEDED, job.status or "done")
        finally:
            self._tasks.pop(job.id, None)

    def _finish(self, job: Job, state: JobState, message: str) -> None:
        job.state, job.message = state, message
        job.status = message
        log.info("job.finished", job=job.id, state=state.value, message=message)
        for observer in self._observers:
            observer.job_finished(job)
        asyncio.get_running_loop().call_later(self._keep_finished, self._remove, job.id)

    def _changed(self, job: Job) -> None:
        for observer in self._observers:
            observer.job_changed(job)

    def _remove(self, job_id: int) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            for observer in self._observers:
                observer.job_removed(job)
