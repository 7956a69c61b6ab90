"""kdlabctl: create, run and inspect kdlab VMs through kdlabd on D-Bus.

Up front, only what parsing the command line needs is imported: argparse and
the stdlib-light ``kdlab.errors`` (no dataclasses, no typing). A command
imports what it uses when it runs: dbus-next and asyncio through
kdlabctl.client (the one module that speaks D-Bus), the ``kernel`` group when
it is named (:class:`CommandParser`). So ``kdlabctl --help`` costs little more
than Python's own start (bench: ``cli:kdlabctl_startup``), and
tests/unit/test_layers.py keeps it so.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

from kdlab.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_TABLE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    InvalidState,
    KdlabError,
    exit_code_for,
)
from kdlab.wire import ON_PANIC_VALUES
from kdlabctl import images
from kdlabctl.names import BRIDGE, HIDDEN, HOST, IMAGE_NAME, RECORDING_ID, VM_NAME

TYPE_CHECKING = False  # typing's import costs start-up; mypy takes this as True
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from kdlabctl.asyncbus import Watch
    from kdlabctl.client import VM, Client, Diagnosis
    from kdlabctl.kernel import Artifacts, KernelFiles
    from kdlabctl.options import VMOptions
    from kdlabctl.shares import Server

Command = Callable[["Client", argparse.Namespace], Awaitable[int]]

# How long ``logs -f`` waits for news before it reads on in the log it holds.
LOG_READ_SECONDS = 0.2


def exit_codes_help() -> str:
    """The ``--help`` epilog: kdlab.errors' table of exit codes."""
    lines = ["exit codes:"]
    for entry in EXIT_TABLE:
        reasons = ", ".join(cls.reason for cls in entry.errors)
        line = f"  {entry.code:<3} {entry.meaning}"
        lines.append(f"{line} ({reasons})" if reasons else line)
    return "\n".join(lines) + "\n"


def _unsigned(bits: int, low: int = 0) -> Callable[[str], int]:
    """An argparse type for an integer that fits its D-Bus type (u, q, t)."""
    high = (1 << bits) - 1

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more (D-Bus d)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not 0 or more seconds")
    return value


def _ip_address(text: str) -> str:
    """An argparse type: an IP address (``localhost`` is 127.0.0.1)."""
    import ipaddress

    if text == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


class UsageError(Exception):
    """A problem with the command line or a local file, found before calling kdlabd."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Unavailable(Exception):
    """A program kdlabctl needs is not installed (the C compiler that builds
    kdlab's agent, for one); the message says what to install."""


def open_for_daemon(path: str, what: str) -> int:
    """Open *path* as the invoking user; kdlabd only ever sees the descriptor."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot open {what} {path}: {err.strerror}") from None


def _tree_build(tree: str) -> Artifacts:
    """What `make` left in a kernel tree (or O= directory), or why there is none."""
    from kdlabctl import kernel

    try:
        return kernel.tree_artifacts(tree)
    except kernel.KernelError as err:
        raise UsageError(str(err)) from None


def _initrd(
    files: KernelFiles, kernel: str, image: str | None, quiet: bool
) -> tuple[int | None, str]:
    """The initrd to pass (--initrd, kdlab's initramfs, or none: --no-initramfs),
    and which of kdlab's it is (kdlab.kernel.initramfs.MODE_*; "": none).

    With an image, a distribution kernel has virtio_blk as a module: with its
    modules (:func:`_modules_of`), kdlabctl builds a busybox initramfs that
    loads them and mounts the image. Without one, kdlab's userspace initramfs
    is the VM's whole system: a shell, the exec agent, the shares, and the
    kernel's modules when they are found.
    """
    from pathlib import Path

    from kdlab.kernel.initramfs import MODE_ROOT, MODE_USERSPACE
    from kdlabctl import initramfs

    if files.initrd:
        if files.modules:
            raise UsageError("--initrd and --modules exclude each other")
        if not files.initramfs:
            raise UsageError("--initrd and --no-initramfs exclude each other")
        return open_for_daemon(files.initrd, "initrd"), ""
    if not files.initramfs:
        if files.modules:
            raise UsageError("--modules and --no-initramfs exclude each other")
        return None, ""
    modules = _modules_of(files, Path(kernel))
    try:
        if image is None:
            archive, mode = userspace_initramfs(modules), MODE_USERSPACE
            built = "kdlab's userspace initramfs"
        elif modules is not None:
            archive = initramfs.build(modules, cache=_initramfs_cache())
            built, mode = "an initramfs loading virtio modules", MODE_ROOT
        else:
            return None, ""
    except (initramfs.InitramfsError, OSError) as err:
        raise UsageError(f"cannot build an initramfs: {err}") from None
    if not quiet:
        say(f"built {built}" + (f" with modules from {modules}" if modules else ""))
    return _memfd(archive), mode


def _memfd(archive: bytes) -> int:
    """A descriptor of *archive* in memory, for kdlabd to read."""
    fd = os.memfd_create("kdlab-initramfs", os.MFD_CLOEXEC)
    os.write(fd, archive)
    return fd


def _modules_of(files: KernelFiles, kernel: Path) -> Path | None:
    """The kernel's modules: --modules, those built in its tree, those unpacked
    next to it from a package; None when it has none there."""
    from pathlib import Path

    from kdlabctl import initramfs, kconfig

    if files.modules:
        return Path(files.modules)
    if files.tree:
        build = kconfig.directories(Path(files.tree))[1]
        return initramfs.tree_modules_dir(build) if build else None
    return initramfs.find_modules_dir(kernel, None)


def userspace_initramfs(modules: Path | None) -> bytes:
    """kdlab's userspace initramfs with *modules*, its agent built (once) into
    the caller's cache; a missing compiler is :class:`Unavailable`."""
    import tempfile
    from pathlib import Path

    from kdlabctl import initramfs

    with tempfile.TemporaryDirectory(prefix="kdlab-agent-") as scratch:
        binary = _built_agent(Path(scratch))
        return initramfs.build_userspace(modules, binary, cache=_initramfs_cache())


def _built_agent(scratch: Path) -> Path:
    """kdlab's agent from the caller's cache, compiled there if it is not yet;
    a caller without a cache (a system user without a home) compiles it into
    *scratch*."""
    from kdlab import agent
    from kdlabctl import gdbcache

    try:
        try:
            return agent.build(gdbcache.cache_home() / "agent")
        except OSError:
            return agent.build(scratch)
    except agent.AgentBuildError as err:
        raise Unavailable(str(err)) from None


def _initramfs_cache() -> Path:
    from kdlabctl import gdbcache

    return gdbcache.cache_home() / "initramfs"


async def create_vm(
    client: Client, name: str, files: KernelFiles, options: VMOptions, *, quiet: bool
) -> None:
    """Open the kernel (and an initrd) as the user and create VM *name*."""
    from dataclasses import replace

    from kdlabctl.options import BootFiles

    kernel, vmlinux = files.kernel, files.vmlinux
    if files.tree:
        built = _tree_build(files.tree)
        kernel = str(built.bzimage)
        vmlinux = vmlinux or (str(built.vmlinux) if built.vmlinux else None)
    elif not kernel:
        raise UsageError(
            "give --kernel PATH (a bzImage) or --tree PATH (a kernel tree)"
        )
    if vmlinux and not os.path.isfile(vmlinux):
        raise UsageError(f"vmlinux {vmlinux} is not a file")
    options = replace(
        options,
        vmlinux=os.path.abspath(vmlinux) if vmlinux else None,
        kernel_path=os.path.abspath(kernel),
        tree=os.path.abspath(files.tree) if files.tree else None,
    )
    fds = [open_for_daemon(kernel, "kernel")]
    try:
        initrd, mode = _initrd(files, kernel, options.image, quiet)
        if initrd is not None:
            fds.append(initrd)
        options = replace(options, initramfs=mode or None)
        path = await client.create_vm(name, options, BootFiles(fds[0], initrd))
    finally:
        for fd in fds:
            os.close(fd)
    if not quiet:
        print(f"created VM {name} ({path})")
    await warm_index(client, name)


async def warm_index(client: Client, name: str) -> None:
    """Start indexing the vmlinux ``kdlabctl gdb NAME`` will load, in the
    background: the first attach then finds it in gdb's index cache."""
    from kdlabctl import caller, debug, gdbcache

    try:
        vmlinux = debug.find_vmlinux(await client.vm(name), None, caller.uid())
    except FileNotFoundError:
        return
    gdbcache.warm(vmlinux)


async def cmd_create(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl.kernel import KernelFiles
    from kdlabctl.options import VMOptions

    shares = _shares_option(args)
    files = KernelFiles(
        kernel=args.kernel,
        tree=args.tree,
        vmlinux=args.vmlinux,
        initrd=args.initrd,
        modules=args.modules,
        initramfs=not args.no_initramfs,
    )
    options = VMOptions(
        cmdline=args.cmdline,
        memory_mib=args.memory,
        vcpus=args.cpus,
        gdb=False if args.no_gdb else None,
        gdb_tcp_port=args.gdb_tcp,
        image=args.image or None,
        disk_size=args.disk_size or None,
        extra_disks=tuple(args.extra_disk or ()),
        on_panic=args.on_panic,
        shares=shares,
    )
    await create_vm(client, args.name, files, options, quiet=args.quiet)
    return EXIT_OK


LIST_HEADERS = ("NAME", "STATE", "MEMORY", "CPUS", "ACCEL", "GDB", "OWNER")


def list_row(vm: VM, owner: str) -> list[str]:
    """A VM's row of ``kdlabctl list`` (LIST_HEADERS), *owner* its owner's name."""
    return [
        vm.name,
        vm.state,
        f"{vm.memory_mib}M",
        str(vm.vcpus),
        vm.accel,
        vm.gdb_stub,
        owner,
    ]


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output

    output.listing(
        await client.list_vms(),
        json_output=args.json,
        headers=LIST_HEADERS,
        row=lambda vm: list_row(vm, output.user_name(vm.owner)),
    )
    return EXIT_OK


def list_all_hosts(args: argparse.Namespace) -> int:
    """``kdlabctl list --all-hosts``: this machine's VMs and every host's of
    hosts.toml, a HOST column first; a host that did not answer is a warning
    and exit 69, after the rows of those that did."""
    from kdlabctl import caller, hosts, output

    answers = hosts.ask_all(
        [None, *hosts.load().values()],
        lambda client: client.list_vms(),
        args.bus or local_bus(),
    )
    rows, found = [], []
    for answer in answers:
        if answer.error:
            say(f"{answer.host}: {answer.error}")
        for vm in answer.value or []:
            owner = caller.user_name_on(answer.remote, vm.owner)
            rows.append([answer.host, *list_row(vm, owner)])
            found.append({"host": answer.host, **output.as_json(vm)})
    if args.json:
        output.print_json(found)
    else:
        print(output.table(["HOST", *LIST_HEADERS], rows))
    return EXIT_UNAVAILABLE if any(answer.error for answer in answers) else EXIT_OK


async def cmd_hosts(_client: object, args: argparse.Namespace) -> int:
    from kdlabctl import hosts

    return hosts.cmd_hosts(args.json)


async def cmd_show(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output

    vm = await client.vm(args.name)
    vm = vm.replace(diagnosis=await full_diagnosis(client, vm))
    if args.json:
        output.print_json(output.as_json(vm))
        return EXIT_OK
    fields = [
        ("Name", vm.name),
        ("State", vm.state),
        ("UUID", vm.uuid),
        ("Owner", f"{output.user_name(vm.owner)} ({vm.owner})"),
        ("Cmdline", vm.cmdline),
        ("Memory", f"{vm.memory_mib} MiB"),
        ("vCPUs", str(vm.vcpus)),
        ("Accel", vm.accel),
        ("gdbstub", vm.gdb_stub),
        ("Waiting", "for a debugger" if vm.waiting_for_debugger else "no"),
        ("Kernel", f"{vm.kernel_path or '-'} ({vm.kernel_release or '?'})"),
        ("vmlinux", vm.vmlinux or "-"),
        *initramfs_fields(vm),
        ("Created", output.timestamp(vm.created)),
        ("Checkpoints", ", ".join(str(c[0]) for c in vm.checkpoints) or "-"),
        *run_fields(vm),
        *share_fields(vm),
    ]
    found = output.diagnosis(vm.diagnosis)
    if found:
        fields += [
            ("Problem", f"{found['severity']} {found['code']}: {found['cause']}"),
            ("Fix", found["fix"]),
        ]
    output.print_fields(fields)
    return EXIT_OK


def initramfs_fields(vm: VM) -> list[tuple[str, str]]:
    """``show``'s line for kdlab's initramfs, when the VM boots one."""
    from kdlab.kernel.initramfs import MODE_ROOT, MODE_USERSPACE

    said = {
        MODE_USERSPACE: "kdlab's userspace (a shell on the console, kdlab's agent)",
        MODE_ROOT: "kdlab's (loads the kernel's modules, mounts the root disk)",
    }
    return [("Initramfs", said.get(vm.initramfs, vm.initramfs))] if vm.initramfs else []


def share_fields(vm: VM) -> list[tuple[str, str]]:
    """``show``'s line for a VM's shares (none without)."""
    shares = ", ".join(f"{tag}={directory}" for tag, directory in vm.shares)
    return [("Shares", shares)] if shares else []


def run_fields(vm: VM) -> list[tuple[str, str]]:
    """``show``'s lines for a run that records or replays (none for a boot)."""
    from kdlabctl.recordings import recording_id

    if not vm.run:
        return []
    return [("Run", vm.run), ("Recording", recording_id(vm.run_recording))]


async def cmd_start(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output

    if not args.attach and (args.console or args.vmlinux):
        raise UsageError("--console and --vmlinux go with --attach")
    await start_vm(client, args.name, paused=args.paused, checkpoint=args.checkpoint)
    found = output.diagnosis(await full_diagnosis(client, await client.vm(args.name)))
    if found:
        print(f"kdlabctl: {found['severity']}: {found['cause']}", file=sys.stderr)
        print(f"kdlabctl: fix: {found['fix']}", file=sys.stderr)
    if not args.attach:
        return EXIT_OK
    if args.console and args.paused:
        _waits_for_gdb(args.name)
    return await attach(client, args.name, args.console, args.vmlinux, args.gdb_args)


async def full_diagnosis(client: Client, vm: VM) -> Diagnosis:
    """The VM's diagnosis with the console's words when the caller may read its
    log (GetDiagnosis); else the public one everyone sees."""
    from kdlab.errors import NotAuthorized
    from kdlabctl.client import RemoteError

    if not vm.diagnosis[0]:
        return vm.diagnosis
    try:
        return await client.diagnosis(vm.name)
    except RemoteError as err:
        if err.name != NotAuthorized.dbus_name():
            raise
        return vm.diagnosis


async def start_vm(
    client: Client, name: str, *, paused: bool, checkpoint: str = ""
) -> None:
    """Start *name*; a VM made from a kernel tree boots the tree's newest build
    (into *checkpoint*, if that was taken with the same kernel), and kdlab's
    userspace initramfs built again with it (the tree's modules may have
    changed). The VM's shares are served first, as the user (who must own
    it)."""
    from kdlab.kernel.initramfs import MODE_USERSPACE
    from kdlabctl import caller
    from kdlabctl.kernel import KernelFiles

    vm = await client.vm(name)
    fds = []
    try:
        if vm.tree:
            bzimage = _tree_build(vm.tree).bzimage
            fds.append(open_for_daemon(str(bzimage), "kernel"))
            if vm.initramfs == MODE_USERSPACE:
                modules = _modules_of(KernelFiles(tree=vm.tree), bzimage)
                fds.append(_memfd(userspace_initramfs(modules)))
        # A running VM's start is refused by kdlabd: nothing to serve for it.
        serve = vm.shares and not vm.state.active
        remote = caller.remote()
        if serve and remote is not None:
            raise UsageError(
                f"VM {name} has shares: {no_shares_across(remote.hostname)}"
            )
        servers = await _serve_shares(client, vm) if serve else []
        try:
            await client.start(
                name,
                paused=paused,
                kernel=fds[0] if fds else None,
                initrd=fds[1] if len(fds) > 1 else None,
                checkpoint=checkpoint,
            )
        except BaseException:
            from kdlabctl import shares

            shares.stop(servers)
            raise
    finally:
        for fd in fds:
            os.close(fd)


def no_shares_across(host: str) -> str:
    """Why a share cannot be served for a VM on another host, and what to do."""
    return (
        "shares cannot be served across hosts (virtiofsd takes descriptors over "
        f"its socket, which do not cross ssh): run kdlabctl on {host} itself"
    )


async def _serve_shares(client: Client, vm: VM) -> list[Server]:
    """A virtiofsd of the user's listening on each share of *vm*."""
    from kdlabctl import shares

    try:
        return await shares.serve(client, vm)
    except shares.ShareError as err:
        code = EXIT_UNAVAILABLE if isinstance(err, shares.Unavailable) else EXIT_USAGE
        raise UsageError(str(err), code) from None


def _shares_option(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """``--share DIR[:TAG]``s, checked as the user before anything is made."""
    from kdlabctl import shares

    try:
        found = shares.shares_option([shares.parse(text) for text in args.share or ()])
    except shares.ShareError as err:
        raise UsageError(str(err)) from None
    return tuple(sorted((found or {}).items()))


async def cmd_stop(client: Client, args: argparse.Namespace) -> int:
    await client.stop(args.name, force=args.force, timeout=args.timeout)
    return EXIT_OK


async def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    if args.force and (await client.vm(args.name)).state.active:
        await client.stop(args.name, force=True)
    await client.delete(args.name)
    return EXIT_OK


async def cmd_gdb(client: Client, args: argparse.Namespace) -> int:
    return await gdb(client, args.name, args.vmlinux, args.gdb_args)


async def cmd_attach(client: Client, args: argparse.Namespace) -> int:
    vm = await client.vm(args.name)
    if vm.state.off:
        raise InvalidState(
            f"VM {args.name} is {vm.state}: start it first (kdlabctl start "
            f"{args.name}), or start it and attach in one step (kdlabctl start "
            f"--attach {args.name}; with --paused gdb comes before the first "
            "instruction)"
        )
    if args.console and vm.waiting_for_debugger:
        _waits_for_gdb(args.name)
    return await attach(client, args.name, args.console, args.vmlinux, args.gdb_args)


async def attach(
    client: Client,
    name: str,
    to_console: bool,
    vmlinux: str | None,
    gdb_args: list[str],
) -> int:
    """What attach, start --attach and up end with: gdb, or the console."""
    if to_console:
        return await console(client, name)
    return await gdb(client, name, vmlinux, gdb_args)


def _waits_for_gdb(name: str) -> None:
    """On the console of a VM that waits for gdb, nothing comes until it boots."""
    print(
        f"kdlabctl: {name} waits for the debugger: 'continue' in gdb (kdlabctl "
        f"attach {name}) boots it",
        file=sys.stderr,
    )


async def gdb(
    client: Client, name: str, vmlinux: str | None, gdb_args: list[str]
) -> int:
    """gdb on the VM's stub: kdlabd authorizes (OpenGdb) before gdb starts.

    kdlabctl relays the stub's stream to gdb itself (:func:`debug.serve_gdb`)
    and gdb reads the symbols through the caller's index cache
    (:mod:`kdlabctl.gdbcache`).
    """
    import signal
    import subprocess

    from kdlabctl import caller, debug, gdbcache

    vm = await client.vm(name)
    fd = await client.open_gdb(name)
    try:
        try:
            # Whose VM it is, is kdlabd's uid of the caller (on --host, the
            # ssh user's there); whose files gdb may trust is ours, here.
            symbols = debug.find_vmlinux(vm, vmlinux, caller.uid())
        except FileNotFoundError as err:
            raise UsageError(str(err)) from None
        script, refused = debug.gdb_script(symbols, os.getuid())
        if refused:
            say(
                f"the lx-* helpers are not loaded: {refused}; if you trust them, "
                f"type in gdb: source {symbols.parent / debug.GDB_SCRIPT}"
            )
        index = gdbcache.gdb_options(symbols, say)
        if vm.waiting_for_debugger:
            say(f"{name} waits for the debugger: 'continue' boots it")
        with debug.gdb_listener() as (listener, target):
            command = debug.gdb_command(
                symbols, target, gdb_args, script, index_cache=index
            )
            try:
                process = subprocess.Popen(command)
            except FileNotFoundError:
                raise UsageError("gdb is not installed (apt-get install gdb)") from None
            # Ctrl-C interrupts the kernel in gdb; it must not end kdlabctl (or gdb).
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                return debug.serve_gdb(listener, fd, process)
            finally:
                signal.signal(signal.SIGINT, previous)
    finally:
        os.close(fd)


def say(line: str) -> None:
    """A line for the user on stderr, from kdlabctl rather than the tool it runs."""
    print(f"kdlabctl: {line}", file=sys.stderr)


async def cmd_gdb_proxy(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import debug

    fd = await client.open_gdb(args.name)
    try:
        debug.relay(fd)
    finally:
        os.close(fd)
    return EXIT_OK


async def cmd_exec(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import execs

    if not args.gdb_args:
        raise UsageError("no command: kdlabctl exec NAME [OPTIONS] -- CMD [ARGS...]")
    command = execs.Command(
        argv=tuple(args.gdb_args),
        env=tuple(args.env),
        cwd=args.cwd or "",
        tty=args.tty,
        timeout=args.timeout,
        wait=args.wait,
    )
    return await execs.run(client, args.name, command)


async def cmd_console(client: Client, args: argparse.Namespace) -> int:
    return await console(client, args.name)


async def console(client: Client, name: str) -> int:
    from kdlabctl import debug

    fd = await client.open_console(name)
    try:
        why = debug.console(fd, f"Connected to {name} (escape character is ^])")
    finally:
        os.close(fd)
    print(f"\r\nkdlabctl: {why}", file=sys.stderr)
    return EXIT_OK


def _copy(fd: int) -> int:
    """Copy what *fd* has now to stdout; return the number of bytes copied."""
    total = 0
    while chunk := os.read(fd, 65536):
        sys.stdout.buffer.write(chunk)
        total += len(chunk)
    sys.stdout.buffer.flush()
    return total


async def cmd_logs(client: Client, args: argparse.Namespace) -> int:
    if not args.follow:
        fd = await client.open_console_log(args.name)
        try:
            _copy(fd)
        finally:
            os.close(fd)
        return EXIT_OK
    async with client.watch_vm(args.name) as watch:
        fd = await client.open_console_log(args.name)
        try:
            await _follow_log(watch, fd)
        finally:
            os.close(fd)
    return EXIT_OK


async def _follow_log(watch: Watch[VM], fd: int) -> None:
    """Print the console log on *fd* as it grows, until the VM is off.

    The VM's state comes from its signals, the log from the one descriptor
    OpenConsoleLog gave: while nothing is new, it is read on every
    :data:`LOG_READ_SECONDS` (a read of a local file, not a call). A new boot
    starts a new log, but only from a VM that is off, which ends the follow:
    the descriptor always holds the current boot's log.
    """
    while True:
        # The state first: whatever the boot wrote before it ended is in the
        # log when it is read to its end below. A VM that went away is off.
        off = watch.ended or watch.current.state.off
        copied = _copy(fd)
        if off:
            return
        if not copied:
            await watch.changed(LOG_READ_SECONDS)


async def cmd_notify(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import notify

    return await notify.serve(client, bus=args.bus, page_url=args.page_url)


async def cmd_up(client: Client, args: argparse.Namespace) -> int:
    """The seed's whole recipe: check, build, (re)create, boot paused, debug."""
    from kdlab.kernel.findings import errors
    from kdlabctl import kconfig, kernel
    from kdlabctl.kernel import KernelFiles
    from kdlabctl.options import VMOptions

    tree = os.path.abspath(args.path)
    shares = _shares_option(args)
    try:
        findings = kernel.check_config(kconfig.locate(tree))
    except kconfig.KernelError as err:
        raise UsageError(str(err)) from None
    blocking = errors(findings)
    if blocking:
        print(kernel.format_findings(blocking), file=sys.stderr)
        raise UsageError(
            "the kernel configuration stops the debug lab: fix it, or run "
            f"kdlabctl kernel configure {args.path}"
        )
    if args.build:
        built = await kernel.build(tree, None, len(os.sched_getaffinity(0)))
        if built != EXIT_OK:
            return built
    name = args.name or up_name(tree)
    options = VMOptions(
        cmdline=args.cmdline,
        memory_mib=args.memory,
        image=args.image or None,
        shares=shares,
    )
    # Paused for gdb; with the console (or a command) instead nothing would
    # ever resume it.
    paused = not (args.console or args.run)
    if not (args.checkpoint and await _up_from_checkpoint(client, name, tree, args)):
        files = KernelFiles(tree=tree, initramfs=not args.no_initramfs)
        await _reuse_or_create(client, name, files, options)
        await start_vm(client, name, paused=paused)
    if args.run:
        return await run_once(client, name, args.run)
    return await attach(client, name, args.console, None, args.gdb_args)


async def run_once(client: Client, name: str, command: str) -> int:
    """``up --run``: the shell command *command* in the booting VM (once its
    agent answers), its output and status, then the VM stopped."""
    from kdlabctl import execs

    try:
        return await execs.run(
            client, name, execs.Command(("sh", "-c", command), wait=UP_RUN_WAIT)
        )
    finally:
        await client.stop(name, force=True)


async def _up_from_checkpoint(
    client: Client, name: str, tree: str, args: argparse.Namespace
) -> bool:
    """Restore (or start into) checkpoint ``--checkpoint`` when the tree's
    kernel is the one it was taken with; False (and why) when it must boot."""
    import hashlib

    from kdlab.errors import CheckpointMismatch, NoSuchVM
    from kdlabctl import jobs
    from kdlabctl.client import RemoteError

    tag = args.checkpoint
    try:
        vm = await client.vm(name)
    except RemoteError as err:
        if err.name != NoSuchVM.dbus_name():
            raise
        return False
    found = [c for c in vm.checkpoints if c[0] == tag]
    with open(_tree_build(tree).bzimage, "rb") as kernel:
        digest = hashlib.file_digest(kernel, "sha256").hexdigest()
    if vm.tree != tree or not found or found[0][4] != digest:
        why = "has no checkpoint" if not found else "was not taken with this kernel:"
        say(f"VM {name} {why} {tag}; booting")
        return False
    paused = not args.console
    try:
        if vm.state.active:
            path = await client.restore_checkpoint(name, tag, paused=paused)
            return await jobs.finish(client, path, quiet=True) == EXIT_OK
        await start_vm(client, name, paused=paused, checkpoint=tag)
    except RemoteError as err:
        if err.name != CheckpointMismatch.dbus_name():
            raise
        say(f"{err.message}; booting")
        return False
    return True


UP_RUN_WAIT = 300.0
"""How long ``up --run`` waits for a booting guest's agent (TCG boots are slow)."""


def up_name(tree: str) -> str:
    """A VM name from a tree's directory name (linux-6.9-rc1 stays as it is)."""
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(tree.rstrip("/")))
    return cleaned.strip("-._")[:63] or "kernel"


async def _reuse_or_create(
    client: Client, name: str, files: KernelFiles, options: VMOptions
) -> None:
    """Keep (stopped) the VM of the tree of *files* if it exists; create it
    otherwise."""
    from kdlab.errors import NoSuchVM
    from kdlabctl.client import RemoteError

    tree = files.tree
    try:
        vm = await client.vm(name)
    except RemoteError as err:
        if err.name != NoSuchVM.dbus_name():
            raise
        await create_vm(client, name, files, options, quiet=True)
        return
    if vm.tree != tree:
        raise UsageError(
            f"VM {name} boots another kernel ({vm.tree or vm.kernel_path}): use --name"
        )
    if vm.state.active:
        await client.stop(name, force=True)


def add_start_parser(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
) -> None:
    """``kdlabctl start``'s options."""
    start = command("start", cmd_start, "boot a VM")
    vm_argument(start)
    start.add_argument(
        "--paused",
        action="store_true",
        help="CPUs wait before the first instruction (attach gdb, then continue)",
    )
    start.add_argument(
        "--attach",
        action="store_true",
        help="then attach gdb, as kdlabctl attach does; options after -- go to gdb",
    )
    start.add_argument(
        "--console",
        action="store_true",
        help="with --attach: attach the serial console instead of gdb",
    )
    start.add_argument(
        "--from",
        dest="checkpoint",
        default="",
        metavar="TAG",
        help="start in the state of checkpoint TAG instead of booting",
    )
    add_vmlinux_option(start)


def add_up_parser(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
) -> None:
    up = command(
        "up",
        cmd_up,
        "check a kernel tree, (build it,) create or reuse its VM, boot it paused "
        "and attach gdb; unknown options go to gdb",
    )
    up.add_argument("path", metavar="PATH", help="a kernel source tree (or O= dir)")
    up.add_argument("--name", help="VM name (default: the tree's directory name)")
    up.add_argument(
        "--image", metavar="IMAGE", type=IMAGE_NAME, help="root disk image for a new VM"
    )
    up.add_argument("--build", action="store_true", help="make the kernel first")
    up.add_argument(
        "--console",
        action="store_true",
        help="boot without waiting for gdb and attach the console instead",
    )
    up.add_argument("--memory", type=_unsigned(32), metavar="MIB")
    up.add_argument("--cmdline", metavar="STR", help="kernel command line (new VM)")
    add_share_option(up, "(new VM)")
    up.add_argument(
        "--checkpoint",
        metavar="TAG",
        help="return to this checkpoint instead of booting, when it was taken "
        "with the tree's kernel",
    )
    up.add_argument(
        "--run",
        metavar="CMD",
        help="boot without gdb, run the shell command CMD in the guest, print "
        "its output, stop the VM and exit with CMD's status (a one-shot test)",
    )
    add_no_initramfs_option(up)


def add_create_parser(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
) -> None:
    """``kdlabctl create``: its many options have a function of their own."""
    create = command("create", cmd_create, "define a VM that boots KERNEL directly")
    create.add_argument("name", metavar="NAME")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--kernel", metavar="PATH", help="bzImage to boot")
    source.add_argument(
        "--tree",
        metavar="PATH",
        help="a built kernel tree (or O= dir): boots its bzImage, gdb reads its "
        "vmlinux, and every start boots the newest build",
    )
    create.add_argument(
        "--initrd",
        metavar="PATH",
        help="initramfs to boot with (default without --image: kdlab's, a shell "
        "on the console and the agent of kdlabctl exec)",
    )
    create.add_argument("--cmdline", metavar="STR", help="kernel command line")
    create.add_argument(
        "--memory",
        type=_unsigned(32),
        metavar="MIB",
        help="memory in MiB (default 512)",
    )
    create.add_argument(
        "--cpus", type=_unsigned(32), metavar="N", help="vCPUs (default 1)"
    )
    create.add_argument(
        "--no-gdb", action="store_true", help="no gdbstub (and no nokaslr)"
    )
    create.add_argument(
        "--gdb-tcp",
        type=_unsigned(16),
        metavar="PORT",
        help="gdbstub on 127.0.0.1:PORT instead of kdlabd's private socket",
    )
    create.add_argument(
        "--vmlinux", metavar="PATH", help="vmlinux with debug info, for kdlabctl gdb"
    )
    create.add_argument(
        "--image",
        metavar="IMAGE",
        type=IMAGE_NAME,
        help="root disk: a qcow2 overlay of IMAGE (vda)",
    )
    create.add_argument(
        "--disk-size",
        type=images.size,
        metavar="SIZE",
        help="make the root disk larger than the image",
    )
    create.add_argument(
        "--extra-disk",
        type=images.size,
        action="append",
        metavar="SIZE",
        help="a blank disk (vdb, vdc, ...); repeatable",
    )
    create.add_argument(
        "--on-panic",
        choices=ON_PANIC_VALUES,
        help="when the kernel panics: write a dump and power off (default), "
        "write one and keep the VM paused for gdb, or do nothing",
    )
    add_share_option(create, "")
    create.add_argument(
        "--modules",
        metavar="DIR",
        help="the kernel's /lib/modules/RELEASE: kdlab's initramfs loads the "
        "modules it needs from there (found by itself next to a kernel unpacked "
        "from a package, and in a tree after make modules)",
    )
    add_no_initramfs_option(create)
    create.add_argument("-q", "--quiet", action="store_true")


def add_no_initramfs_option(parser: argparse.ArgumentParser) -> None:
    """``--no-initramfs``: boot the kernel alone (create and up)."""
    parser.add_argument(
        "--no-initramfs",
        action="store_true",
        help="boot without any initramfs (without --image the kernel then finds "
        "no root: VFS: Unable to mount root fs)",
    )


def add_share_option(parser: argparse.ArgumentParser, note: str) -> None:
    """``--share DIR[:TAG]``, repeatable."""
    parser.add_argument(
        "--share",
        action="append",
        metavar="DIR",
        help="DIR[:TAG]: a directory of yours the guest mounts with virtiofs as TAG "
        "(default: DIR's name; kdlab's initramfs mounts it at /mnt/TAG), served "
        f"with your rights by a virtiofsd of yours at each start; repeatable {note}",
    )


def vm_argument(parser: argparse.ArgumentParser) -> None:
    """The NAME of an existing VM (the shell completes it from kdlabd)."""
    parser.add_argument("name", metavar="NAME", type=VM_NAME)


def add_vmlinux_option(parser: argparse.ArgumentParser) -> None:
    """``--vmlinux``: the symbols for gdb (kdlabctl.debug.find_vmlinux)."""
    parser.add_argument(
        "--vmlinux",
        metavar="PATH",
        help="symbols (default: on your own VMs the one given at create or the "
        "kernel's build tree, else /usr/lib/debug/boot/vmlinux-RELEASE)",
    )


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, with the terminal's width asked once: argparse makes a
    formatter for every option it adds, and each would import shutil and ask
    the terminal again."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, width or _width())


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The same, keeping the description's and epilog's lines (the exit codes)."""


@functools.cache
def _width() -> int:
    """argparse's width (shutil.get_terminal_size less 2): $COLUMNS, else the
    terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(1).columns
        except OSError:
            columns = 0
    return (columns if columns > 0 else 80) - 2


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose options may be defined when it is first used.

    The command groups (``image``, ``kernel``) and ``completion`` live in
    modules of their own, some with heavy imports (kdlab's kconfig rules,
    dataclasses): their options are defined when they are on the command
    line (or the whole parser is asked for: the man page, completion), not
    at every start of kdlabctl.
    """

    def __init__(
        self,
        *args: Any,
        define: Callable[[argparse.ArgumentParser], None] | None = None,
        top: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._define = define
        if not top:
            # ``kdlabctl up TREE --host lab``: a command takes the global
            # --host after it too. Unless given there, it leaves the global
            # value alone (argparse copies a command's defaults over it);
            # --help shows it once, with kdlabctl's options.
            self.add_argument(
                "--host",
                type=HOST,
                metavar="HOST",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )

    def define_now(self) -> None:
        """Define the options now, if they were left for later."""
        if self._define is not None:
            define, self._define = self._define, None
            define(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        self.define_now()
        return super().parse_known_args(args, namespace)


def _define_kernel(parser: argparse.ArgumentParser) -> None:
    from kdlabctl import kernel

    kernel.define(parser)


def _define_checkpoint(parser: argparse.ArgumentParser) -> None:
    from kdlabctl import checkpoints

    checkpoints.define(parser)


def _define_modules(parser: argparse.ArgumentParser) -> None:
    from kdlabctl import modules

    modules.define(parser)


def _define_image(parser: argparse.ArgumentParser) -> None:
    images.define(parser)


def _define_dump(parser: argparse.ArgumentParser) -> None:
    from kdlabctl import dumps

    dumps.define(parser)


async def cmd_drgn(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import dumps

    return await dumps.cmd_drgn(client, args)


async def cmd_crash(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import dumps

    return await dumps.cmd_crash(client, args)


def add_postmortem_parsers(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
    commands: Any,
) -> CommandParser:
    """``drgn`` and ``crash`` on a dump (what kdlabctl does not know goes to
    them), and the ``dump`` group (returned: its options are defined later)."""
    for name, fn, text in (
        (
            "drgn",
            cmd_drgn,
            "drgn on a dump with its vmlinux; unknown options and arguments go to "
            "drgn (-e CODE, or a script and its arguments)",
        ),
        (
            "crash",
            cmd_crash,
            "crash on a dump with its vmlinux; unknown options go to crash",
        ),
    ):
        tool = command(name, fn, text)
        tool.add_argument(
            "dump",
            metavar="ID|NAME",
            type=VM_NAME,
            help="a dump's id, or a VM's name for its latest dump",
        )
        add_vmlinux_option(tool)
    group: CommandParser = commands.add_parser(
        "dump",
        help="post-mortem dumps of VMs: take, list, get, delete",
        define=_define_dump,
    )
    return group


async def cmd_record(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import recordings

    return await recordings.cmd_record(client, args)


async def cmd_replay(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import recordings

    return await recordings.cmd_replay(client, args)


def _define_recording(parser: argparse.ArgumentParser) -> None:
    from kdlabctl import recordings

    recordings.define(parser)


def add_exec_parser(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
) -> None:
    """``exec NAME [OPTIONS] -- CMD [ARGS...]``: the words after the options
    are the command's (parse_args keeps them)."""
    run = command(
        "exec",
        cmd_exec,
        "run a command in a running VM's guest: its output, and its exit "
        "status as kdlabctl's (kdlabctl exec NAME -- CMD [ARGS...])",
    )
    vm_argument(run)
    run.set_defaults(takes_command=True)
    run.add_argument(
        "-t",
        "--tty",
        action="store_true",
        help="run it on a terminal in the guest (like ssh -t): for a shell, "
        "top, or anything that wants one",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a variable in its environment (repeatable)",
    )
    run.add_argument("--cwd", metavar="DIR", help="the guest directory to run it in")
    run.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="kill it after this long (exit 124)",
    )
    run.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for the guest's agent to come up (a VM that was "
        "just started); default: fail at once (exit 13)",
    )


def add_record_parsers(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
    commands: Any,
) -> CommandParser:
    """``record`` and ``replay``, and the ``recording`` group (returned: its
    options are defined later)."""
    record = command(
        "record",
        cmd_record,
        "boot a stopped VM recording its run (QEMU TCG record/replay) until it "
        "stops; prints the recording's id",
    )
    vm_argument(record)
    record.add_argument(
        "--as",
        dest="recording",
        metavar="REC",
        help="the recording's id (default: the VM's name and the time)",
    )
    record.add_argument(
        "--paused",
        action="store_true",
        help="CPUs wait before the first instruction (attach gdb, then continue)",
    )
    record.add_argument(
        "--single-cpu",
        action="store_true",
        help="record a VM of several vCPUs with one (else it is refused)",
    )
    replay = command(
        "replay",
        cmd_replay,
        "boot a stopped VM replaying recording REC, paused before its first "
        "instruction for gdb (reverse-stepi and reverse-continue work)",
    )
    vm_argument(replay)
    replay.add_argument("recording", metavar="REC", type=RECORDING_ID)
    replay.add_argument(
        "--snapshot-interval",
        type=_seconds,
        metavar="SECONDS",
        help="seconds of replay between kdlabd's snapshots, from which gdb goes "
        "backwards (default 1; 0: none, back from the start)",
    )
    for sub in (record, replay):
        sub.add_argument(
            "--attach",
            action="store_true",
            help="then attach gdb, as kdlabctl gdb does; options after -- go to gdb",
        )
        add_vmlinux_option(sub)
        sub.add_argument("-q", "--quiet", action="store_true")
    group: CommandParser = commands.add_parser(
        "recording",
        help="recordings of VMs' runs: list, show, delete",
        define=_define_recording,
    )
    return group


def _define_completion(parser: argparse.ArgumentParser) -> None:
    from kdlabctl import completion

    completion.define(parser)


def add_list_parsers(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
) -> None:
    """``list`` (here, on --host, or everywhere) and ``hosts``."""
    listing = command("list", cmd_list, "list VMs")
    listing.set_defaults(plain=True)  # only calls (Client.plain)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument(
        "--all-hosts",
        action="store_true",
        help="this machine's VMs and those of every host of hosts.toml, with a "
        "HOST column (exit 69 when a host does not answer)",
    )
    probe = command(
        "hosts",
        cmd_hosts,
        "the hosts of ~/.config/kdlab/hosts.toml, each reached over ssh: whether it "
        "answers, its kdlab version, the VMs you see there (exit 69 when one does "
        "not answer)",
    )
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.set_defaults(
        needs_daemon=False, without_host="asks every host of hosts.toml itself"
    )


def add_web_parser(
    command: Callable[[str, Command, str], argparse.ArgumentParser],
) -> None:
    """``kdlabctl web``'s options (the command runs no call on the bus itself)."""
    web = command(
        "web",
        cmd_web,
        "serve kdlab's Cockpit page to your browser, without a Cockpit login: "
        "prints the page's URL (with a secret token) first; Ctrl-C stops it",
    )
    web.add_argument(
        "--address",
        type=_ip_address,
        default="127.0.0.1",
        help="IP address to listen on (default 127.0.0.1; any other lets whoever "
        "reaches it with the URL use your session)",
    )
    web.add_argument(
        "--port",
        type=_unsigned(16),
        default=0,
        metavar="PORT",
        help="TCP port (default: a free one)",
    )
    # No call of its own, but its page's: through --host's session, if given.
    web.set_defaults(needs_daemon=False, on_host=True)


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """kdlabctl's parser; *lazy* leaves the options of a command group in a
    module of its own to when the group is used (:class:`CommandParser`)."""
    parser = CommandParser(
        prog="kdlabctl",
        description="Kernel debug VMs served by kdlabd: create, start, watch, debug.",
        epilog=exit_codes_help(),
        formatter_class=RawDescriptionHelpFormatter,
        top=True,
    )
    parser.add_argument(
        "--bus",
        help="system (default, or $KDLAB_BUS), session, or a D-Bus address; with "
        "--host, the bus on the host (default: its bus in hosts.toml, else system)",
    )
    parser.add_argument(
        "--host",
        type=HOST,
        metavar="HOST",
        help="kdlabd on HOST, reached over ssh: a host of ~/.config/kdlab/hosts.toml "
        "or [USER@]HOST[:PORT] (default $KDLAB_HOST; empty: this machine). The "
        "command runs here (files are read here, gdb runs here); may also come "
        "after the command",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=CommandParser
    )

    def command(
        name: str, fn: Command, help_text: str, *, plain: bool = False
    ) -> argparse.ArgumentParser:
        """A command; *plain* ones only call kdlabd (:meth:`Client.plain`)."""
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=fn, plain=plain)
        return sub

    add_create_parser(command)

    add_list_parsers(command)

    show = command("show", cmd_show, "show one VM's properties", plain=True)
    vm_argument(show)
    show.add_argument("--json", action="store_true", help="machine-readable output")

    add_start_parser(command)

    stop = command(
        "stop", cmd_stop, "power a VM off (ACPI, then force after a timeout)"
    )
    vm_argument(stop)
    stop.add_argument("--force", action="store_true", help="pull the plug at once")
    stop.add_argument(
        "--timeout",
        type=_unsigned(32),
        metavar="SECONDS",
        help="wait this long for the guest before forcing (default 30)",
    )

    delete = command("delete", cmd_delete, "remove a stopped VM and its files")
    vm_argument(delete)
    delete.add_argument("--force", action="store_true", help="stop it first if it runs")

    gdb = command(
        "gdb",
        cmd_gdb,
        "run gdb on the VM's gdbstub; unknown options go to gdb "
        "(e.g. --batch -ex 'hbreak start_kernel' -ex continue)",
    )
    vm_argument(gdb)
    add_vmlinux_option(gdb)

    attaching = command(
        "attach",
        cmd_attach,
        "attach to a running or paused VM: gdb (as kdlabctl gdb; options after "
        "-- go to gdb), or the serial console with --console",
    )
    vm_argument(attaching)
    attaching.add_argument(
        "--console",
        action="store_true",
        help="the serial console (as kdlabctl console) instead of gdb",
    )
    add_vmlinux_option(attaching)
    proxy = command(
        "gdb-proxy",
        cmd_gdb_proxy,
        "relay the VM's gdbstub on stdin/stdout (target remote | ...)",
    )
    vm_argument(proxy)

    console = command(
        "console", cmd_console, "attach to the serial console; Ctrl-] detaches"
    )
    vm_argument(console)

    add_exec_parser(command)

    later = [
        commands.add_parser("image", help="manage disk images", define=_define_image),
        commands.add_parser(
            "kernel",
            help="configure, check and build a kernel tree for kdlab",
            define=_define_kernel,
        ),
        add_postmortem_parsers(command, commands),
        commands.add_parser(
            "checkpoint",
            help="save a running VM's state and return to it",
            define=_define_checkpoint,
        ),
        add_record_parsers(command, commands),
        commands.add_parser(
            "modules",
            help="load modules you built into a running VM",
            define=_define_modules,
        ),
    ]
    add_up_parser(command)

    logs = command(
        "logs", cmd_logs, "print the serial console log of the current or last boot"
    )
    vm_argument(logs)
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new output until the VM stops",
    )
    add_web_parser(command)
    notify = command(
        "notify",
        cmd_notify,
        "desktop notifications of your VMs and image jobs (panics, errors, "
        "unexpected stops, builds that end), until SIGINT or SIGTERM",
    )
    notify.add_argument(
        "--page-url",
        default="http://localhost:9090/cockpit/@localhost/kdlab/index.html",
        metavar="URL",
        help="the kdlab page the 'page' action opens (default: Cockpit's on "
        "this machine; kdlabctl web prints another)",
    )
    text = (
        "print the completion script of SHELL; e.g. in ~/.bashrc: "
        "source <(kdlabctl completion bash)"
    )
    later.append(
        commands.add_parser(
            "completion", help=text, description=text, define=_define_completion
        )
    )
    if not lazy:
        for parser_of_later in later:
            parser_of_later.define_now()
    return parser


async def cmd_web(_client: object, args: argparse.Namespace) -> int:
    from kdlabctl import caller, web

    try:
        await web.serve(args.address, args.port, args.bus, caller.remote())
    except web.Unavailable as err:
        print(f"kdlabctl: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """*argv* parsed; where gdb runs, what kdlabctl does not know (options it
    does not have, and whatever follows ``--``) is ``gdb_args`` (and the
    command ``exec`` runs)."""
    args, extra = parser.parse_known_args(argv)
    if "--" in extra and extra.count("--") == argv.count("--"):
        # argparse drops the "--" that ends kdlabctl's options only when no
        # option came between it and the VM's name: it is not gdb's either.
        extra.remove("--")
    if extra and not (_runs_gdb(args) or getattr(args, "takes_command", False)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.gdb_args = extra
    return args


def _runs_gdb(args: argparse.Namespace) -> bool:
    if getattr(args, "console", False):
        return False
    return args.func in (cmd_gdb, cmd_up, cmd_attach, cmd_drgn, cmd_crash) or bool(
        getattr(args, "attach", False)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [HIDDEN]:
        from kdlabctl import completion

        return completion.main(build_parser(), argv[1:])
    bridged = bridge_bus(argv)
    if bridged is not None:
        from kdlabctl import bridge

        return bridge.serve(bridged)
    args = parse_args(build_parser(lazy=True), argv)
    try:
        return _run(args)
    except UsageError as err:
        print(f"kdlabctl: {err}", file=sys.stderr)
        return err.exit_code
    except Unavailable as err:
        print(f"kdlabctl: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KdlabError as err:  # found by kdlabctl, before asking kdlabd
        print(f"kdlabctl: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_FAILURE


def bridge_bus(argv: list[str]) -> str | None:
    """The bus of ``kdlabctl [--bus BUS] __bridge``, the command ssh runs on a
    host for ``--host`` (:func:`kdlabctl.hosts.ssh_argv`); None for any other
    command line. Like ``__complete``, it is no command of the parser."""
    if argv[-1:] != [BRIDGE]:
        return None
    given = argv[:-1]
    if not given:
        return local_bus()
    if len(given) == 2 and given[0] == "--bus":
        return given[1]
    if len(given) == 1 and given[0].startswith("--bus="):
        return given[0].removeprefix("--bus=")
    return None


def local_bus() -> str:
    """This machine's kdlabd bus when --bus is not given: $KDLAB_BUS, else the
    system bus. (A host's is in hosts.toml: $KDLAB_BUS is not for it.)"""
    return os.environ.get("KDLAB_BUS") or "system"


def _run(args: argparse.Namespace) -> int:
    """Run the command *args* names, here or with --host; kdlabd's errors as
    exit codes."""
    spec = _host_spec(args)
    if getattr(args, "all_hosts", False):
        return list_all_hosts(args)
    if not spec:
        args.bus = args.bus or local_bus()
        return _run_here(args)
    from kdlabctl import bridge, caller, hosts

    host = hosts.resolve(spec)
    if getattr(args, "share", None):
        raise UsageError(f"--share: {no_shares_across(host.hostname)}")
    try:
        with hosts.connected(host, args.bus, hosts.SESSION_SECONDS) as session:
            args.bus = session.bus
            with caller.on_host(session.remote):
                code = _run_here(args)
            if code != EXIT_OK and session.lost:  # why the command failed
                print(f"kdlabctl: {session.lost}", file=sys.stderr)
                return EXIT_UNAVAILABLE
            return code
    except bridge.Unreachable as err:
        print(f"kdlabctl: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _host_spec(args: argparse.Namespace) -> str:
    """The host the command goes to ("": this machine): --host, else
    $KDLAB_HOST, for a command that talks to kdlabd. One that does not (kernel,
    completion, hosts, list --all-hosts) ignores $KDLAB_HOST, and an --host
    given to it is a usage error."""
    given = args.host is not None
    spec = str(args.host if given else os.environ.get("KDLAB_HOST", ""))
    if getattr(args, "all_hosts", False):
        if given and spec:
            raise UsageError("--all-hosts and --host exclude each other")
        return ""
    if getattr(args, "needs_daemon", True) or getattr(args, "on_host", False):
        return spec
    if given and spec:
        why = getattr(args, "without_host", "runs on this machine")
        raise UsageError(f"--host does not apply to kdlabctl {args.command}: it {why}")
    return ""


def _run_here(args: argparse.Namespace) -> int:
    """Run the command on the bus *args* names (a host's through its bridge)."""
    if not getattr(args, "needs_daemon", True):
        import asyncio  # no bus: neither dbus-next nor the client

        return int(asyncio.run(args.func(None, args)))
    from kdlabctl.client import Client, RemoteError, settle

    try:
        if getattr(args, "plain", False):  # only calls: no dbus-next, no asyncio
            client = Client.plain(args.bus)
            try:
                return int(settle(args.func(client, args)))
            finally:
                client.disconnect()
        from kdlabctl.asyncbus import run

        async def invoke() -> int:
            client = await Client.connect(args.bus)
            try:
                return int(await args.func(client, args))
            finally:
                client.disconnect()

        return run(invoke())
    except RemoteError as err:
        from kdlabctl import caller

        print(f"kdlabctl: {err}", file=sys.stderr)
        code = exit_code_for(err.name)
        if code == EXIT_UNAVAILABLE and "NoServer" not in err.name:
            remote = caller.remote()
            where = f" on {remote.hostname}" if remote else ""
            print(
                f"kdlabctl: is kdlabd running{where}? (see README: Running kdlabd)",
                file=sys.stderr,
            )
        return code
