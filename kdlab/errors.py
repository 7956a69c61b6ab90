"""kdlab's errors: one class per reason, each with its D-Bus name and exit code.

Stdlib-only: kdlabctl maps D-Bus error names to exit codes with
:data:`EXIT_CODES` and never parses message text. Every kdlabctl command,
``--help`` too, imports this module before anything else: it imports nothing
heavier than :mod:`kdlab.wire` (dataclasses' import alone would cost
``kdlabctl --help`` a third of its time).
"""

from __future__ import annotations

from kdlab.wire import ERROR_PREFIX


class KdlabError(Exception):
    """Base of every error kdlab reports to a caller.

    The message is shown to the user as is: it says what went wrong and what
    to do about it.
    """

    reason = "Failed"
    exit_code = 1

    @classmethod
    def dbus_name(cls) -> str:
        return ERROR_PREFIX + cls.reason


class InvalidArgument(KdlabError):
    """A name, option or file was rejected before anything was changed."""

    reason = "InvalidArgument"
    exit_code = 2


class InvalidState(KdlabError):
    """The VM is not in a state that allows the operation (e.g. start while running)."""

    reason = "InvalidState"
    exit_code = 3


class NoSuchVM(KdlabError):
    """No VM has that name."""

    reason = "NoSuchVM"
    exit_code = 4


class VMExists(KdlabError):
    """A VM (or a foreign libvirt domain) already uses that name."""

    reason = "VMExists"
    exit_code = 5


class NoSuchImage(KdlabError):
    """No image has that name."""

    reason = "NoSuchImage"
    exit_code = 4


class ImageExists(KdlabError):
    """An image with that name already exists."""

    reason = "ImageExists"
    exit_code = 5


class NoSuchJob(KdlabError):
    """No job has that id (finished jobs disappear after a few minutes)."""

    reason = "NoSuchJob"
    exit_code = 4


class NoSuchDump(KdlabError):
    """No dump has that id."""

    reason = "NoSuchDump"
    exit_code = 4


class BuildFailed(KdlabError):
    """A tool of an image build failed; the message ends with its last output."""

    reason = "BuildFailed"
    exit_code = 8


class LimitExceeded(KdlabError):
    """The request is over one of kdlabd's configured limits (sizes, counts).

    The message names the limit, its value and its configuration key.
    """

    reason = "LimitExceeded"
    exit_code = 9


class NotAuthorized(KdlabError):
    """The caller may not do this."""

    reason = "NotAuthorized"
    exit_code = 6


class HypervisorError(KdlabError):
    """libvirt or QEMU failed; the message carries libvirt's own words."""

    reason = "HypervisorError"
    exit_code = 7


class NoSuchCheckpoint(KdlabError):
    """The VM has no checkpoint with that tag."""

    reason = "NoSuchCheckpoint"
    exit_code = 4


class CheckpointMismatch(KdlabError):
    """The VM's kernel, command line or devices changed since the checkpoint.

    The message names what changed.
    """

    reason = "CheckpointMismatch"
    exit_code = 10


class UnsupportedDisk(KdlabError):
    """A disk of the VM cannot hold a checkpoint (it is not qcow2)."""

    reason = "UnsupportedDisk"
    exit_code = 11


class NoSuchRecording(KdlabError):
    """No recording has that id, or it is another VM's."""

    reason = "NoSuchRecording"
    exit_code = 4


class RecordingMismatch(KdlabError):
    """The VM or the QEMU build changed since the recording; the message says what."""

    reason = "RecordingMismatch"
    exit_code = 10


class NotRecordable(KdlabError):
    """QEMU cannot record the VM as it is (KVM, several vCPUs)."""

    reason = "NotRecordable"
    exit_code = 12


class NoAgent(KdlabError):
    """No kdlab agent answers in the VM's guest: it cannot run commands."""

    reason = "NoAgent"
    exit_code = 13


class ExecFailed(KdlabError):
    """The guest could not run a command (not found, not executable)."""

    reason = "ExecFailed"
    exit_code = 14


class Internal(KdlabError):
    """A bug in kdlabd. Details are in the daemon's log, never on the wire."""

    reason = "Internal"
    exit_code = 1


ERRORS: tuple[type[KdlabError], ...] = (
    InvalidArgument,
    InvalidState,
    NoSuchVM,
    VMExists,
    NoSuchImage,
    ImageExists,
    NoSuchJob,
    NoSuchDump,
    BuildFailed,
    LimitExceeded,
    NotAuthorized,
    HypervisorError,
    NoSuchCheckpoint,
    CheckpointMismatch,
    UnsupportedDisk,
    NoSuchRecording,
    RecordingMismatch,
    NotRecordable,
    NoAgent,
    ExecFailed,
    Internal,
)


def out_of_descriptors(detail: str) -> LimitExceeded:
    """kdlabd's descriptor table (LimitNOFILE= of its unit) or the host's is full."""
    return LimitExceeded(
        f"kdlabd has run out of file descriptors ({detail}): close console or "
        "gdb sessions, or raise LimitNOFILE= of kdlabd.service, then try again"
    )


# Exit codes kdlabctl uses for conditions that are not a kdlabd error.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# sysexits EX_UNAVAILABLE: kdlabd or the bus is not reachable, or a program
# kdlabctl runs (cockpit-ws for kdlabctl web) is not installed.
EXIT_UNAVAILABLE = 69
# kdlabctl exec exits with the command's status (128 + N when signal N ended
# it, as shells report it); these two are its own, as timeout(1) and ssh(1)
# use them: the command ran past --timeout and was killed, or the VM stopped
# (or its agent went away) before the command ended.
EXIT_TIMEOUT = 124
EXIT_LOST = 255

EXIT_CODES: dict[str, int] = {cls.dbus_name(): cls.exit_code for cls in ERRORS}


class ExitCode:
    """One exit code of kdlabctl: what it means, and the errors that give it."""

    __slots__ = ("code", "meaning")

    def __init__(self, code: int, meaning: str) -> None:
        self.code = code
        self.meaning = meaning

    @property
    def errors(self) -> tuple[type[KdlabError], ...]:
        return tuple(cls for cls in ERRORS if cls.exit_code == self.code)


# The one table of kdlabctl's exit codes: its --help shows it, and a unit test
# keeps the README's table equal to it (tests/unit/test_errors.py).
EXIT_TABLE: tuple[ExitCode, ...] = (
    ExitCode(EXIT_OK, "success"),
    ExitCode(EXIT_FAILURE, "an unclassified failure, or a bug in kdlabd"),
    ExitCode(InvalidArgument.exit_code, "invalid argument or usage"),
    ExitCode(InvalidState.exit_code, "the VM is in the wrong state for the operation"),
    ExitCode(
        NoSuchVM.exit_code, "no such VM, image, dump, job, checkpoint or recording"
    ),
    ExitCode(VMExists.exit_code, "the VM or image already exists"),
    ExitCode(NotAuthorized.exit_code, "not authorized"),
    ExitCode(HypervisorError.exit_code, "libvirt or QEMU failed"),
    ExitCode(BuildFailed.exit_code, "an image build failed"),
    ExitCode(LimitExceeded.exit_code, "over one of kdlabd's configured limits"),
    ExitCode(
        CheckpointMismatch.exit_code,
        "the VM changed since the checkpoint or recording",
    ),
    ExitCode(UnsupportedDisk.exit_code, "a disk of the VM cannot hold a checkpoint"),
    ExitCode(NotRecordable.exit_code, "QEMU cannot record the VM as it is"),
    ExitCode(NoAgent.exit_code, "no kdlab agent answers in the VM's guest"),
    ExitCode(ExecFailed.exit_code, "exec: the guest could not run the command"),
    ExitCode(
        EXIT_UNAVAILABLE,
        "kdlabd or the bus is not reachable, or a program kdlabctl runs "
        "is not installed",
    ),
    ExitCode(EXIT_TIMEOUT, "exec: the command ran past --timeout and was killed"),
    ExitCode(EXIT_LOST, "exec: the VM stopped before the command ended"),
)


def exit_code_for(dbus_error_name: str) -> int:
    """Exit code of kdlabctl for an error reply named *dbus_error_name*."""
    if dbus_error_name in EXIT_CODES:
        return EXIT_CODES[dbus_error_name]
    if dbus_error_name in (
        "org.freedesktop.DBus.Error.NoServer",
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.Disconnected",  # the bus, or a host's ssh, left
    ):
        return EXIT_UNAVAILABLE
    if dbus_error_name == "org.freedesktop.DBus.Error.AccessDenied":
        return NotAuthorized.exit_code
    return EXIT_FAILURE
