"""kdlabd.host.sandbox: the confinement of image builds, with real processes.

A confined command here is the one a build runs (setpriv, unshare and
kdlabd.host.sandbox_init; root needed), probing what it can see and do.
What runs in the tree goes through the chroot shim as debootstrap calls it
(``chroot TARGET COMMAND`` with debootstrap's PATH), with busybox as the tree.
A real debootstrap in that sandbox is tests/vm/test_rootfs_build.py's.

The systemd path cannot run here (no systemd as PID 1): its command line is
checked, and its unit properties are verified by systemd-analyze in
tests/unit/test_systemd_files.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from kdlab.errors import BuildFailed
from kdlabd.core.hypervisor import Hypervisor
from kdlabd.core.images import ImageService
from kdlabd.core.jobs import JobManager
from kdlabd.host import sandbox
from kdlabd.host.builder import LocalBuilder
from kdlabd.host.journal import FileJournal
from kdlabd.host.local import LocalHost
from kdlabd.host.sandbox import (
    BUILD_CAPABILITIES,
    TOKEN_ENV,
    BuildSandbox,
    in_target_capabilities,
    kill_build,
    tagged,
)
from tests.support.prereq import require, require_tool

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
# debootstrap's in_target: PATH=/sbin:/usr/sbin:/bin:/usr/bin eval "chroot ..."
IN_TARGET_PATH = "/sbin:/usr/sbin:/bin:/usr/bin"


@pytest.fixture
def box() -> Iterator[BuildSandbox]:
    require(os.geteuid() == 0, "root (builds run in namespaces, setpriv, unshare)")
    require_tool("setpriv", "util-linux")
    require_tool("unshare", "util-linux")
    confined = BuildSandbox(systemd=False)
    yield confined
    confined.kill()


def mask(capabilities: list[int]) -> int:
    return sum(1 << cap for cap in capabilities)


def status_field(status: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(\S+)$", status, re.MULTILINE)
    assert match, f"no {name} in {status}"
    return match[1]


def host_namespace(kind: str) -> str:
    return os.readlink(f"/proc/self/ns/{kind}")


def confined_run(
    box: BuildSandbox,
    script: str,
    writable: list[Path],
    *,
    network: bool = False,
    shim: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = box.command(
        ["sh", "-c", script], ENV, writable=writable, network=network, chroot_shim=shim
    )
    return subprocess.run(
        argv, env=box.env(ENV), capture_output=True, text=True, timeout=60, check=False
    )


PROBE = """
echo "self=$$"
echo "hostname=$(hostname)"
for ns in pid ipc uts mnt net; do echo "$ns=$(readlink /proc/self/ns/$ns)"; done
grep ^Cap /proc/self/status
grep ^NoNewPrivs /proc/self/status
echo written > "$1/ok"
touch "$2/outside" 2>/dev/null && echo wrote-outside
for p in /proc/[0-9]*; do read -r c < $p/comm; echo "seen $p $c"; done
"""


def probe(box: BuildSandbox, tmp_path: Path, network: bool) -> dict[str, str]:
    writable, outside = tmp_path / "w", tmp_path / "o"
    writable.mkdir()
    outside.mkdir()
    script = PROBE.replace("$1", str(writable)).replace("$2", str(outside))
    done = confined_run(box, script, [writable], network=network)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (writable / "ok").read_text() == "written\n"
    assert list(outside.iterdir()) == []
    lines = done.stdout.splitlines()
    assert "wrote-outside" not in lines
    found = dict(line.split("=", 1) for line in lines if "=" in line)
    found.update(line.split(":\t") for line in lines if ":\t" in line)
    found["processes"] = " ".join(line for line in lines if line.startswith("seen "))
    return found


def test_a_build_step_runs_in_its_own_namespaces_with_few_capabilities(
    box: BuildSandbox, tmp_path: Path
) -> None:
    found = probe(box, tmp_path, network=False)
    assert found["self"] == "1", "the init of a new PID namespace"
    assert found["processes"] == "seen /proc/1 sh", "no host process in its /proc"
    assert found["hostname"] == "kdlab-build"
    for kind in ("pid", "ipc", "uts", "mnt", "net"):
        assert found[kind] != host_namespace(kind), kind
    allowed = mask(list(BUILD_CAPABILITIES.values()))
    assert int(found["CapBnd"], 16) == allowed
    assert int(found["CapEff"], 16) == allowed
    assert int(found["CapInh"], 16) == 0
    assert int(found["CapAmb"], 16) == 0
    assert found["NoNewPrivs"] == "1"


def test_only_debootstrap_keeps_the_network(box: BuildSandbox, tmp_path: Path) -> None:
    found = probe(box, tmp_path, network=True)
    assert found["net"] == host_namespace("net"), "the mirror"
    assert found["pid"] != host_namespace("pid")


def tree_with_busybox(root: Path) -> Path:
    busybox = require_tool("busybox", "busybox-static")
    (root / "bin").mkdir(parents=True)
    (root / "proc").mkdir()
    (root / "sys").mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "cat", "ls", "grep", "readlink", "touch", "mknod"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


IN_TARGET = r"""
set -e
cd "$1"
chroot "$1" mount -t proc proc /proc
chroot "$1" mount -t sysfs sysfs /sys
PATH={path} chroot "$1" /bin/sh -c '
    grep -E "^(Cap|NoNewPrivs)" /proc/self/status
    for p in /proc/[0-9]*; do read -r c < $p/comm; echo "seen $c"; done
    echo "proc-sys=$(ls /proc/sys 2>/dev/null | grep -c .)"
    echo "sys=$(ls /sys | grep -c .)"
    echo "net=$(readlink /proc/self/ns/net)"
    echo "devs=$(grep -c : /proc/self/net/dev)"
    mknod /dev-null c 1 3 2>/dev/null && echo made-a-device
    chroot / /bin/true 2>/dev/null && echo chrooted
    mount -t tmpfs none /proc 2>/dev/null && echo mounted
    echo in-tree > /written
'
echo "outside-net=$(readlink /proc/self/ns/net)"
"""


def test_what_runs_in_the_tree_is_confined_further(
    box: BuildSandbox, tmp_path: Path
) -> None:
    """dpkg and maintainer scripts: as debootstrap's ``chroot TARGET ...``."""
    root = tree_with_busybox(tmp_path / "root")
    shim = tmp_path / "chroot"
    shim.write_text(box.chroot_shim())
    shim.chmod(0o700)
    script = IN_TARGET.replace("{path}", IN_TARGET_PATH).replace("$1", str(root))
    done = confined_run(box, script, [root], network=True, shim=shim)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    found = dict(line.split("=", 1) for line in lines if "=" in line)
    found.update(line.split(":\t") for line in lines if ":\t" in line)
    assert int(found["CapBnd"], 16) == mask(in_target_capabilities())
    assert int(found["CapEff"], 16) == mask(in_target_capabilities())
    assert found["NoNewPrivs"] == "1"
    # Its /proc: the build's processes only (the PID namespace's init, sh, and
    # the chrooted shell), none of the host's (pytest...), nothing to tune; no
    # /sys at all.
    seen = {line.removeprefix("seen ") for line in lines if line.startswith("seen ")}
    assert seen == {"sh"}, seen
    assert found["proc-sys"] == "0"
    assert found["sys"] == "0"
    assert found["net"] != found["outside-net"], "no network, not even debootstrap's"
    assert found["devs"] == "1", "only lo, in a network namespace of its own"
    for escape in ("made-a-device", "chrooted", "mounted"):
        assert escape not in lines
    assert (root / "written").read_text() == "in-tree\n"


def test_a_missing_program_is_named(box: BuildSandbox, tmp_path: Path) -> None:
    argv = box.command(["kdlab-no-such-program"], ENV, writable=[tmp_path])
    done = subprocess.run(
        argv, env=box.env(ENV), capture_output=True, text=True, check=False
    )
    assert done.returncode == 127
    assert done.stdout == f"{sandbox.NOT_FOUND}kdlab-no-such-program\n"
    assert "Traceback" not in done.stdout + done.stderr


def start_confined(box: BuildSandbox, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A build step that leaves a background process and waits."""
    script = "sleep 300 & sleep 300 & echo started; wait"
    argv = box.command(["sh", "-c", script], ENV, writable=[tmp_path])
    proc = subprocess.Popen(argv, env=box.env(ENV), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    return proc


def test_kill_build_kills_every_process_of_that_build_only(
    box: BuildSandbox, tmp_path: Path
) -> None:
    other = BuildSandbox(systemd=False)
    mine = start_confined(box, tmp_path)
    theirs = start_confined(other, tmp_path)
    try:
        # setpriv-unshare, sh (the namespace's init) and two sleeps
        assert len(tagged(box.token)) == 4
        kill_build(box.token, systemd=False)
        assert tagged(box.token) == []
        assert mine.wait(timeout=10) != 0
        assert len(tagged(other.token)) == 4, "another build is left alone"
    finally:
        other.kill()
        theirs.wait(timeout=10)
    assert tagged(other.token) == []


def test_the_token_travels_in_the_environment(box: BuildSandbox) -> None:
    assert box.env(ENV) == {**ENV, TOKEN_ENV: box.token}
    assert re.fullmatch(r"[0-9a-f]{16}", box.token)
    assert BuildSandbox().token != BuildSandbox().token


def test_systemd_path_is_a_transient_unit_with_the_same_inside(tmp_path: Path) -> None:
    unit = BuildSandbox("0123456789abcdef", systemd=True)
    direct = BuildSandbox("0123456789abcdef", systemd=False)
    argv = unit.command(["debootstrap", "x"], ENV, writable=[tmp_path], network=True)
    same = direct.command(["debootstrap", "x"], ENV, writable=[tmp_path], network=True)
    split = argv.index("--")
    options, inside = argv[:split], argv[split + 1 :]
    assert inside == same[same.index("--") + 1 :], "unshare onwards is the same"
    assert options[:6] == [
        "systemd-run", "--quiet", "--wait", "--pipe", "--collect",
        "--service-type=exec",
    ]  # fmt: skip
    assert "--unit=kdlab-build-0123456789abcdef-1" in options
    assert f"--setenv={TOKEN_ENV}=0123456789abcdef" in options
    assert "--setenv=PATH=/usr/sbin:/usr/bin:/sbin:/bin" in options
    caps = f"--property=CapabilityBoundingSet={' '.join(BUILD_CAPABILITIES)}"
    assert caps in options
    assert f"--property=ReadWritePaths={tmp_path}" in options
    assert "setpriv" not in argv
    again = unit.command(["mke2fs"], ENV, writable=[tmp_path])
    assert "--unit=kdlab-build-0123456789abcdef-2" in again, "a unit per step"


def test_setpriv_applies_the_units_bounding_set() -> None:
    """The direct path stands in for the unit: the same capabilities."""
    argv = BuildSandbox(systemd=False).command(["true"], ENV, writable=[])
    (bounding,) = [a for a in argv if a.startswith("--bounding-set=")]
    granted = bounding.removeprefix("--bounding-set=-all,").split(",")
    unit = dict(sandbox.unit_properties([]))["CapabilityBoundingSet"].split()
    assert sorted(f"CAP_{c[1:].upper()}" for c in granted) == sorted(unit)
    assert {"--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs"} <= set(argv)


def test_start_up_kills_a_journalled_build_and_empties_scratch(
    box: BuildSandbox, tmp_path: Path
) -> None:
    """What a kdlabd killed mid-build leaves, found by the next one."""
    scratch_dir = tmp_path / "scratch"
    scratch = scratch_dir / f"build-img-{box.token}"
    (scratch / "root" / "etc").mkdir(parents=True)
    (scratch_dir / "stray-from-an-old-kdlabd").mkdir()
    journal = FileJournal(tmp_path / "pending")
    journal.begin("build", "img", {"scratch": str(scratch), "token": box.token})
    left = start_confined(box, scratch)
    images = ImageService(
        cast(Hypervisor, None),  # cleaning builds never reaches libvirt
        jobs=JobManager(),
        users=lambda _name: (),
        builder=LocalBuilder(scratch_dir, tmp_path / "cache"),
        files=LocalHost(),
        journal=journal,
    )
    assert asyncio.run(images.clean_builds()) == ["img"]
    assert tagged(box.token) == []
    assert left.wait(timeout=10) != 0
    assert list(scratch_dir.iterdir()) == []
    assert journal.pending("build") == []


def test_journal_keeps_details(tmp_path: Path) -> None:
    journal = FileJournal(tmp_path)
    journal.begin("build", "a-b", {"token": "t", "scratch": "/s"})
    journal.begin("image", "a-b")
    assert journal.details("build", "a-b") == {"token": "t", "scratch": "/s"}
    assert journal.details("image", "a-b") == {}
    assert journal.pending("build") == ["a-b"]
    (tmp_path / "build-torn").write_text('{"tok')
    assert journal.details("build", "torn") == {}


def test_sandbox_init_uses_the_standard_library_only() -> None:
    """It runs as ``python -I -S FILE``: kdlabd is not importable there."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(sandbox.INIT), "nothing"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr == "sandbox_init: unknown command nothing\n"


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$@" >> {calls}
[ "$1" = list-units ] && cat {units}
exit 0
"""


@pytest.mark.parametrize("left", ["", "kdlab-build-0123456789abcdef-2.service"])
def test_systemd_path_stops_the_units_and_checks_none_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left: str
) -> None:
    """The logic only (no systemd here): a stand-in systemctl on PATH."""
    calls, units = tmp_path / "calls", tmp_path / "units"
    units.write_text(left)
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL.format(calls=calls, units=units))
    systemctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    if left:
        with pytest.raises(BuildFailed, match="systemctl stop 'kdlab-build"):
            kill_build("0123456789abcdef", systemd=True)
    else:
        kill_build("0123456789abcdef", systemd=True)
    assert calls.read_text().splitlines() == [
        "stop kdlab-build-0123456789abcdef-*",
        "list-units --plain --no-legend kdlab-build-0123456789abcdef-*",
    ]
