"""``kdlabctl record``, ``replay`` and ``recording ...``: record a run once,
replay it under gdb as often as needed, backwards included.

kdlabd records a VM's run with QEMU's record/replay (TCG, icount) into its
recordings pool and keeps each recording as an object; a replay runs the same
instructions again, paused before the first one for gdb, whose
``reverse-stepi``, ``reverse-next`` and ``reverse-continue`` go back through
the snapshots kdlabd takes every ``--snapshot-interval`` seconds of replay.
"""

from __future__ import annotations

import argparse

from kdlab.errors import EXIT_OK
from kdlab.wire import unescape_path_label
from kdlabctl.names import RECORDING_ID, VM_NAME

TYPE_CHECKING = False  # mypy takes this as True
if TYPE_CHECKING:
    from kdlabctl.client import Client, Recording

REVERSE_COMMANDS = "reverse-stepi, reverse-next and reverse-continue"


def recording_id(path: str) -> str:
    """The id of the recording at object path *path*."""
    return unescape_path_label(path.rpartition("/")[2])


def count(n: int) -> str:
    """``1480000000`` -> ``1.48G``: a count of instructions, in powers of 1000,
    to three significant digits."""
    value, shown = float(n), str(n)
    for unit in ("K", "M", "G", "T"):
        if value < 999.5:  # rounds to three digits in this unit
            return shown
        value /= 1000
        shown = f"{value:.3g}{unit}" if value < 999.5 else f"{value:.0f}{unit}"
    return shown


def ended(recording: Recording) -> str:
    """How the recorded run ended, ``-`` while it runs."""
    how = recording.ended or "-"
    return f"{how} (truncated)" if recording.truncated else how


def row(recording: Recording) -> list[str]:
    """A line of ``recording list``."""
    from kdlabctl import output
    from kdlabctl.images import human

    return [
        recording.id,
        recording.vm,
        recording.state,
        ended(recording),
        count(recording.instructions),
        f"{recording.seconds:.1f}",
        human(recording.size),
        output.timestamp(recording.created),
    ]


HEADERS = ["ID", "VM", "STATE", "ENDED", "INSTRUCTIONS", "SECONDS", "SIZE", "CREATED"]


def details(recording: Recording) -> list[tuple[str, str]]:
    """What ``recording show`` prints: labels and values."""
    from kdlabctl import output
    from kdlabctl.images import human

    owner = recording.owner
    return [
        ("Id", recording.id),
        ("VM", f"{recording.vm} ({recording.vmuuid})"),
        ("Owner", f"{output.user_name(owner)} ({owner})"),
        ("State", recording.state),
        ("Ended", ended(recording)),
        ("Kernel", recording.kernel_release or "?"),
        ("Cmdline", recording.cmdline),
        ("QEMU", recording.qemu or "?"),
        ("Instructions", f"{count(recording.instructions)} ({recording.instructions})"),
        ("Seconds", f"{recording.seconds:.1f}"),
        ("Size", human(recording.size)),
        ("Created", output.timestamp(recording.created)),
    ]


# kdlabctl record and replay


def record_hint(name: str, rec: str, *, paused: bool) -> str:
    """What ``record`` tells once the recording began."""
    waits = (
        f"; {name} waits for the debugger: 'continue' in gdb (kdlabctl gdb {name}) "
        "starts it"
        if paused
        else ""
    )
    return (
        f"recording {rec} of {name}: it ends when the VM stops (kdlabctl stop "
        f"{name}, or a panic); then kdlabctl replay {name} {rec}{waits}"
    )


def replay_hint(name: str, rec: str) -> str:
    """What ``replay`` tells once the replay began."""
    return (
        f"{name} replays {rec}, paused before its first instruction: kdlabctl "
        f"gdb {name} attaches ('continue' runs the replay; {REVERSE_COMMANDS} "
        "go back)"
    )


async def cmd_record(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl.cli import gdb, say

    path = await client.record(
        args.name,
        recording_name=args.recording or "",
        paused=args.paused,
        single_cpu=args.single_cpu,
    )
    rec = recording_id(path)
    print(rec)
    if not args.quiet:
        say(record_hint(args.name, rec, paused=args.paused and not args.attach))
    if args.attach:
        return await gdb(client, args.name, args.vmlinux, args.gdb_args)
    return EXIT_OK


async def cmd_replay(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl.cli import gdb, say

    await client.replay(
        args.name, args.recording, snapshot_interval=args.snapshot_interval
    )
    if args.attach:
        return await gdb(client, args.name, args.vmlinux, args.gdb_args)
    if not args.quiet:
        say(replay_hint(args.name, args.recording))
    return EXIT_OK


# kdlabctl recording ...


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output

    recordings = [
        r for r in await client.list_recordings() if not args.name or r.vm == args.name
    ]
    output.listing(recordings, json_output=args.json, headers=HEADERS, row=row)
    return EXIT_OK


async def cmd_show(client: Client, args: argparse.Namespace) -> int:
    from kdlabctl import output

    recording = await client.recording(args.recording)
    if args.json:
        output.print_json(output.as_json(recording))
        return EXIT_OK
    output.print_fields(details(recording))
    return EXIT_OK


async def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    for rec in args.recordings:
        await client.delete_recording(rec)
    return EXIT_OK


def define(recording: argparse.ArgumentParser) -> None:
    """The subcommands of ``kdlabctl recording`` (*recording*, the group's parser)."""
    from kdlabctl.images import verbs_of

    recording.description = (
        "recordings of VMs' runs (kdlabctl record), to replay under gdb "
        "(kdlabctl replay)"
    )
    verb = verbs_of(recording, "recording_command")

    listing = verb("list", cmd_list, "list recordings (of VM NAME)", plain=True)
    listing.add_argument("name", metavar="NAME", nargs="?", type=VM_NAME)
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    show = verb("show", cmd_show, "show one recording's properties", plain=True)
    show.add_argument("recording", metavar="REC", type=RECORDING_ID)
    show.add_argument("--json", action="store_true", help="machine-readable output")

    delete = verb("delete", cmd_delete, "delete recordings", plain=True)
    delete.add_argument("recordings", metavar="REC", nargs="+", type=RECORDING_ID)
