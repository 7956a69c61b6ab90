"""``kdlabctl kernel`` on a real tree: Debian's 6.1 source, configured and built.

The minimal kernel is built into the fixture cache (several minutes on two
CPUs), again whenever kdlabctl's code that configures or builds it changes; a
figure says whether this run built it or took it from the cache. Every run
configures ``--minimal`` afresh and compares the result with the cached
build's config. The recipe's configurations take seconds each. gdb proves
that the lx-* helpers load from what the build left.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.kernel.bzimage import HEADER_BYTES, bzimage_release
from kdlabctl import kernel
from tests.support import debian, figures, kernel_tree
from tests.support.prereq import require, require_tool

pytestmark = pytest.mark.vm


def kdlabctl_kernel(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdlabctl.kernel", "kernel", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def require_compiler() -> None:
    require_tool("make", "make")
    require_tool("gcc", "gcc")


@pytest.fixture(scope="module")
def tree() -> Path:
    require_compiler()
    try:
        return kernel_tree.linux_source_tree()
    except debian.FixtureError as err:
        require(False, f"Debian's kernel tree: {err}")
        raise


@pytest.fixture(scope="module")
def minimal() -> Path:
    """The minimal kernel's O= directory.

    A figure, for information, says whether this run built it: one from the
    cache was built by today's kdlabctl code (its files are in the cache key),
    but the table must not pass it off as built now.
    """
    require_compiler()
    try:
        built = kernel_tree.minimal_kernel()
    except debian.FixtureError as err:
        require(False, f"kdlab's minimal kernel: {err}")
        raise
    figures.record(
        "minimal kernel configured and built by kdlabctl in this run (0: from cache)",
        int(built.seconds is not None),
        "",
        detail=built.provenance(),
    )
    return built.build


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A fresh O= directory, not made yet: configure makes it."""
    return tmp_path / "build"


def test_minimal_kernel_passes_the_check(minimal: Path) -> None:
    done = kdlabctl_kernel("check", str(minimal), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["counts"] == {"error": 0, "warning": 0, "note": 0}


def test_minimal_kernel_artifacts(minimal: Path) -> None:
    artifacts = kernel.tree_artifacts(minimal)
    assert artifacts.bzimage == minimal / "arch/x86/boot/bzImage"
    assert artifacts.vmlinux == minimal / "vmlinux"
    assert artifacts.gdb_script == minimal / "vmlinux-gdb.py"
    assert artifacts.release.startswith("6.1.")
    # What kdlabd reads from the upload matches what the tree says it built.
    with artifacts.bzimage.open("rb") as image:
        assert bzimage_release(image.read(HEADER_BYTES)) == artifacts.release


def test_gdb_loads_the_lx_helpers(minimal: Path) -> None:
    gdb = require_tool("gdb", "gdb")
    done = subprocess.run(
        [
            gdb,
            "-batch",
            "-iex",
            f"add-auto-load-safe-path {minimal}",
            "-ex",
            "help lx-version",
            "-ex",
            "info line start_kernel",
            str(minimal / "vmlinux"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Report the Linux Version of the current kernel" in done.stdout
    # Full DWARF: a source line for start_kernel, in the tree that was built.
    tree = (minimal / "source").resolve()
    assert f'of "{tree}/init/main.c"' in done.stdout, done.stdout


def test_building_again_is_quick_and_prints_the_paths(minimal: Path) -> None:
    done = kdlabctl_kernel("build", str(minimal), "-j", "2")
    assert done.returncode == 0, done.stderr
    paths = dict(line.split(":", 1) for line in done.stdout.splitlines())
    assert paths["bzImage"].strip() == str(minimal / "arch/x86/boot/bzImage")
    assert paths["vmlinux-gdb.py"].strip() == str(minimal / "vmlinux-gdb.py")
    assert "built in" in done.stderr


def test_minimal_recipe_configures_afresh_what_the_cached_kernel_was_built_from(
    tree: Path, minimal: Path, out: Path
) -> None:
    """``configure --minimal`` runs in every run, cached kernel or not."""
    done = kdlabctl_kernel("configure", "--minimal", str(tree), "-O", str(out))
    assert done.returncode == 0, done.stderr
    assert kdlabctl_kernel("check", str(out)).returncode == 0
    assert (out / ".config").read_text() == (minimal / ".config").read_text()


def test_default_recipe_yields_a_passing_config(tree: Path, out: Path) -> None:
    done = kdlabctl_kernel("configure", str(tree), "-O", str(out))
    assert done.returncode == 0, done.stderr
    steps = [line.split() for line in done.stderr.splitlines()]
    assert [step[-1] for step in steps if step[0] == "make"] == [
        "x86_64_defconfig",
        "kvm_guest.config",
        "olddefconfig",
    ]
    assert any(step[0].endswith("/scripts/config") for step in steps)
    assert kdlabctl_kernel("check", str(out)).returncode == 0
    assert (out / "source").resolve() == tree


def test_keep_config_makes_debians_config_debuggable(tree: Path, out: Path) -> None:
    try:
        cloud = debian.cloud_kernel()
    except debian.FixtureError as err:
        require(False, f"Debian's cloud kernel: {err}")
        raise
    assert kdlabctl_kernel("check", str(cloud.config)).returncode == 1
    out.mkdir(parents=True)
    shutil.copy(cloud.config, out / ".config")
    done = kdlabctl_kernel("configure", "--keep-config", str(tree), "-O", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / ".config.before-kdlab").read_text() == cloud.config.read_text()
    check = json.loads(kdlabctl_kernel("check", str(out), "--json").stdout)
    assert check["ok"] is True
    assert {f["option"] for f in check["findings"]} == {"CONFIG_RANDOMIZE_BASE"}


def test_failed_build_shows_the_compilers_last_lines(
    minimal: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "make"
    lines = "\n".join(f"line {n}" for n in range(100))
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'init/main.c:1:1: error: the first error'\n"
        f"printf '%s\\n' '{lines}'\n"
        "echo 'make: *** [Makefile:1: vmlinux] Error 2'\nexit 2\n"
    )
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = kdlabctl_kernel("build", str(minimal), env=env)
    assert done.returncode == 1
    err = done.stderr.splitlines()
    assert "init/main.c:1:1: error: the first error" in err
    assert err[err.index("last 40 lines of make:") + 1] == "line 61"
    assert "make: *** [Makefile:1: vmlinux] Error 2" in err
    assert err[-1] == "kdlabctl: make exited with status 2"
