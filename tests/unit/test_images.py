"""kdlabd.core.images.ImageService around a libvirt reconnection."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from structlog.testing import capture_logs

from kdlabd.core.images import ImageService
from kdlabd.core.jobs import JobManager
from kdlabd.core.journal import Journal
from kdlabd.core.models import ImageRecord
from kdlabd.errors import HypervisorError


class Refusing:
    """A hypervisor whose pool cannot be listed (libvirt refused the refresh)."""

    async def list_images(self) -> list[ImageRecord]:
        await asyncio.sleep(0)
        raise HypervisorError("libvirt: internal error: pool has asynchronous jobs")


class Observer:
    def image_added(self, image: ImageRecord) -> None: ...

    def image_changed(self, image: ImageRecord) -> None: ...

    def image_removed(self, name: str) -> None: ...


def test_a_reload_after_a_reconnection_that_fails_is_logged(tmp_path: Path) -> None:
    """Not left as an exception nobody retrieves (asyncio logs those with a
    traceback, at some later garbage collection)."""
    unretrieved: list[object] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: unretrieved.append(context)
        )
        service = ImageService(
            Refusing(),  # type: ignore[arg-type]
            jobs=JobManager(),
            users=lambda _name: (),
            scratch_dir=tmp_path / "scratch",
            cache_dir=tmp_path / "cache",
            journal=Journal(tmp_path / "pending"),
            observer=Observer(),
        )
        service.hypervisor_reconnected()
        for _ in range(10):
            await asyncio.sleep(0)

    with capture_logs() as logs:
        asyncio.run(scenario())
        gc.collect()
    assert [entry["event"] for entry in logs] == ["images.reload_failed"]
    assert "asynchronous jobs" in logs[0]["error"]
    assert unretrieved == []
