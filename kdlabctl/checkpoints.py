"""``kdlabctl checkpoint ...``: save a running VM's state and go back to it.

A checkpoint holds the VM's memory, CPUs, devices and disks. A restore of a
running or paused VM happens in the same QEMU process: gdb and consoles stay
attached (gdb caches registers: run ``flushregs`` after a restore). A stopped
VM starts into a checkpoint with ``kdlabctl start NAME --from TAG``.
"""

from __future__ import annotations

import argparse

from kdlab.errors import EXIT_OK
from kdlabctl.images import verbs_of
from kdlabctl.names import VM_NAME

TYPE_CHECKING = False  # mypy takes this as True
if TYPE_CHECKING:
    from kdlabctl.client import Client


async def cmd_save(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import jobs

    path = await client.save_checkpoint(args.name, args.tag)
    return await jobs.finish(client, path, quiet=args.quiet)


async def cmd_restore(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import jobs

    path = await client.restore_checkpoint(args.name, args.tag, paused=args.paused)
    return await jobs.finish(client, path, quiet=args.quiet)


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output
    from kdlabctl.images import human

    vm = await client.vm(args.name)
    if args.json:
        keys = ("tag", "created", "memory", "boot", "kernel_sha256")
        output.print_json([dict(zip(keys, c, strict=True)) for c in vm.checkpoints])
        return EXIT_OK
    table = output.table(
        ["TAG", "CREATED", "MEMORY", "BOOTED"],
        [
            [tag, output.timestamp(created), human(memory), output.timestamp(boot)]
            for tag, created, memory, boot, _kernel in vm.checkpoints
        ],
    )
    print(table)
    return EXIT_OK


async def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    await client.delete_checkpoint(args.name, args.tag)
    return EXIT_OK


def define(checkpoint: argparse.ArgumentParser) -> None:
    """The subcommands of ``kdlabctl checkpoint`` (*checkpoint*, the group's parser)."""
    checkpoint.description = __doc__
    add = verbs_of(checkpoint, "checkpoint_command")

    def verb(
        name: str, fn: object, help_text: str, *, plain: bool = False
    ) -> argparse.ArgumentParser:
        """A verb on the VM NAME."""
        sub = add(name, fn, help_text, plain=plain)
        sub.add_argument("name", metavar="NAME", type=VM_NAME)
        return sub

    save = verb("save", cmd_save, "save the running or paused VM's state as TAG")
    save.add_argument("tag", metavar="TAG")
    save.add_argument("-q", "--quiet", action="store_true")

    restore = verb(
        "restore",
        cmd_restore,
        "return the running or paused VM to TAG (gdb and consoles stay attached)",
    )
    restore.add_argument("tag", metavar="TAG")
    restore.add_argument(
        "--paused", action="store_true", help="leave the CPUs stopped afterwards"
    )
    restore.add_argument("-q", "--quiet", action="store_true")

    listing = verb("list", cmd_list, "list the VM's checkpoints", plain=True)
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    delete = verb("delete", cmd_delete, "delete the checkpoint TAG", plain=True)
    delete.add_argument("tag", metavar="TAG")
