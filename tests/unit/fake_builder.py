"""A :class:`kdlabd.core.builder.Builder` for core tests: builds that write a
small raw image at once (or fail), and remember what was done to them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.errors import BuildFailed
from kdlabd.core.builder import Progress, Record
from kdlabd.core.rootfs import RootfsSpec


@dataclass
class FakeBuild:
    """One build; *events* lists run, kill and remove as they happen."""

    name: str
    image: Path
    failure: BaseException | None = None
    during: Callable[[], None] = lambda: None
    events: list[str] = field(default_factory=list)

    @property
    def record(self) -> dict[str, str]:
        return {"token": f"fake-{self.name}"}

    async def run(self, progress: Progress) -> None:
        self.events.append("run")
        self.during()
        progress(0.5, "half way")
        if self.failure is not None:
            raise self.failure
        self.image.write_bytes(b"a built raw image\n" * 4096)

    def open_image(self) -> int:
        return os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)

    async def kill(self) -> None:
        self.events.append("kill")

    async def remove(self) -> None:
        self.events.append("remove")
        self.image.unlink(missing_ok=True)


@dataclass
class FakeBuilder:
    """Makes :class:`FakeBuild`s in *directory*; *stuck* builds' tokens do not die."""

    directory: Path
    builds: list[FakeBuild] = field(default_factory=list)
    failure: BaseException | None = None
    during: Callable[[], None] = lambda: None
    stuck: set[str] = field(default_factory=set)
    killed: list[str] = field(default_factory=list)
    kept: list[Record] = field(default_factory=list)

    def rootfs(self, name: str, spec: RootfsSpec) -> FakeBuild:
        del spec  # what is built does not matter to the use case
        build = FakeBuild(name, self.directory / f"{name}.raw", self.failure)
        build.during = self.during
        self.builds.append(build)
        return build

    async def kill_left(self, record: Record) -> None:
        token = record.get("token", "")
        if token in self.stuck:
            raise BuildFailed(f"processes of build {token} did not die")
        self.killed.append(token)

    async def empty_scratch(self, kept: Sequence[Record]) -> None:
        self.kept = list(kept)
