"""kdlabd.core.jobs: what subscribers of the job manager hear of a job's life."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kdlabd.core.jobs import Job, JobManager


@dataclass
class JobRecorder:
    """A JobObserver that remembers what it was told, with the job's state then."""

    events: list[tuple[str, int, str]] = field(default_factory=list)

    def job_added(self, job: Job) -> None:
        self.events.append(("added", job.id, job.state.value))

    def job_changed(self, job: Job) -> None:
        self.events.append(("changed", job.id, job.state.value))

    def job_finished(self, job: Job) -> None:
        self.events.append(("finished", job.id, job.state.value))

    def job_removed(self, job: Job) -> None:
        self.events.append(("removed", job.id, job.state.value))


def test_subscribers_hear_a_job_from_start_to_removal_until_they_leave() -> None:
    jobs = JobManager(keep_finished=0)
    # Equal recorders: leaving ends one subscription, not any equal observer's.
    first, second = JobRecorder(), JobRecorder()
    jobs.subscribe(first)
    leave = jobs.subscribe(second)

    async def work(job: Job) -> None:
        job.report(1.0, "copied")
        leave()

    async def scenario() -> None:
        jobs.start("import", "disk", 1000, work)
        for _ in range(100):  # the job runs, finishes and is removed
            await asyncio.sleep(0)

    asyncio.run(scenario())
    told = [("added", 1, "running"), ("changed", 1, "running")]
    assert first.events == [
        *told,
        ("finished", 1, "succeeded"),
        ("removed", 1, "succeeded"),
    ]
    assert second.events == told
    assert jobs.list() == []
