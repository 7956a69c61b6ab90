"""The vm tier's cached fixtures are keyed on the code that makes them.

A kernel built, or an initramfs packed, by an older kdlabctl must not be taken
from the cache after that code changed: the regression would hide behind it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from kdlabctl import initramfs, kernel
from tests.support import debian, kernel_tree
from tests.support.prereq import require

# Where the code that configures and builds a kernel lives: kdlabctl, and the
# kernel rules it shares with kdlabd.
KEYED_PACKAGES = ("kdlabctl", "kdlab.kernel")


def keyed_modules_of(module: str) -> set[Path]:
    """The files of *module* and of the modules of :data:`KEYED_PACKAGES` it
    imports at module level, recursively (imports for type checking, or inside a
    function to format messages, are left out)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = Path(importlib.import_module(name).__file__ or "")
        for node in ast.parse(source.read_text()).body:
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if node.module in KEYED_PACKAGES:
                todo += [f"{node.module}.{alias.name}" for alias in node.names]
            elif node.module.startswith(tuple(f"{p}." for p in KEYED_PACKAGES)):
                todo.append(node.module)
    return {Path(importlib.import_module(name).__file__ or "") for name in seen}


def test_the_kernel_key_covers_the_code_kdlabctl_kernel_runs() -> None:
    assert set(kernel_tree.KEYED_SOURCES) == keyed_modules_of("kdlabctl.kernel")
    assert Path(kernel.__file__) in kernel_tree.KEYED_SOURCES


def test_a_change_of_kdlabctls_code_changes_the_kernel_key(tmp_path: Path) -> None:
    sources = [tmp_path / "kernel.py", tmp_path / "kconfig.py"]
    for source in sources:
        source.write_text("# kdlabctl as it was\n")
    tree = tmp_path / "linux"
    before = kernel_tree.build_key(kernel.MINIMAL_FRAGMENT, tree, "gcc 12", sources)
    assert before == kernel_tree.build_key(
        kernel.MINIMAL_FRAGMENT, tree, "gcc 12", sources
    )
    sources[1].write_text("# kdlabctl with a regression\n")
    after = kernel_tree.build_key(kernel.MINIMAL_FRAGMENT, tree, "gcc 12", sources)
    assert after != before


def test_a_change_of_the_cpio_writer_makes_a_new_initramfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(debian.BUSYBOX.is_file(), "/bin/busybox (apt-get install busybox-static)")
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "cache"))
    before = debian.busybox_initramfs()
    changed = tmp_path / "initramfs.py"
    changed.write_text(Path(initramfs.__file__).read_text() + "# changed\n")
    monkeypatch.setattr(initramfs, "__file__", str(changed))
    after = debian.busybox_initramfs()
    assert after != before
    assert after.read_bytes() == before.read_bytes(), "same writer output, new key"
