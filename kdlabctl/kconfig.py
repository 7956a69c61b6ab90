"""Where a kernel's ``.config`` is, and what its last build left out.

The client's side of ``kdlabctl kernel check``: it finds a tree's files and reads
them as the user; the rules that judge a config are :mod:`kdlab.kernel.kconfig`'s.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple


class KernelError(Exception):
    """A kernel tree, build directory or config kdlab cannot use; the message says
    what to do about it."""


class Location(NamedTuple):
    """Where a kernel's files are: its ``.config`` and, when known, source and build."""

    config: Path
    tree: Path | None  # the source tree (scripts/config, Kconfig files)
    build: Path | None  # the tree itself, or the O= directory


def locate(path: Path | str) -> Location:
    """Find the ``.config`` for *path*: a source tree, an ``O=`` build directory, or
    a config file (``/boot/config-*``, or a ``.config`` whose directory is a tree)."""
    path = Path(path)
    if path.is_file():
        if path.name != ".config":
            return Location(path, None, None)
        return Location(path, *directories(path.parent))
    tree, build = directories(path)
    if tree is None and build is None:
        raise KernelError(
            f"{path} is neither a kernel source tree, an O= build directory "
            "nor a .config file"
        )
    assert build is not None
    config = build / ".config"
    if not config.is_file():
        hint = "" if build != tree else " (built with O=DIR? give DIR instead)"
        raise KernelError(
            f"no .config in {build}{hint}: run kdlabctl kernel configure {path}"
        )
    return Location(config, tree, build)


def source_tree_of(build: Path) -> Path | None:
    """The source tree an ``O=`` directory was made from, or None if it is not one.

    Kbuild leaves a ``source`` symlink and a ``Makefile`` that includes the tree's.
    """
    link = build / "source"
    if link.is_symlink() and is_source_tree(link.resolve()):
        return link.resolve()
    try:
        makefile = (build / "Makefile").read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r"^include\s+(\S+)/Makefile\s*$", makefile, re.MULTILINE)
    if match and is_source_tree(Path(match.group(1))):
        return Path(match.group(1))
    return None


def is_source_tree(path: Path) -> bool:
    """Whether *path* is the top of a Linux source tree."""
    return all(
        (path / name).exists() for name in ("Kconfig", "Makefile", "scripts/config")
    )


def directories(path: Path) -> tuple[Path | None, Path | None]:
    """(tree, build) for a directory: a tree builds in itself, an O= directory in
    itself from its tree; (None, None) for anything else."""
    if is_source_tree(path):
        return path, path
    tree = source_tree_of(path)
    return (tree, path) if tree is not None else (None, None)


def unbuilt_gdb_scripts(build: Path | None) -> Path | None:
    """The ``vmlinux-gdb.py`` a build of vmlinux in *build* left out, if it did."""
    if build is None or not (build / "vmlinux").is_file():
        return None
    scripts = build / "vmlinux-gdb.py"
    return None if scripts.exists() else scripts
