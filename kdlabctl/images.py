"""``kdlabctl image ...``: the disk images VM disks are overlays of."""

from __future__ import annotations

import argparse
import os
import re

from kdlab.errors import EXIT_OK
from kdlabctl.names import IMAGE_NAME

# kdlabctl imports this module at every start (--size parses here): typing,
# pathlib and the job states load only when a command uses them.
TYPE_CHECKING = False  # mypy takes this as True
if TYPE_CHECKING:
    from collections.abc import Callable

    from kdlabctl.client import Client

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def size(text: str) -> int:
    """``10G``, ``512M``, ``1T`` or plain bytes (binary units, as qemu-img)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 10G, 512M)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def human(n: int) -> str:
    """``1536`` -> ``1.5K``: sizes as ls -lh shows them."""
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{n}B" if unit == "B" else f"{value:.1f}{unit}".replace(".0", "")
        value /= 1024
    raise AssertionError("unreachable")


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output

    output.listing(
        await client.list_images(),
        json_output=args.json,
        headers=["NAME", "FORMAT", "SIZE", "ALLOCATED", "OWNER", "USED BY"],
        row=lambda i: [
            i.name,
            i.format,
            human(i.capacity),
            human(i.allocation),
            output.user_name(i.owner),
            ",".join(i.used_by) or "-",
        ],
    )
    return EXIT_OK


async def cmd_create(client: Client, args: argparse.Namespace) -> int:
    await client.create_image(args.name, args.size)
    return EXIT_OK


async def cmd_import(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import jobs
    from kdlabctl.cli import open_for_daemon

    fd = open_for_daemon(args.file, "image")
    try:
        path = await client.import_image(args.name, fd)
    finally:
        os.close(fd)
    return await jobs.finish(client, path, quiet=args.quiet)


async def cmd_build(client: Client, args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdlabctl import jobs
    from kdlabctl.options import ImageBuild

    key = Path(args.ssh_key).read_text().strip() if args.ssh_key else None
    build = ImageBuild(
        suite=args.debootstrap,
        size=args.size or None,
        packages=tuple(args.packages.split(",")) if args.packages else (),
        ssh_key=key or None,
    )
    path = await client.build_image(args.name, build)
    return await jobs.finish(client, path, quiet=args.quiet)


async def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    await client.delete_image(args.name)
    return EXIT_OK


async def cmd_resize(client: Client, args: argparse.Namespace) -> int:
    await client.resize_image(args.name, args.size)
    return EXIT_OK


def verbs_of(
    group: argparse.ArgumentParser, dest: str
) -> Callable[..., argparse.ArgumentParser]:
    """``verb(NAME, FN, HELP, plain=False)``: adds a subcommand to the command
    group *group* (``image``, ``dump``); *plain* ones only call kdlabd
    (``Client.plain``)."""
    verbs = group.add_subparsers(dest=dest, metavar="COMMAND", required=True)

    def verb(
        name: str, fn: object, help_text: str, *, plain: bool = False
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = verbs.add_parser(
            name, help=help_text, description=help_text
        )
        sub.set_defaults(func=fn, plain=plain)
        return sub

    return verb


def define(image: argparse.ArgumentParser) -> None:
    """The subcommands of ``kdlabctl image`` (*image*, the group's parser)."""
    image.description = __doc__
    verb = verbs_of(image, "image_command")

    listing = verb("list", cmd_list, "list images and the VMs using them", plain=True)
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    create = verb("create", cmd_create, "create a blank image")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--size", type=size, required=True, metavar="SIZE")

    imported = verb(
        "import", cmd_import, "import a raw or qcow2 file (no backing file)"
    )
    imported.add_argument("name", metavar="NAME")
    imported.add_argument("file", metavar="FILE")
    imported.add_argument("-q", "--quiet", action="store_true")

    build = verb("build", cmd_build, "build a Debian root filesystem image")
    build.add_argument("name", metavar="NAME")
    build.add_argument(
        "--debootstrap",
        required=True,
        metavar="SUITE",
        help="Debian suite, e.g. bookworm",
    )
    build.add_argument("--size", type=size, metavar="SIZE", help="default 2G")
    build.add_argument("--packages", metavar="A,B", help="extra packages")
    build.add_argument("--ssh-key", metavar="FILE", help="public key for root")
    build.add_argument("-q", "--quiet", action="store_true")

    delete = verb("delete", cmd_delete, "delete an image no VM uses")
    delete.add_argument("name", metavar="NAME", type=IMAGE_NAME)

    resize = verb("resize", cmd_resize, "grow an image no VM uses")
    resize.add_argument("name", metavar="NAME", type=IMAGE_NAME)
    resize.add_argument("--size", type=size, required=True, metavar="SIZE")
