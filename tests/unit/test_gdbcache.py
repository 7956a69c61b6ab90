"""gdb's index cache per user (kdlabctl.gdbcache) and the build ID it is keyed by.

Real files in a temporary directory; the warmups run a stand-in gdb (a shell
script) so that the locking can be watched. tests/vm/test_debug.py runs the
real gdb on Debian's vmlinux, as two users.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kdlab.kernel import vmlinux
from kdlabctl import gdbcache

ME = os.getuid()
OTHER = 54321  # a uid that is neither the caller nor root


def elf(build: bytes, *, other_notes: int = 1) -> bytes:
    """An ELF64 file whose PT_NOTE segment holds *other_notes* notes, then the
    GNU build ID *build* (as ``ld --build-id`` writes it, after Xen's in a
    kernel)."""
    notes = b""
    for i in range(other_notes):
        notes += struct.pack("<III", 4, 4, 6) + b"Xen\0" + struct.pack("<I", i)
    notes += struct.pack("<III", 4, len(build), 3) + b"GNU\0" + build
    phoff, notes_at = 64, 64 + 2 * 56
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 32, phoff)
    struct.pack_into("<HH", header, 54, 56, 2)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 64, 64, 0x1000)
    note = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + load + note + notes


BUILD_A = bytes(range(20))
BUILD_B = bytes(range(20, 40))
BUILD_C = bytes(range(40, 60))


# --- the build ID ---------------------------------------------------------------------


def test_build_id_is_the_gnu_note_after_the_others() -> None:
    data = elf(BUILD_A, other_notes=3)
    segments = vmlinux.note_segments(data)
    assert len(segments) == 1
    offset, size = segments[0]
    assert vmlinux.build_id(data[offset : offset + size]) == BUILD_A.hex()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x7fELF",
        b"\x7fELF\x01\x01" + bytes(58),  # 32-bit
        b"#!/bin/sh\n" + bytes(100),
        elf(BUILD_A)[:100],  # program headers cut off
    ],
)
def test_what_is_not_a_whole_elf64_header_has_no_notes(data: bytes) -> None:
    assert vmlinux.note_segments(data) == []


def test_notes_cut_short_have_no_build_id() -> None:
    data = elf(BUILD_A)
    ((offset, size),) = vmlinux.note_segments(data)
    assert vmlinux.build_id(data[offset : offset + size - 4]) == ""


def test_a_file_without_the_note_has_no_build_id(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"\x7fELF" + bytes(4096))
    assert gdbcache.read_build_id(plain) == ""
    assert gdbcache.read_build_id(tmp_path / "missing") == ""
    assert gdbcache.read_build_id(tmp_path) == "", "a directory"


def test_build_id_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "vmlinux"
    path.write_bytes(elf(BUILD_B))
    assert gdbcache.read_build_id(path) == BUILD_B.hex()


# --- where the cache is, and whose ----------------------------------------------------


def test_location_is_the_users_xdg_cache_home_else_home_dot_cache() -> None:
    assert gdbcache.location({"XDG_CACHE_HOME": "/x/c", "HOME": "/h"}) == Path(
        "/x/c/kdlab/gdb-index"
    )
    assert gdbcache.location({"HOME": "/h"}) == Path("/h/.cache/kdlab/gdb-index")
    # The XDG spec: a relative path is invalid and ignored.
    assert gdbcache.location({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.cache/kdlab/gdb-index"
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home directory of the caller's (pytest's, under root's sticky /tmp)."""
    path = tmp_path / "home"
    path.mkdir(mode=0o755)
    return path


def test_every_directory_made_is_0700_whatever_the_umask(home: Path) -> None:
    old = os.umask(0)
    try:
        cache = gdbcache.open_cache(env={"HOME": str(home)})
    finally:
        os.umask(old)
    assert cache.directory == home / ".cache" / "kdlab" / "gdb-index"
    for made in (home / ".cache", home / ".cache" / "kdlab", cache.directory):
        info = made.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, ME), made


def test_an_open_cache_directory_of_the_users_is_closed_again(home: Path) -> None:
    directory = home / "kdlab" / "gdb-index"
    directory.mkdir(parents=True, mode=0o700)
    directory.chmod(0o755)
    gdbcache.open_cache(env={"XDG_CACHE_HOME": str(home)})
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_another_users_cache_directory_is_refused(home: Path) -> None:
    """Its indexes are what gdb would trust: never shared between users."""
    gdbcache.open_cache(env={"XDG_CACHE_HOME": str(home)})
    with pytest.raises(gdbcache.CacheError, match=f"belongs to uid {ME}"):
        gdbcache.open_cache(OTHER, env={"XDG_CACHE_HOME": str(home)})


def test_a_cache_others_could_swap_is_refused(home: Path) -> None:
    home.chmod(0o777)
    with pytest.raises(gdbcache.CacheError, match="is writable by everyone"):
        gdbcache.open_cache(env={"XDG_CACHE_HOME": str(home)})


def test_a_symlink_is_not_the_cache_directory(home: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (home / "kdlab").mkdir(mode=0o700)
    (home / "kdlab" / "gdb-index").symlink_to(elsewhere)
    with pytest.raises(gdbcache.CacheError, match="is not a directory"):
        gdbcache.open_cache(env={"XDG_CACHE_HOME": str(home)})


def test_a_cache_that_cannot_be_made_says_why(home: Path) -> None:
    (home / "kdlab").write_text("a file where the directory goes")
    with pytest.raises(gdbcache.CacheError, match="cannot make"):
        gdbcache.open_cache(env={"XDG_CACHE_HOME": str(home)})


# --- remembered vmlinux files, and dropping the dead ----------------------------------


@pytest.fixture
def vmlinux_a(tmp_path: Path) -> Path:
    """An ELF file with build ID A, where a kernel tree keeps vmlinux."""
    path = tmp_path / "vmlinux"
    path.write_bytes(elf(BUILD_A))
    return path


@pytest.fixture
def cache(home: Path) -> gdbcache.IndexCache:
    return gdbcache.open_cache(env={"XDG_CACHE_HOME": str(home)})


def entries(cache: gdbcache.IndexCache, build: bytes) -> list[str]:
    """The files of *build* gdb would have written: its index and a half-written one."""
    made = [cache.index(build.hex()), cache.directory / f"{build.hex()}.gdb-index-x1"]
    for path in made:
        path.write_bytes(b"index")
    return sorted(path.name for path in made)


def files(cache: gdbcache.IndexCache) -> list[str]:
    ignored = {gdbcache.MAP, gdbcache.MAP_LOCK}
    return sorted(p.name for p in cache.directory.iterdir() if p.name not in ignored)


def test_entries_of_vmlinux_files_that_are_gone_are_dropped(
    cache: gdbcache.IndexCache, tmp_path: Path
) -> None:
    first, second = tmp_path / "a" / "vmlinux", tmp_path / "b" / "vmlinux"
    for path, build in ((first, BUILD_A), (second, BUILD_B)):
        path.parent.mkdir()
        path.write_bytes(elf(build))
        assert cache.remember(path, build.hex()) == []
    kept = entries(cache, BUILD_A)
    entries(cache, BUILD_B)
    second.unlink()
    assert cache.remember(first, BUILD_A.hex()) == [BUILD_B.hex()]
    assert files(cache) == kept
    mapped = json.loads((cache.directory / gdbcache.MAP).read_text())
    assert mapped == {BUILD_A.hex(): [str(first)]}


def test_a_rebuilt_vmlinux_drops_the_entry_of_its_old_build_id(
    cache: gdbcache.IndexCache, vmlinux_a: Path
) -> None:
    path = vmlinux_a
    cache.remember(path, BUILD_A.hex())
    entries(cache, BUILD_A)
    path.write_bytes(elf(BUILD_C))  # make, again
    assert cache.remember(path, BUILD_C.hex()) == [BUILD_A.hex()]
    assert files(cache) == []


def test_an_entry_lives_while_any_of_its_files_does(
    cache: gdbcache.IndexCache, tmp_path: Path
) -> None:
    """A hard link or a copy elsewhere (an O= directory, /usr/lib/debug) keeps it."""
    first, copy = tmp_path / "vmlinux", tmp_path / "copy"
    for path in (first, copy):
        path.write_bytes(elf(BUILD_A))
        cache.remember(path, BUILD_A.hex())
    kept = entries(cache, BUILD_A)
    first.unlink()
    assert cache.remember(copy, BUILD_A.hex()) == []
    assert files(cache) == kept


def test_files_of_build_ids_nobody_remembers_are_dropped(
    cache: gdbcache.IndexCache, vmlinux_a: Path
) -> None:
    path = vmlinux_a
    entries(cache, BUILD_B)
    (cache.directory / gdbcache.MAP).write_text("not json")
    cache.remember(path, BUILD_A.hex())
    assert files(cache) == []


# --- warming in the background --------------------------------------------------------


@pytest.fixture
def fake_gdb(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A stand-in gdb: logs a line, waits for a ``go`` file, then logs its
    nice value. Yields (program, log, go); lets any left running go at the end."""
    program, log, go = tmp_path / "gdb", tmp_path / "log", tmp_path / "go"
    program.write_text(
        "#!/bin/sh\n"
        f'echo "started $*" >> {log}\n'
        f"while [ ! -e {go} ]; do sleep 0.02; done\n"
        f'echo "nice $(nice)" >> {log}\n'
    )
    program.chmod(0o755)
    yield program, log, go
    go.touch()


def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time given"
        time.sleep(0.02)


def test_one_warmup_at_a_time_and_its_end_can_be_awaited(
    cache: gdbcache.IndexCache, vmlinux_a: Path, fake_gdb: tuple[Path, Path, Path]
) -> None:
    program, log, go = fake_gdb
    path = vmlinux_a
    build = BUILD_A.hex()
    assert cache.warm(path, build, gdb=str(program)) is True
    until(log.exists)
    assert cache.warming(build)
    assert cache.warm(path, build, gdb=str(program)) is False, "one is underway"
    assert cache.wait(build, 0.2) is False
    go.touch()
    assert cache.wait(build, 30) is True
    assert not cache.warming(build)
    started, niceness = log.read_text().splitlines()
    assert started == (
        f"started -nx -batch -iex set auto-load off -iex set index-cache directory "
        f"{cache.directory} -iex set index-cache enabled on {path}"
    )
    assert niceness == f"nice {gdbcache.WARM_NICE}"


def test_no_warmup_when_the_index_is_there(
    cache: gdbcache.IndexCache, vmlinux_a: Path, fake_gdb: tuple[Path, Path, Path]
) -> None:
    program, log, _ = fake_gdb
    path = vmlinux_a
    cache.index(BUILD_A.hex()).write_bytes(b"index")
    assert cache.warm(path, BUILD_A.hex(), gdb=str(program)) is False
    assert not log.exists()


def test_gdb_reads_an_index_that_is_there(
    home: Path, vmlinux_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    path = vmlinux_a
    cache = gdbcache.open_cache()
    cache.index(BUILD_A.hex()).write_bytes(b"index")
    said: list[str] = []
    assert gdbcache.gdb_options(path, said.append) == cache.gdb_options()
    assert said == []


def test_with_no_index_yet_gdb_loads_without_and_a_warmup_starts(
    home: Path,
    vmlinux_a: Path,
    fake_gdb: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gdb 13 writes a new index in the foreground, a second slower: the
    user's gdb loads without the cache, a niced warmup makes it for next time;
    a second gdb meanwhile starts no second warmup, and waits for nothing."""
    program, log, _ = fake_gdb
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setenv("PATH", f"{program.parent}:{os.environ['PATH']}")
    path = vmlinux_a
    said: list[str] = []
    assert gdbcache.gdb_options(path, said.append) == []
    assert said == []
    until(log.exists)
    assert log.read_text().startswith("started -nx -batch")
    assert gdbcache.open_cache().warming(BUILD_A.hex())
    assert gdbcache.gdb_options(path, said.append) == []
    assert len(log.read_text().splitlines()) == 1, "no second warmup"


def test_without_a_usable_cache_gdb_runs_without_one_and_says_why(
    home: Path, vmlinux_a: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    home.chmod(0o777)
    path = vmlinux_a
    said: list[str] = []
    assert gdbcache.gdb_options(path, said.append) == []
    assert said == [
        f"gdb's index cache is off ({home} is writable by everyone): set "
        "XDG_CACHE_HOME to a directory of yours"
    ]


def test_a_vmlinux_without_build_id_gets_no_cache_and_no_word(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gdb keys the cache by build ID: there is nothing to cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF" + bytes(100))
    said: list[str] = []
    assert gdbcache.gdb_options(path, said.append) == []
    assert said == []
    assert not (home / "kdlab").exists()
