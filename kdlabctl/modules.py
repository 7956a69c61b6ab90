"""``kdlabctl modules load``: modules just built, loaded into a running guest.

The modules come from a directory of the user's (a kernel tree, or an
out-of-tree module's ``M=`` directory), read here as the user. Each goes into
the guest through kdlab's agent (``exec``: the file on the command's stdin),
then one shell in the guest unloads the old ones a rebuild replaces and
loads the new ones, dependencies first; ``insmod``'s and ``rmmod``'s errors
come back as they print them, with their status.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from kdlabctl import execs
from kdlabctl.images import verbs_of
from kdlabctl.initramfs import InitramfsError, Module, module_bytes, resolve_built
from kdlabctl.names import VM_NAME

TYPE_CHECKING = False
if TYPE_CHECKING:
    from kdlabctl.client import Client

GUEST_DIR = "/tmp/kdlab-modules"
"""Where the guest keeps the modules it was given (a tmpfs in kdlab's
initramfs: gone with the boot)."""


def load_script(modules: list[Module], outside: list[str]) -> str:
    """The guest's shell script: what the running kernel must have, the old
    copies out (dependents first), the new ones in (dependencies first)."""
    lines = ["set -e"]
    lines += [
        f"modprobe -q {shlex.quote(name)} 2>/dev/null || true" for name in outside
    ]
    for module in reversed(modules):
        name = shlex.quote(module.name)
        lines.append(f"if [ -e /sys/module/{name} ]; then rmmod {name}; fi")
    lines += [f"insmod {GUEST_DIR}/{shlex.quote(module.name)}.ko" for module in modules]
    lines += [f"echo loaded {shlex.quote(module.name)}" for module in modules]
    return "\n".join(lines)


async def load(client: Client, name: str, directory: Path, wanted: list[str]) -> int:
    """Copy the modules of *directory* that *wanted* names (all when empty),
    with their dependencies, into VM *name* and load them; the guest's status."""
    modules, outside = resolve_built(directory, wanted)
    for module in modules:
        copy = execs.Command(
            (
                "sh",
                "-c",
                f"mkdir -p {GUEST_DIR} && cat > {GUEST_DIR}/{module.name}.ko",
            )
        )
        source = _in_memory(module.name, module_bytes(module))
        try:
            status = await execs.run(client, name, copy, source)
        finally:
            os.close(source)
        if status != 0:
            return status
    script = execs.Command(("sh", "-c", load_script(modules, outside)))
    return await execs.run(client, name, script, None)


def _in_memory(name: str, data: bytes) -> int:
    """A descriptor of a file in memory holding *data* (a module unpacked)."""
    fd = os.memfd_create(f"kdlab-module-{name}", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


async def cmd_load(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl.cli import UsageError

    try:
        return await load(
            client, args.name, Path(args.directory).absolute(), args.modules
        )
    except InitramfsError as err:
        raise UsageError(str(err)) from None


def define(group: argparse.ArgumentParser) -> None:
    """The subcommands of ``kdlabctl modules`` (*group*, the group's parser)."""
    group.description = __doc__
    verb = verbs_of(group, "modules_command")
    load_verb = verb(
        "load",
        cmd_load,
        "copy modules built in DIR (a kernel tree, or an out-of-tree module's "
        "directory) into the running VM NAME and load them with their "
        "dependencies, in place of loaded ones",
    )
    load_verb.add_argument("name", metavar="NAME", type=VM_NAME)
    load_verb.add_argument("directory", metavar="DIR")
    load_verb.add_argument(
        "modules", nargs="*", metavar="MODULE", help="default: every module in DIR"
    )
