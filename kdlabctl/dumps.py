"""``kdlabctl dump ...``, ``drgn`` and ``crash``: post-mortem dumps of VMs.

kdlabd writes a dump when a VM's kernel panics (and on ``dump take``) and
hands its owner a read-only descriptor of it (``Dump.Open``); kdlabctl never
names a path of kdlabd's. ``dump get`` copies the descriptor into a file of
the caller's, written as the caller. ``drgn`` gives the descriptor itself to
drgn (``Program.set_core_dump`` takes one): the dump is root's and 0600, so
``/proc/self/fd/N`` cannot be opened again by the caller. crash opens paths
only, so it reads a private copy.

The vmlinux is the one ``kdlabctl gdb`` would load for the dump's VM
(:func:`kdlabctl.debug.find_vmlinux`), and must have the build ID the dump's
VMCOREINFO gives: symbols of another build would read the dump wrongly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kdlab.errors import EXIT_OK, InvalidArgument, NoSuchDump, NoSuchVM
from kdlab.kernel import vmcore
from kdlab.wire import NO_DUMP_PATH
from kdlabctl.names import VM_NAME

if TYPE_CHECKING:
    from kdlabctl.client import Client, Dump

POSTMORTEM_EXTRA = "kdlab[postmortem]"
# QEMU 7.2 writes a kdump-compressed dump in makedumpfile's flattened form
# (kdlab.kernel.vmcore reads it); drgn's libkdumpfile reads only the
# reassembled file.
CRASH_PACKAGE = "crash"
_CHUNK = 1 << 20


def _usage(message: str) -> Exception:
    from kdlabctl.cli import UsageError

    return UsageError(message)


# Finding a dump and its vmlinux


async def resolve(client: Client, target: str) -> Dump:
    """The dump *target* names: a dump's id, or a VM's name (its latest dump)."""
    from kdlabctl.client import RemoteError

    try:
        return await client.dump_at(await client.dump_path(target))
    except RemoteError as err:
        if err.name != NoSuchDump.dbus_name():
            raise
    try:
        latest = (await client.vm(target)).latest_dump
    except RemoteError as err:
        if err.name != NoSuchVM.dbus_name():
            raise
        raise NoSuchDump(
            f"no dump or VM is named {target}: kdlabctl dump list shows the dumps"
        ) from None
    if latest == NO_DUMP_PATH:
        raise NoSuchDump(
            f"VM {target} has no dump: kdlabctl dump take {target} writes one"
        )
    return await client.dump_at(latest)


@dataclass(frozen=True)
class DumpedKernel:
    """What a dump recorded of its VM's kernel, as :func:`find_vmlinux` reads a
    VM (:class:`kdlabctl.debug.Recorded`): the hint is the VM's vmlinux or,
    without one, its kernel's path."""

    owner: int
    vmlinux: str
    kernel_path: str
    kernel_release: str


async def vmlinux_for(client: Client, dump: Dump, explicit: str | None) -> Path:
    """The vmlinux of the kernel that ran, found as ``kdlabctl gdb`` finds it.

    While the dump's VM exists (the same domain: its UUID), its record is
    read, as gdb reads it; otherwise what the dump kept of it. A dump with a
    build ID takes only a vmlinux with that build ID.
    """
    from kdlabctl import caller, debug
    from kdlabctl.client import RemoteError

    recorded: debug.Recorded = DumpedKernel(
        dump.owner, dump.vmlinux_hint, dump.vmlinux_hint, dump.kernel_release
    )
    try:
        vm = await client.vm(dump.vm)
        if vm.uuid == dump.vmuuid:
            recorded = vm
    except RemoteError as err:
        if err.name != NoSuchVM.dbus_name():
            raise
    try:
        return debug.find_vmlinux(recorded, explicit, caller.uid(), dump.build_id)
    except debug.VmlinuxMismatch as err:
        raise InvalidArgument(str(err)) from None
    except FileNotFoundError as err:
        raise _usage(str(err)) from None


def unchecked(dump: Dump) -> None:
    """Say so when the vmlinux cannot be checked against the dump."""
    from kdlabctl.cli import say

    if not dump.build_id:
        why = dump.problem or "its VMCOREINFO names no build ID (Linux < 5.9)"
        say(f"dump {dump.id} cannot be checked against vmlinux: {why}")


# Copying a dump as the caller


def copy(source: int, target: int) -> None:
    """Copy *source* (a dump's descriptor, from its start) to *target*."""
    offset = 0
    while True:
        try:
            sent = os.sendfile(target, source, offset, _CHUNK)
        except OSError:  # not a file sendfile takes: copy it by hand
            os.lseek(source, offset, os.SEEK_SET)
            while chunk := os.read(source, _CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(target, view) :]
            return
        if not sent:
            return
        offset += sent


def save(source: int, path: str, *, force: bool) -> None:
    """Write the dump on *source* to *path* as the caller: a new file, 0600,
    unless *force* (then an existing one is overwritten, keeping its mode). A
    copy that fails is removed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL
    try:
        target = os.open(path, flags, 0o600)
    except FileExistsError:
        raise _usage(f"{path} exists: give --force to overwrite it") from None
    except OSError as err:
        raise _usage(f"cannot write {path}: {err.strerror}") from None
    try:
        copy(source, target)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(target)


def flattened(source: int) -> bool:
    """Whether the dump on *source* is in makedumpfile's flattened form."""
    signature = vmcore.FLAT_SIGNATURE
    return os.pread(source, len(signature), 0) == signature


def unflatten(source: int, target: int) -> None:
    """Reassemble the flattened dump on *source* into *target*, as
    ``makedumpfile -R`` does."""

    def read(offset: int, size: int) -> bytes:
        return os.pread(source, size, offset)

    for offset, size, at in vmcore.flat_records(read):
        done = 0
        while done < size:
            chunk = os.pread(source, min(size - done, _CHUNK), at + done)
            if not chunk:
                raise ValueError("the flattened dump is truncated")
            os.pwrite(target, chunk, offset + done)
            done += len(chunk)


@contextlib.contextmanager
def private_copy(source: int) -> Iterator[Path]:
    """The dump as a file of the caller's in a new 0700 directory, removed
    after; a flattened dump reassembled."""
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="kdlab-dump-"))
    try:
        path = directory / "vmcore"
        if flattened(source):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                unflatten(source, target)
            except ValueError as err:
                raise _usage(f"cannot read the dump: {err}") from None
            finally:
                os.close(target)
        else:
            save(source, str(path), force=False)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# Running the tools


def run_tool(command: list[str], fds: tuple[int, ...] = ()) -> int:
    """Run *command* (crash, or drgn in a Python of its own) in the
    foreground; Ctrl-C is its own (drgn's and crash's prompts take it), not
    kdlabctl's."""
    try:
        process = subprocess.Popen(command, pass_fds=fds)
    except FileNotFoundError:
        raise _usage(
            f"{command[0]} is not installed (apt-get install {CRASH_PACKAGE})"
        ) from None
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def require_drgn() -> None:
    """drgn is an optional extra of kdlab's: say how to get it."""
    import importlib.util

    if importlib.util.find_spec("drgn") is None:
        raise _usage(
            f"drgn is not installed for {sys.executable}: pip install "
            f"'{POSTMORTEM_EXTRA}' (or pip install drgn in kdlab's venv)"
        )


async def cmd_drgn(client: Client, args: argparse.Namespace) -> int:
    require_drgn()
    dump = await resolve(client, args.dump)
    if not dump.vmcoreinfo:
        raise _usage(f"drgn cannot read dump {dump.id}: {dump.problem}")
    vmlinux = await vmlinux_for(client, dump, args.vmlinux)
    unchecked(dump)
    fd = await client.open_dump(await client.dump_path(dump.id))
    try:
        with contextlib.ExitStack() as stack:
            if flattened(fd):  # drgn reads a copy, reassembled
                path = stack.enter_context(private_copy(fd))
                os.close(fd)
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            command = [sys.executable, "-m", "kdlabctl.dumps", str(fd), str(vmlinux)]
            return run_tool([*command, "--", *args.gdb_args], (fd,))
    finally:
        os.close(fd)


async def cmd_crash(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl.cli import say

    dump = await resolve(client, args.dump)
    vmlinux = await vmlinux_for(client, dump, args.vmlinux)
    unchecked(dump)
    fd = await client.open_dump(await client.dump_path(dump.id))
    try:
        with private_copy(fd) as vmcore:
            os.close(fd)
            fd = -1
            code = run_tool(["crash", *args.gdb_args, str(vmlinux), str(vmcore)])
    finally:
        if fd >= 0:
            os.close(fd)
    if code:
        say(
            f"{crash_version()} could not read dump {dump.id} of Linux "
            f"{dump.kernel_release or '(release unknown)'}: crash reads kernels "
            "no newer than itself, with the SLAB or SLUB allocator (kdlabctl "
            f"kernel check says what a kernel lacks); kdlabctl drgn {dump.id} "
            "reads it"
        )
    return code


def crash_version() -> str:
    """``crash 8.0.2``: what ``crash --version`` says first, or ``crash``."""
    try:
        done = subprocess.run(
            ["crash", "--version"], capture_output=True, text=True, check=False
        )
    except OSError:
        return "crash"
    words = [line for line in done.stdout.splitlines() if line.strip()]
    return words[0].strip() if words else "crash"


# kdlabctl dump ...


async def cmd_take(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import jobs

    path, job = await client.take_dump(args.name, compress=args.compress)
    code = await jobs.finish(client, job, quiet=True)
    if code == EXIT_OK:
        print((await client.dump_at(path)).id)
    return code


def _vmcoreinfo(dump: Dump) -> str:
    return "yes" if dump.vmcoreinfo else "no (see below)"


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output
    from kdlabctl.images import human

    dumps = [d for d in await client.list_dumps() if not args.name or d.vm == args.name]
    output.listing(
        dumps,
        json_output=args.json,
        headers=[
            "ID", "VM", "REASON", "RELEASE", "CREATED", "SIZE", "FORMAT", "VMCOREINFO"
        ],
        row=lambda d: [
            d.id,
            d.vm,
            d.reason,
            d.kernel_release or "-",
            output.timestamp(d.created),
            human(d.size),
            d.format,
            _vmcoreinfo(d),
        ],
    )  # fmt: skip
    if not args.json:
        for dump in dumps:
            if not dump.vmcoreinfo:
                print(f"{dump.id}: {dump.problem}")
    return EXIT_OK


async def cmd_get(client: Client, args: argparse.Namespace) -> int:
    fd = await client.open_dump(await client.dump_path(args.id))
    try:
        save(fd, args.output, force=args.force)
    finally:
        os.close(fd)
    return EXIT_OK


async def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    await client.delete_dump(args.id)
    return EXIT_OK


def define(dump: argparse.ArgumentParser) -> None:
    """The subcommands of ``kdlabctl dump`` (*dump*, the group's parser)."""
    dump.description = (
        "post-mortem dumps: kdlabd writes one when a VM's kernel panics; "
        "kdlabctl drgn and crash open them"
    )
    from kdlabctl.images import verbs_of

    verb = verbs_of(dump, "dump_command")

    take = verb("take", cmd_take, "dump a running or paused VM's memory now")
    take.add_argument("name", metavar="NAME", type=VM_NAME)
    take.add_argument(
        "--compress",
        action="store_true",
        help="kdump format, zlib-compressed (smaller, slower) instead of ELF",
    )

    listing = verb("list", cmd_list, "list dumps (of VM NAME)", plain=True)
    listing.add_argument("name", metavar="NAME", nargs="?", type=VM_NAME)
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    get = verb("get", cmd_get, "copy a dump into FILE, written as you")
    get.add_argument("id", metavar="ID")
    get.add_argument("-o", "--output", metavar="FILE", required=True)
    get.add_argument("--force", action="store_true", help="overwrite FILE")

    delete = verb("delete", cmd_delete, "delete a dump")
    delete.add_argument("id", metavar="ID")


def run_drgn(fd: int, vmlinux: str, argv: list[str]) -> None:
    """drgn on the dump at *fd* with *vmlinux*: what ``drgn -c CORE -s VMLINUX
    ARGS`` does with ARGS (``-e CODE``, a script and its arguments, or the
    interactive shell), on a descriptor instead of a path."""
    import runpy

    import drgn
    from drgn import cli

    parser = argparse.ArgumentParser(prog="kdlabctl drgn ID|NAME")
    parser.add_argument("-e", dest="exec", metavar="CODE")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("args", metavar="ARG", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    # kdlab's guests are x86-64; libkdumpfile cannot tell the architecture of
    # QEMU's kdump-compressed dumps by itself (libkdumpfile issue 36).
    prog = drgn.Program(drgn.Platform(drgn.Architecture.X86_64))
    try:
        prog.set_core_dump(fd)
        prog.load_debug_info([vmlinux])
    except Exception as err:  # drgn's errors: a plain Exception from libkdumpfile
        sys.exit(f"kdlabctl: drgn cannot read the dump with {vmlinux}: {err}")
    if args.exec is None and not args.args and sys.stdin.isatty():
        cli.run_interactive(prog, quiet=args.quiet)
        return
    drgn.set_default_prog(prog)
    if args.exec is not None:
        sys.argv = ["-e", *args.args]
        exec(args.exec, cli.default_globals(prog))  # the user's code, as drgn -e
        return
    if args.args:
        sys.argv = args.args
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.args[0])))
        runpy.run_path(args.args[0], init_globals={"prog": prog}, run_name="__main__")
        return
    exec(compile(sys.stdin.read(), "<stdin>", "exec"), cli.default_globals(prog))


if __name__ == "__main__":
    # kdlabctl drgn runs this with the dump's descriptor: FD VMLINUX -- ARGS
    run_drgn(int(sys.argv[1]), sys.argv[2], sys.argv[4:])
