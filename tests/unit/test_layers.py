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

from tests.conftest import REPO

PACKAGES = ("kdlabd", "kdlabctl")
CLIENT_SHARED = ("kdlabd.wire", "kdlabd.errors")


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
            # `from kdlabd import wire` imports kdlabd.wire.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no sources under {package}"
    return files


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def shared_with_client(module: str) -> bool:
    """Whether *module* (or a name imported from it) is something kdlabctl may use."""
    return module == "kdlabd" or any(
        module == shared or module.startswith(shared + ".") for shared in CLIENT_SHARED
    )


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


def test_kdlabctl_uses_only_wire_and_errors_from_kdlabd() -> None:
    found = sorted(
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources("kdlabctl")
        for module in imports_of(path)
        if top(module) == "kdlabd" and not shared_with_client(module)
    )
    assert found == []


@pytest.mark.parametrize("module", [*CLIENT_SHARED, "kdlabd"])
def test_client_shared_modules_are_stdlib_only(module: str) -> None:
    path = REPO / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = REPO / module.replace(".", "/") / "__init__.py"
    allowed = set(sys.stdlib_module_names) | {"kdlabd"}
    found = imports_of(path)
    outside = sorted(m for m in found if top(m) not in allowed)
    assert outside == []
    internal = sorted(
        m for m in found if top(m) == "kdlabd" and not shared_with_client(m)
    )
    assert internal == [], "the shared modules may import only each other"


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
