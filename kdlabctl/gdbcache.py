"""gdb's index cache, one per user: where it is, warming it, dropping the dead.

gdb 13 reads the DWARF of Debian's 590 MB debug vmlinux in about 1.5 s each
time it starts; with its index cache on (``set index-cache enabled on``), a
start that finds the vmlinux's index there takes about 0.6 s. ``kdlabctl gdb``
(and ``up``) give gdb the caller's own cache: ``$XDG_CACHE_HOME/kdlab/gdb-index``,
else ``~/.cache/kdlab/gdb-index``, mode 0700, refused when anyone but the
caller and root could change it (gdb trusts what it reads there).

gdb names an entry after the vmlinux's build ID (``<build-id>.gdb-index``,
37 MB for Debian's). kdlabctl remembers which vmlinux files had each build ID
(``vmlinux.json``) and drops every entry no remembered file has any more: the
file is gone, or a rebuild gave it another build ID.

When a VM gets a vmlinux (``create``, ``kernel build``), :func:`warm` starts a
gdb in the background that writes the index, so that the first attach is
fast too; the command does not wait for it. That gdb holds an flock on
``<build-id>.lock`` while it runs (it inherits the locked descriptor): a
second warmup of the same build ID starts nothing. It runs at the lowest CPU
priority: on a 2-core machine the gdb a user waits for, QEMU and a kernel
build keep the cores, and the warmup takes what they leave.

The gdb a user waits for never writes an index, and never waits for one:
gdb 13 writes it in the foreground (Debian's vmlinux then loads in ~2.5 s
instead of ~1.5 s). Without an index yet it loads as gdb does without the
cache, and a warmup (unless one runs) makes the index for the next time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from kdlab.kernel.vmlinux import HEADER_BYTES, build_id, note_segments
from kdlabctl.debug import untrusted

INDEX_SUFFIX = ".gdb-index"  # gdb 13's name: <build-id>.gdb-index
MAP = "vmlinux.json"  # build ID -> the vmlinux files that had it
MAP_LOCK = "vmlinux.lock"
WARM_NICE = 19
_POLL = 0.05


class CacheError(Exception):
    """The caller has no usable cache directory; the message says why."""


def cache_home(env: Mapping[str, str] | None = None) -> Path:
    """kdlabctl's caches of the caller: ``$XDG_CACHE_HOME/kdlab``, else
    ``~/.cache/kdlab`` (gdb's index, kdlab's agent and initramfs archives)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: ignore a relative path
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".cache")
    return Path(base, "kdlab")


def location(env: Mapping[str, str] | None = None) -> Path:
    """Where the caller's gdb index cache is."""
    return cache_home(env) / "gdb-index"


def read_build_id(path: Path) -> str:
    """The build ID of the ELF file at *path*, or "" (none, not a file, unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        for offset, size in note_segments(os.pread(fd, HEADER_BYTES, 0)):
            found = build_id(os.pread(fd, size, offset))
            if found:
                return found
    except OSError:
        return ""
    finally:
        os.close(fd)
    return ""


class IndexCache:
    """A user's gdb index cache directory (made by :func:`open_cache`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def gdb_options(self) -> list[str]:
        """gdb's options to read and write this cache (before symbols load)."""
        return [
            "-iex",
            f"set index-cache directory {self.directory}",
            "-iex",
            "set index-cache enabled on",
        ]

    def index(self, build: str) -> Path:
        """Where gdb keeps the index of build ID *build*."""
        return self.directory / f"{build}{INDEX_SUFFIX}"

    def remember(self, vmlinux: Path, build: str) -> list[str]:
        """Note that *vmlinux* has build ID *build*; drop what is dead (the
        build IDs dropped)."""
        with self._locked():
            known = self._load()
            paths = known.setdefault(build, [])
            if str(vmlinux) not in paths:
                paths.append(str(vmlinux))
            dropped = _prune(known)
            self._save(known)
            self._remove_unknown(known)
        return dropped

    def warming(self, build: str) -> bool:
        """Whether a warmup of *build* runs now."""
        return not self.wait(build, 0)

    def wait(self, build: str, timeout: float) -> bool:
        """Wait up to *timeout* seconds for a warmup of *build* to end; whether
        none runs any more."""
        try:
            fd = os.open(self._lock(build), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(_POLL)
        finally:
            os.close(fd)

    def warm(self, vmlinux: Path, build: str, gdb: str = "gdb") -> bool:
        """Start gdb in the background to write *vmlinux*'s index, unless it is
        there or being written; whether one started."""
        if self.index(build).exists():
            return False
        lock = os.open(self._lock(build), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another warmup holds it
            if self.index(build).exists():  # the last one ended just now
                return False
            # gdb holds the locked descriptor until it exits, long after us.
            # sh's "&" leaves it nobody's child (kdlabctl gdb would keep a
            # finished one as a zombie), in a process group of its own (the
            # terminal's Ctrl-C is for the gdb the user runs) but in the
            # caller's session: with the kernel's autogroups a new session
            # (setsid) would get a CPU share of its own, whatever its nice.
            subprocess.run(
                ["sh", "-c", '"$@" &', "sh", "nice", "-n", str(WARM_NICE),
                 gdb, "-nx", "-batch", "-iex", "set auto-load off",
                 *self.gdb_options(), str(vmlinux)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(lock,),
                process_group=0,
                check=True,
            )  # fmt: skip
            return True
        finally:
            os.close(lock)

    def _lock(self, build: str) -> Path:
        return self.directory / f"{build}.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The map's lock: one kdlabctl at a time reads, prunes and writes it."""
        fd = os.open(
            self.directory / MAP_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, list[str]]:
        try:
            data = json.loads((self.directory / MAP).read_text())
        except (OSError, ValueError):
            return {}  # none yet, or damaged: the entries are rebuilt as used
        if not isinstance(data, dict):
            return {}
        return {
            str(build): [str(path) for path in paths]
            for build, paths in data.items()
            if isinstance(paths, list)
        }

    def _save(self, known: dict[str, list[str]]) -> None:
        new = self.directory / f"{MAP}.new"
        new.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        new.replace(self.directory / MAP)

    def _remove_unknown(self, known: Mapping[str, list[str]]) -> None:
        """Remove every file of a build ID the map does not hold: its index,
        gdb's half-written copies (``<index>-XXXXXX``) and its lock."""
        for entry in os.scandir(self.directory):
            if entry.name in (MAP, MAP_LOCK):
                continue
            if entry.name.split(".", 1)[0].split("-", 1)[0] not in known:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _prune(known: dict[str, list[str]]) -> list[str]:
    """Keep of each build ID the files that still have it; drop the build IDs
    left with none. Returns those dropped."""
    dropped = []
    for build, paths in list(known.items()):
        alive = [path for path in paths if read_build_id(Path(path)) == build]
        if alive:
            known[build] = alive
        else:
            del known[build]
            dropped.append(build)
    return dropped


def open_cache(
    uid: int | None = None, env: Mapping[str, str] | None = None
) -> IndexCache:
    """The caller's cache directory, made 0700 if missing (or :class:`CacheError`).

    It must be a directory of the caller's that nobody else may write, below
    directories only the caller or root may change (:func:`~kdlabctl.debug.untrusted`):
    gdb trusts the indexes it finds there.
    """
    uid = os.getuid() if uid is None else uid
    directory = location(env)
    try:
        _make_private(directory)
        info = os.lstat(directory)
    except OSError as err:
        raise CacheError(f"cannot make {directory}: {err.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"{directory} is not a directory")
    if info.st_uid != uid:
        raise CacheError(f"{directory} belongs to uid {info.st_uid}")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)
    reason = untrusted(directory, uid)
    if reason:
        raise CacheError(reason)
    return IndexCache(directory)


def _make_private(directory: Path) -> None:
    """mkdir -p with mode 0700 for every directory it makes (os.makedirs gives
    the missing parents the umask's mode)."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another kdlabctl made it
            path.mkdir(mode=0o700)


def warm(vmlinux: Path) -> bool:
    """Index *vmlinux* into the caller's cache in the background, if it can be
    and is not yet; whether a gdb started. Never fails: a cache is an extra."""
    try:
        build = read_build_id(vmlinux)
        if not build:
            return False
        cache = open_cache()
        cache.remember(vmlinux.resolve(), build)
        return cache.warm(vmlinux, build)
    except (CacheError, OSError, subprocess.CalledProcessError):
        return False


def gdb_options(vmlinux: Path, say: Callable[[str], None]) -> list[str]:
    """gdb's options to read *vmlinux*'s (resolved) index from the caller's cache.

    With no index yet: none (gdb loads without the cache), and a warmup
    starts unless one runs. Without a usable cache gdb runs without one, and
    *say* tells the user why.
    """
    build = read_build_id(vmlinux)
    if not build:
        return []  # gdb keys its cache by build ID: nothing to cache
    try:
        cache = open_cache()
        cache.remember(vmlinux, build)
    except (CacheError, OSError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err)
        say(
            f"gdb's index cache is off ({reason}): set XDG_CACHE_HOME to a "
            "directory of yours"
        )
        return []
    if cache.index(build).exists():
        return cache.gdb_options()
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        cache.warm(vmlinux, build)
    return []
