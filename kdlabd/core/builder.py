"""The seam between the image use cases and the host that builds images.

A build runs programs (debootstrap, tar, mke2fs) confined on kdlabd's host and
leaves a raw image in a scratch directory of its own; :mod:`kdlabd.host.builder`
implements it. The use case (:class:`~kdlabd.core.images.ImageService`)
journals each build's :attr:`Build.record` before it starts, so that a kdlabd
killed in the middle can have what is left of it killed and removed
(:meth:`Builder.kill_left`, :meth:`Builder.empty_scratch`) when it starts again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from kdlabd.core.rootfs import RootfsSpec

Progress = Callable[[float, str], None]
"""Told how far a build got: a fraction from 0 to 1 and a status line. Called
on the loop; it may raise to stop the build."""

Record = Mapping[str, str]
"""What the journal keeps of a build to clean up after it (see :class:`Build`)."""


class Build(Protocol):
    """One image build: its processes and its scratch space on the host."""

    @property
    def record(self) -> dict[str, str]:
        """What to journal before :meth:`run`, for :meth:`Builder.kill_left`."""

    async def run(self, progress: Progress) -> None:
        """Build the raw image; raises BuildFailed or InvalidArgument."""

    def open_image(self) -> int:
        """A read-only descriptor of the image :meth:`run` made, for the caller."""

    async def kill(self) -> None:
        """Kill every process of the build and wait until they are gone.

        Raises BuildFailed if some would not die."""

    async def remove(self) -> None:
        """Remove the build's scratch space and all it holds."""


class Builder(Protocol):
    """Makes builds, and cleans up after builds that died with kdlabd."""

    def rootfs(self, name: str, spec: RootfsSpec) -> Build:
        """A build (not started yet) of the Debian root file system *spec*."""

    async def kill_left(self, record: Record) -> None:
        """Kill what is left of the journalled build *record* (BuildFailed if
        some would not die)."""

    async def empty_scratch(self, kept: Sequence[Record]) -> None:
        """Remove every build's scratch space but the scratch of *kept*."""
