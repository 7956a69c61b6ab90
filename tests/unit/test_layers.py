"""The import rules of docs' architecture, checked on the source with ``ast``.

Every ``import`` counts, wherever it is (module level, inside a function, under
``TYPE_CHECKING``): a lazy import of a forbidden module is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGES = ("kdlab", "kdlabd", "kdlabctl")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module *path* imports, absolute, including ``from X import Y`` as X.Y."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "__future__":
                continue
            found.add(module)
            # `from kdlab import wire` imports kdlab.wire.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no sources under {package}"
    return files


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def violations(paths: list[Path], forbidden: set[str]) -> list[str]:
    return sorted(
        f"{path.relative_to(REPO)} imports {module}"
        for path in paths
        for module in imports_of(path)
        if top(module) in forbidden
    )


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("kdlabd/core", {"libvirt", "libvirtaio", "dbus_next", "lxml"}),
        ("kdlabd/virt", {"dbus_next"}),
        ("kdlabd/bus", {"libvirt", "libvirtaio"}),
        ("kdlabctl", {"libvirt", "libvirtaio", "lxml"}),
    ],
)
def test_layer_imports(layer: str, forbidden: set[str]) -> None:
    assert violations(sources(layer), forbidden) == []


def test_core_does_not_import_outer_layers() -> None:
    """core is below virt and bus: it may not reach up into them."""
    found = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources("kdlabd/core")
        for module in imports_of(path)
        if module.startswith(("kdlabd.virt", "kdlabd.bus", "kdlabd.daemon"))
    ]
    assert found == []


def test_daemon_and_client_do_not_import_each_other() -> None:
    """What both need lives in the shared package ``kdlab``."""
    found = sorted(
        f"{path.relative_to(REPO)} imports {module}"
        for package, other in (("kdlabctl", "kdlabd"), ("kdlabd", "kdlabctl"))
        for path in sources(package)
        for module in imports_of(path)
        if top(module) == other
    )
    assert found == []


def test_shared_package_is_stdlib_only() -> None:
    """kdlab is imported by both sides, so it may import only itself and stdlib."""
    allowed = set(sys.stdlib_module_names) | {"kdlab"}
    found = sorted(
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources("kdlab")
        for module in imports_of(path)
        if top(module) not in allowed
    )
    assert found == []


# The checker itself must be able to fail.


def test_checker_sees_every_import_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_repo = tmp_path
    package = fake_repo / "kdlabd" / "core"
    package.mkdir(parents=True)
    (fake_repo / "kdlabd" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from . import sneaky\n")
    (package / "sneaky.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "import os, libvirt\n"
        "from lxml import etree\n"
        "if TYPE_CHECKING:\n"
        "    import dbus_next.aio\n"
        "def later():\n"
        "    import libvirtaio\n"
        "from ..virt import domain_xml\n"
        "from .. import bus\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake_repo)
    paths = sources("kdlabd/core")
    assert violations(paths, {"libvirt", "libvirtaio", "dbus_next", "lxml"}) == [
        "kdlabd/core/sneaky.py imports dbus_next.aio",
        "kdlabd/core/sneaky.py imports libvirt",
        "kdlabd/core/sneaky.py imports libvirtaio",
        "kdlabd/core/sneaky.py imports lxml",
        "kdlabd/core/sneaky.py imports lxml.etree",
    ]
    sneaky = imports_of(package / "sneaky.py")
    assert {"kdlabd.virt.domain_xml", "kdlabd.bus"} <= sneaky
    assert "__future__" not in sneaky
    assert "kdlabd.core.sneaky" in imports_of(package / "__init__.py")


def test_kdlabctl_help_loads_no_heavy_module() -> None:
    probe = (
        "import kdlabctl.cli, sys; kdlabctl.cli.build_parser(); "
        "print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('libvirt', 'libvirtaio', 'lxml', 'dbus_next')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
