"""The import rules of docs' architecture, checked on the source with ``ast``.

Every ``import`` counts, wherever it is (module level, inside a function, under
``TYPE_CHECKING``): a lazy import of a forbidden module is still a dependency.

kdlabd/core opens no socket, starts no process and reads no file: besides the
modules it may not import, the calls that would do so on the host (``open``,
``os.pread``, ``Path.read_text``, ``asyncio.create_subprocess_exec``...) are
looked for too. That is by name: a core method may not be called ``exists`` or
``mkdir`` either, which keeps a reader from wondering. ``Path.replace`` cannot
be told from ``str.replace`` or a dataclass's ``replace`` that way.
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


# Modules whose use is host I/O: sockets, processes, descriptors, files.
HOST_IO_MODULES = {
    "ctypes",
    "fcntl",
    "glob",
    "grp",
    "mmap",
    "multiprocessing",
    "pty",
    "pwd",
    "resource",
    "select",
    "selectors",
    "shutil",
    "socket",
    "socketserver",
    "subprocess",
    "tempfile",
}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("kdlabd/core", {"libvirt", "libvirtaio", "dbus_next", "lxml"}),
        ("kdlabd/core", HOST_IO_MODULES),
        ("kdlabd/host", {"libvirt", "libvirtaio", "dbus_next", "lxml"}),
        ("kdlabd/virt", {"dbus_next"}),
        ("kdlabd/bus", {"libvirt", "libvirtaio"}),
        ("kdlabctl", {"libvirt", "libvirtaio", "lxml"}),
    ],
)
def test_layer_imports(layer: str, forbidden: set[str]) -> None:
    assert violations(sources(layer), forbidden) == []


@pytest.mark.parametrize(
    ("layer", "outer"),
    [
        ("kdlabd/core", ("kdlabd.virt", "kdlabd.bus", "kdlabd.host", "kdlabd.daemon")),
        ("kdlabd/host", ("kdlabd.virt", "kdlabd.bus", "kdlabd.daemon")),
    ],
)
def test_inner_layers_do_not_import_outer_ones(
    layer: str, outer: tuple[str, ...]
) -> None:
    """core is below every adapter; the host adapter is below virt (which uses
    its host facts), bus and the daemon that wires them."""
    found = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in sources(layer)
        for module in imports_of(path)
        if module.startswith(outer)
    ]
    assert found == []


# What core may use of os: the environment and signals of the test hooks
# (kdlabd.core.journal), error texts, and handing on descriptors it was given.
OS_ALLOWED = {"environ", "getpid", "kill", "strerror", "dup", "close"}
# Methods of pathlib.Path (and of open files) that touch the file system.
PATH_IO = {
    "chmod",
    "exists",
    "glob",
    "hardlink_to",
    "is_dir",
    "is_file",
    "is_symlink",
    "iterdir",
    "lchmod",
    "lstat",
    "mkdir",
    "open",
    "read_bytes",
    "read_text",
    "readlink",
    "rename",
    "resolve",
    "rglob",
    "rmdir",
    "samefile",
    "stat",
    "symlink_to",
    "touch",
    "unlink",
    "write_bytes",
    "write_text",
}
# asyncio's ways to start a process or open a socket or pipe.
ASYNCIO_IO = {
    "add_reader",
    "add_writer",
    "connect_read_pipe",
    "connect_write_pipe",
    "create_connection",
    "create_datagram_endpoint",
    "create_server",
    "create_subprocess_exec",
    "create_subprocess_shell",
    "create_unix_connection",
    "create_unix_server",
    "open_connection",
    "open_unix_connection",
    "sock_accept",
    "sock_connect",
    "sock_recv",
    "sock_sendall",
    "start_server",
    "start_unix_server",
    "subprocess_exec",
    "subprocess_shell",
}


def host_io_of(path: Path) -> list[str]:
    """The calls in *path* that would do I/O on the host, by what they are named."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "os":
                if node.attr not in OS_ALLOWED:
                    found.append((node.lineno, f"uses os.{node.attr}"))
            elif node.attr in PATH_IO | ASYNCIO_IO:
                found.append((node.lineno, f"calls .{node.attr}()"))
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [
                (node.lineno, f"imports os.{alias.name}")
                for alias in node.names
                if alias.name not in OS_ALLOWED
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"open", "exec", "eval", "__import__"}
        ):
            found.append((node.lineno, f"calls {node.func.id}()"))
    where = path.relative_to(REPO)
    return [f"{where}:{line} {what}" for line, what in sorted(found)]


def test_core_opens_no_socket_starts_no_process_reads_no_file() -> None:
    """What core needs of its host goes through its ports (kdlabd.core.host,
    kdlabd.core.builder, kdlabd.core.journal, kdlabd.core.hypervisor)."""
    found = [line for path in sources("kdlabd/core") for line in host_io_of(path)]
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


def test_checker_sees_host_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "kdlabd" / "core" / "io.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "import asyncio, os, socket, subprocess\n"
        "from os import pread, environ\n"
        "from pathlib import Path\n"
        "def f(fd, log: Path):\n"
        "    os.pread(fd, 10, 0)\n"
        "    os.path.exists('/etc/shadow')\n"
        "    os.environ.get('X'), os.close(fd)\n"
        "    open('/etc/shadow')\n"
        "    log.read_text(), log.with_name('x')\n"
        "    asyncio.create_subprocess_exec('true')\n"
        "    subprocess.run(['true'])\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert host_io_of(module) == [
        "kdlabd/core/io.py:2 imports os.pread",
        "kdlabd/core/io.py:5 uses os.pread",
        "kdlabd/core/io.py:6 calls .exists()",
        "kdlabd/core/io.py:6 uses os.path",
        "kdlabd/core/io.py:8 calls open()",
        "kdlabd/core/io.py:9 calls .read_text()",
        "kdlabd/core/io.py:10 calls .create_subprocess_exec()",
    ]
    assert violations([module], HOST_IO_MODULES) == [
        "kdlabd/core/io.py imports socket",
        "kdlabd/core/io.py imports subprocess",
    ]


def modules_after(code: str) -> set[str]:
    """The modules a fresh Python (in the repository) has loaded after *code*."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/", "KDLAB_BUS": "unix:path=/none"},
    )
    assert done.returncode == 0, done.stderr
    loaded = ast.literal_eval(done.stdout.splitlines()[-1])
    assert isinstance(loaded, list), done.stdout
    return {str(name) for name in loaded}


def test_kdlabctl_help_loads_no_heavy_module() -> None:
    """Every command defined (as the man page sees them): no bus, no libvirt."""
    loaded = modules_after("import kdlabctl.cli\nkdlabctl.cli.build_parser()")
    forbidden = {"libvirt", "libvirtaio", "lxml", "dbus_next"}
    assert sorted(name for name in loaded if top(name) in forbidden) == []


# What kdlabctl may not import before a command needs it: its start-up is
# measured against Python's own (bench: cli:kdlabctl_startup).
HEAVY_AT_START = {
    "asyncio", "dbus_next", "libvirt", "lxml",  # the bus, and what is kdlabd's
    "dataclasses", "inspect", "typing", "json", "shutil",  # milliseconds each
    "kdlabctl.client", "kdlabctl.kernel", "kdlabctl.debug",  # a command's own
    "kdlab.kernel", "kdlab.states",
}  # fmt: skip


def modules_loaded_by(*argv: str) -> set[str]:
    """The modules ``python -m kdlabctl ARGV`` has loaded when it exits."""
    return modules_after(
        "import contextlib, os, runpy, sys\n"
        f"sys.argv = ['kdlabctl', *{list(argv)!r}]\n"
        "with contextlib.suppress(SystemExit), "
        "contextlib.redirect_stdout(open(os.devnull, 'w')):\n"
        "    runpy.run_module('kdlabctl', run_name='__main__', alter_sys=True)"
    )


def heavy(modules: set[str]) -> list[str]:
    return sorted(
        name
        for name in modules
        if name in HEAVY_AT_START or top(name) in HEAVY_AT_START
    )


def test_kdlabctl_help_imports_nothing_a_command_would() -> None:
    """``kdlabctl --help`` parses and prints: no dbus-next, asyncio, dataclasses
    or typing, no module of a command group (a group loads when named)."""
    assert heavy(modules_loaded_by("--help")) == []


def test_a_group_is_loaded_when_named() -> None:
    loaded = modules_loaded_by("kernel", "--help")
    assert "kdlabctl.kernel" in loaded
    assert "dbus_next" not in loaded


def test_a_command_without_the_bus_loads_no_client() -> None:
    """``kdlabctl kernel check`` reads files: no dbus-next, no client."""
    loaded = modules_loaded_by("kernel", "check", "/nonexistent")
    assert "kdlabctl.kernel" in loaded
    assert not {"dbus_next", "kdlabctl.client"} & loaded
