"""``rootfs_build``: ``kdlabctl image build`` against debootstrap + mke2fs by hand.

- ``rootfs_build``: kdlabd with an empty debootstrap cache of its own against
  ``debootstrap --variant=minbase`` and ``mke2fs -d`` run by hand with the
  same packages, mirror, size and ext4 features (the commands are kdlabd's
  own, :mod:`kdlabd.host.rootfs`). About 40 s a build, downloads included:
  --quick makes one of each.
- ``rootfs_build:cached``: the second build, from kdlabd's cached base (the
  fixture cache's, shared with the vm tests), against the same by hand: ``tar
  -x`` of that very base, then ``mke2fs -d``.

kdlab's builds also configure the tree (hostname, fstab, autologin) and upload
the image into its pool: that is its overhead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from bench.lab import bench_daemon, build_image, run, scratch, unique
from bench.measure import NO_GOAL, Row, interleaved, row
from kdlabd.core.rootfs import RootfsSpec
from kdlabd.host.rootfs import debootstrap_argv, mke2fs_argv
from tests.support.clients import kdlabctl
from tests.support.daemon import Kdlabd
from tests.support.system import build_cache, cached_base

SIZE = "1G"
SPEC = RootfsSpec("bookworm", size_bytes=1024**3)  # what build_image asks for


def _kdlab_build(daemon: Kdlabd, before: Path | None = None) -> float:
    """Seconds for ``kdlabctl image build``; *before* (a cache) is emptied first."""
    if before is not None:
        shutil.rmtree(before, ignore_errors=True)
    name = unique("bench-rootfs")
    start = time.perf_counter()
    try:
        build_image(daemon, name, SIZE)
        return time.perf_counter() - start
    finally:
        kdlabctl(daemon.address, "image", "delete", name)


def _by_hand(work: Path, fill: list[str]) -> float:
    """Seconds to *fill* ``work/tree``, ``mke2fs -d`` it and remove it.

    The tree's removal is timed: kdlabd's build removes its tree too.
    """
    tree, image = work / "tree", work / "by-hand.raw"
    tree.mkdir()
    start = time.perf_counter()
    try:
        run(fill)
        run(mke2fs_argv(tree, image, SPEC.size_bytes))
    finally:
        run(["rm", "-rf", "--one-file-system", str(tree)])
    took = time.perf_counter() - start
    image.unlink()
    return took


@contextlib.contextmanager
def _environ(key: str, value: str) -> Iterator[None]:
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


@contextlib.contextmanager
def _daemon_with_empty_cache() -> Iterator[tuple[Kdlabd, Path]]:
    """A bench kdlabd whose debootstrap cache is its own (and empty), and that cache.

    system_kdlabd puts kdlabd's cache (build_cache()) under $KDLAB_CACHE: it
    points at a scratch directory while kdlabd starts.
    """
    with scratch() as fixtures, contextlib.ExitStack() as stack:
        with _environ("KDLAB_CACHE", str(fixtures)):
            daemon = stack.enter_context(bench_daemon("kdlab-bench-rootfs"))
            cache = build_cache()
        yield daemon, cache


def _uncached(work: Path, runs: int) -> Row:
    with _daemon_with_empty_cache() as (daemon, cache):
        ours, theirs = interleaved(
            runs,
            lambda: _kdlab_build(daemon, before=cache),
            lambda: _by_hand(work, debootstrap_argv(SPEC, work / "tree")),
        )
    return row(
        "rootfs_build",
        ours,
        theirs,
        baseline="debootstrap --variant=minbase + mke2fs -d by hand",
        unit="s",
        goal=NO_GOAL,
        note="bookworm, systemd-sysv + udev, 1 GiB ext4, Debian's mirror",
    )


def _cached(work: Path, runs: int) -> Row:
    with bench_daemon() as daemon:
        entry = cached_base(SPEC)
        if not entry.is_file():
            _kdlab_build(daemon)  # bootstraps once, for every later run
        untar = [
            "tar",
            "-x",
            f"--file={entry}",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            f"--directory={work / 'tree'}",
        ]
        ours, theirs = interleaved(
            runs, lambda: _kdlab_build(daemon), lambda: _by_hand(work, untar)
        )
    return row(
        "rootfs_build:cached",
        ours,
        theirs,
        baseline="tar -x of the same cached base + mke2fs -d by hand",
        unit="s",
        goal=NO_GOAL,
        note="second build: kdlabd skips debootstrap",
    )


def rootfs_build(quick: bool) -> list[Row]:
    """The uncached build and the cached one."""
    with scratch() as work:
        return [_uncached(work, 1 if quick else 5), _cached(work, 2 if quick else 5)]
