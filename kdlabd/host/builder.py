"""Image builds on this host: a scratch directory and a sandbox per build.

Each build works in ``SCRATCH/build-NAME-TOKEN`` and runs its programs in the
sandbox named by TOKEN (:mod:`kdlabd.host.sandbox`); its record (scratch, token,
whether systemd runs the steps) is what kdlabd's journal keeps, so a kdlabd
killed in the middle kills and removes what is left when it starts again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog

from kdlabd.core.builder import Progress, Record
from kdlabd.core.rootfs import RootfsSpec
from kdlabd.host.rootfs import build_agent, build_rootfs
from kdlabd.host.sandbox import BuildSandbox, kill_build

log = structlog.get_logger(__name__)

IMAGE = "image.raw"

Make = Callable[[Path, Path, BuildSandbox, Progress], Awaitable[None]]
"""Makes the image (second path) working in the scratch directory (first path),
every program confined by the sandbox."""


class LocalBuild:
    """One build on this host: its sandbox, its scratch directory, its image."""

    def __init__(self, scratch_dir: Path, name: str, make: Make) -> None:
        self.sandbox = BuildSandbox()
        self._scratch_dir = scratch_dir
        self.scratch = scratch_dir / f"build-{name}-{self.sandbox.token}"
        self.image = self.scratch / IMAGE
        self._make = make

    @property
    def record(self) -> dict[str, str]:
        return {
            "scratch": str(self.scratch),
            "token": self.sandbox.token,
            "systemd": "yes" if self.sandbox.systemd else "no",
        }

    async def run(self, progress: Progress) -> None:
        await asyncio.to_thread(self._make_scratch)
        await self._make(self.scratch, self.image, self.sandbox, progress)

    def _make_scratch(self) -> None:
        self._scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.scratch.mkdir(mode=0o700)

    def open_image(self) -> int:
        return os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)

    async def kill(self) -> None:
        await asyncio.to_thread(self.sandbox.kill)

    async def remove(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.scratch, True)


class LocalBuilder:
    """Builds images in *scratch_dir*, keeping debootstrap's bases and the exec
    agent the images run in *cache_dir*."""

    def __init__(self, scratch_dir: Path, cache_dir: Path) -> None:
        self._scratch_dir = scratch_dir
        self._cache_dir = cache_dir

    def rootfs(self, name: str, spec: RootfsSpec) -> LocalBuild:
        async def make(
            scratch: Path, image: Path, sandbox: BuildSandbox, progress: Progress
        ) -> None:
            # First: a host without a compiler fails before a long debootstrap.
            agent = await build_agent(self._cache_dir)
            await build_rootfs(
                spec,
                scratch,
                self._cache_dir,
                image,
                progress,
                agent_binary=agent,
                sandbox=sandbox,
            )

        return LocalBuild(self._scratch_dir, name, make)

    async def kill_left(self, record: Record) -> None:
        token = record.get("token", "")
        if token:
            systemd = record.get("systemd") == "yes"
            await asyncio.to_thread(kill_build, token, systemd=systemd)

    async def empty_scratch(self, kept: Sequence[Record]) -> None:
        keep = {record.get("scratch", "") for record in kept}
        await asyncio.to_thread(self._empty_scratch, keep)

    def _empty_scratch(self, keep: set[str]) -> None:
        try:
            entries = list(os.scandir(self._scratch_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.path not in keep:
                log.warning("reconcile.removed_scratch", path=entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
