"""``org.kdlab.Kdlab1.VM``: one object per VM, with its lifecycle and properties."""

# No "from __future__ import annotations": see kdlabd/bus/manager.py.

from typing import Any

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property

from kdlab.errors import InvalidArgument
from kdlab.kernel.diagnosis import public_fix, summary
from kdlab.wire import (
    EXEC_OPTIONS,
    NO_DUMP_PATH,
    NO_RECORDING_PATH,
    RECORD_OPTIONS,
    RECORDING_PATH_PREFIX,
    REPLAY_OPTIONS,
    RESTORE_CHECKPOINT_OPTIONS,
    SAVE_CHECKPOINT_OPTIONS,
    START_OPTIONS,
    STOP_OPTIONS,
    TAKE_DUMP_OPTIONS,
    VM_INTERFACE,
    dump_path,
    job_path,
    process_path,
    recording_path,
    unescape_path_label,
)
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.options import take
from kdlabd.bus.properties import announce_changes
from kdlabd.core.checkpoints import CheckpointService
from kdlabd.core.dumps import DumpService
from kdlabd.core.execs import DEFAULT_COLS, DEFAULT_ROWS, ExecRequest, ExecService
from kdlabd.core.models import VMRecord
from kdlabd.core.recordings import RecordingService
from kdlabd.core.vms import DEFAULT_STOP_TIMEOUT, VMService


def _diagnosis(record: VMRecord) -> list[str]:
    """``(code, severity, cause, fix)`` as anyone may read them (no text quoted
    from the console); four empty strings when all is well."""
    found = record.diagnosis
    if found is None:
        return ["", "", "", ""]
    return [
        found.code.value,
        found.severity.value,
        summary(found),
        public_fix(found, record.name),
    ]


def properties(record: VMRecord, latest_dump: str = NO_DUMP_PATH) -> dict[str, Any]:
    """The D-Bus property values of *record*, by property name."""
    spec = record.spec
    if not spec.debug.gdb:
        gdb = "off"
    elif spec.debug.gdb_tcp_port is not None:
        gdb = f"tcp:127.0.0.1:{spec.debug.gdb_tcp_port}"
    else:
        gdb = "unix"
    return {
        "Name": spec.name,
        "UUID": record.uuid,
        "State": record.state.value,
        "Owner": spec.owner_uid,
        "Cmdline": spec.effective_cmdline,
        "MemoryMiB": spec.memory_mib,
        "VCPUs": spec.vcpus,
        "Accel": spec.accel.value,
        "Created": spec.created_usec,
        "GdbStub": gdb,
        "WaitingForDebugger": record.waiting_for_debugger,
        "Diagnosis": _diagnosis(record),
        "KernelRelease": spec.release,
        "Vmlinux": spec.vmlinux,
        "KernelPath": spec.kernel_path,
        "Tree": spec.tree,
        "Booted": record.boot.started_usec,
        "LastStop": record.last_stop.value,
        "OnPanic": spec.on_panic,
        "Initramfs": spec.initramfs,
        "LatestDump": latest_dump,
        "Run": "" if record.boot.run is None else record.boot.run.mode,
        "RunRecording": NO_RECORDING_PATH
        if record.boot.run is None
        else recording_path(record.boot.run.recording),
        "Shares": {share.tag: share.directory for share in spec.shares},
        "Checkpoints": [
            [
                c.tag,
                c.created_usec,
                c.memory_bytes,
                c.boot,
                dict(c.fingerprint).get("kernel", ""),
            ]
            for c in record.checkpoints
        ],
    }


class VMInterface(ServiceInterface):
    """A kdlab VM. Every property change is announced with PropertiesChanged."""

    def __init__(
        self,
        record: VMRecord,
        vms: VMService,
        authorizer: Authorizer,
        *,
        dumps: DumpService | None = None,
        checkpoints: CheckpointService | None = None,
        recordings: RecordingService | None = None,
        execs: ExecService | None = None,
    ) -> None:
        super().__init__(VM_INTERFACE)
        self._record = record
        self.vms = vms
        self.dumps = dumps
        self.authorizer = authorizer
        self.checkpoints = checkpoints
        self.recordings = recordings
        self.execs = execs
        self._props = properties(record, self._latest_dump(record))

    def _latest_dump(self, record: VMRecord) -> str:
        latest = None if self.dumps is None else self.dumps.latest(record)
        return NO_DUMP_PATH if latest is None else dump_path(latest.id)

    def resource_owner(self) -> int | None:
        return self._record.spec.owner_uid

    def update(self, record: VMRecord) -> None:
        """Take the VM's new state and announce the properties that changed."""
        self._record = record
        self._props = announce_changes(
            self, self._props, properties(record, self._latest_dump(record))
        )

    def dumps_changed(self) -> None:
        """A dump came or went: LatestDump may have changed."""
        self.update(self._record)

    @exported(Action.MANAGE_VMS)
    async def Start(self, caller: Caller, options: "a{sv}") -> None:
        """Boot the VM. ``paused`` (b): the CPUs wait for a debugger."""
        opts = take(options, START_OPTIONS)
        tag = opts.get("checkpoint", "")
        await self.vms.start(
            self._record.name,
            paused=opts.get("paused", False),
            kernel_fd=opts.get("kernel"),
            initrd_fd=opts.get("initrd"),
            checkpoint=tag,
            check=self._checkpoints().starter(tag) if tag else None,
        )

    @exported(Action.MANAGE_VMS)
    async def Stop(self, caller: Caller, options: "a{sv}") -> None:
        """Power off: ACPI, forced after ``timeout`` (u, s); ``force`` (b): at once."""
        opts = take(options, STOP_OPTIONS)
        await self.vms.stop(
            self._record.name,
            force=opts.get("force", False),
            timeout=float(opts.get("timeout", DEFAULT_STOP_TIMEOUT)),
        )

    @exported(Action.MANAGE_VMS)
    async def Delete(self, caller: Caller) -> None:
        """Remove the stopped VM, its staged kernel and initrd, and its logs."""
        await self.vms.delete(self._record.name)

    @exported(Action.MANAGE_VMS)
    async def SaveCheckpoint(self, caller: Caller, tag: "s", options: "a{sv}") -> "o":
        """Save the running or paused VM's whole state as @tag, as a job."""
        take(options, SAVE_CHECKPOINT_OPTIONS)
        job = await self._checkpoints().save(self._record.name, tag, caller.uid)
        return job_path(job.id)

    @exported(Action.MANAGE_VMS)
    async def RestoreCheckpoint(
        self, caller: Caller, tag: "s", options: "a{sv}"
    ) -> "o":
        """Return the running or paused VM to checkpoint @tag, as a job."""
        opts = take(options, RESTORE_CHECKPOINT_OPTIONS)
        job = await self._checkpoints().restore(
            self._record.name, tag, caller.uid, paused=opts.get("paused", False)
        )
        return job_path(job.id)

    @exported(Action.MANAGE_VMS)
    async def DeleteCheckpoint(self, caller: Caller, tag: "s") -> None:
        """Delete the VM's checkpoint @tag."""
        await self._checkpoints().delete(self._record.name, tag)

    def _checkpoints(self) -> CheckpointService:
        assert self.checkpoints is not None, "exported without a CheckpointService"
        return self.checkpoints

    @exported(Action.MANAGE_VMS)
    async def ServeShares(self, caller: Caller) -> "a{sh}":
        """Listening sockets for the VM's shares, by tag, for its owner to serve."""
        return await self.vms.serve_shares(self._record.name, caller.uid)

    @exported(Action.DEBUG_VMS)
    async def OpenGdb(self, caller: Caller) -> "h":
        """A stream connected to the VM's gdbstub (gdb remote protocol)."""
        return await self.vms.open_gdb(self._record.name)

    @exported(Action.DEBUG_VMS)
    async def OpenConsole(self, caller: Caller) -> "h":
        """A stream on the serial console, shared with other viewers."""
        return await self.vms.open_console(self._record.name, caller.uid)

    @exported(Action.DEBUG_VMS)
    async def TakeDump(self, caller: Caller, options: "a{sv}") -> "oo":
        """Write a memory dump of the running or paused VM, as a job."""
        opts = take(options, TAKE_DUMP_OPTIONS)
        if self.dumps is None:
            raise InvalidArgument("this kdlabd keeps no dumps")
        dump, job = await self.dumps.take(
            self.vms.get(self._record.name), compress=opts.get("compress", False)
        )
        return [dump_path(dump.id), job_path(job.id)]

    @exported(Action.MANAGE_VMS)
    async def Record(self, caller: Caller, options: "a{sv}") -> "o":
        """Start the stopped VM recording; the recording ends when it stops."""
        opts = take(options, RECORD_OPTIONS)
        recording = await self._recordings().record(
            self._record.name,
            recording=opts.get("name", ""),
            paused=opts.get("paused", False),
            single_cpu=opts.get("single_cpu", False),
        )
        return recording_path(recording.id)

    @exported(Action.DEBUG_VMS)
    async def Replay(self, caller: Caller, recording: "o", options: "a{sv}") -> "o":
        """Start the stopped VM replaying @recording, paused for gdb."""
        opts = take(options, REPLAY_OPTIONS)
        prefix = RECORDING_PATH_PREFIX + "/"
        if not recording.startswith(prefix) or recording == prefix:
            raise InvalidArgument(f"{recording!r} is not a recording's object path")
        found = await self._recordings().replay(
            self._record.name,
            unescape_path_label(recording.removeprefix(prefix)),
            snapshot_interval=opts.get("snapshot_interval", 1.0),
        )
        return recording_path(found.id)

    def _recordings(self) -> RecordingService:
        if self.recordings is None:
            raise InvalidArgument("this kdlabd keeps no recordings")
        return self.recordings

    @exported(Action.DEBUG_VMS)
    async def Exec(self, caller: Caller, argv: "as", options: "a{sv}") -> "hho":
        """Run @argv in the guest: pipes of its output, and its object."""
        opts = take(options, EXEC_OPTIONS)
        if self.execs is None:
            raise InvalidArgument("this kdlabd runs no commands in guests")
        request = ExecRequest(
            argv=tuple(argv),
            stdin_fd=opts.get("stdin"),
            env=tuple(opts.get("env", ())),
            cwd=opts.get("cwd", ""),
            tty=opts.get("tty", False),
            rows=opts.get("rows", DEFAULT_ROWS),
            cols=opts.get("cols", DEFAULT_COLS),
            timeout=opts.get("timeout", 0.0),
        )
        stdout, stderr, process = await self.execs.exec(
            self._record.name, caller.uid, request
        )
        return [stdout, stderr, process_path(process.id)]

    @exported(Action.DEBUG_VMS)
    async def GetDiagnosis(self, caller: Caller) -> "(ssssas)":
        """The Diagnosis property in full, for those who may read the VM's log:
        the cause and fix as found, quoting the console, and the log lines they
        are based on. Empty strings and no lines when nothing was found."""
        found = self.vms.get(self._record.name).diagnosis
        if found is None:
            return ["", "", "", "", []]
        return [
            found.code.value,
            found.severity.value,
            found.problem,
            found.fix,
            list(found.evidence),
        ]

    @exported(Action.DEBUG_VMS)
    async def OpenConsoleLog(self, caller: Caller) -> "h":
        """A read-only descriptor of the console log of the current or last boot."""
        return await self.vms.open_console_log(self._record.name)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self._props["Name"]

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> "s":
        return self._props["UUID"]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        """defined, starting, running, paused, stopping, stopped or crashed."""
        return self._props["State"]

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        """The uid that created the VM."""
        return self._props["Owner"]

    @dbus_property(access=PropertyAccess.READ)
    def Cmdline(self) -> "s":
        """The command line the VM boots with: the user's plus kdlab's additions."""
        return self._props["Cmdline"]

    @dbus_property(access=PropertyAccess.READ)
    def MemoryMiB(self) -> "u":
        return self._props["MemoryMiB"]

    @dbus_property(access=PropertyAccess.READ)
    def VCPUs(self) -> "u":
        return self._props["VCPUs"]

    @dbus_property(access=PropertyAccess.READ)
    def Accel(self) -> "s":
        """``kvm`` or ``tcg``."""
        return self._props["Accel"]

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> "t":
        """Creation time, microseconds since the epoch."""
        return self._props["Created"]

    @dbus_property(access=PropertyAccess.READ)
    def GdbStub(self) -> "s":
        """``unix`` (brokered by kdlabd), ``tcp:127.0.0.1:PORT`` or ``off``."""
        return self._props["GdbStub"]

    @dbus_property(access=PropertyAccess.READ)
    def WaitingForDebugger(self) -> "b":
        """True while a VM started paused has not run yet: attach gdb, then continue."""
        return self._props["WaitingForDebugger"]

    @dbus_property(access=PropertyAccess.READ)
    def KernelRelease(self) -> "s":
        """The release the kernel image announces (``uname -r``), or ""."""
        return self._props["KernelRelease"]

    @dbus_property(access=PropertyAccess.READ)
    def Vmlinux(self) -> "s":
        """The vmlinux path given at creation: a hint for gdb, never opened."""
        return self._props["Vmlinux"]

    @dbus_property(access=PropertyAccess.READ)
    def KernelPath(self) -> "s":
        """The client's path of the kernel at creation (where to look for vmlinux)."""
        return self._props["KernelPath"]

    @dbus_property(access=PropertyAccess.READ)
    def Tree(self) -> "s":
        """The kernel source tree given at creation; kdlabctl start boots its build."""
        return self._props["Tree"]

    @dbus_property(access=PropertyAccess.READ)
    def Booted(self) -> "t":
        """When kdlabd started the current or last boot (µs since the epoch): the
        boot's identity, kept across kdlabd restarts; 0 when it started none."""
        return self._props["Booted"]

    @dbus_property(access=PropertyAccess.READ)
    def LastStop(self) -> "s":
        """How the last boot ended: ``requested`` (a Stop call), ``guest``,
        ``crashed``, ``killed``, ``unknown``; "" while the VM runs."""
        return self._props["LastStop"]

    @dbus_property(access=PropertyAccess.READ)
    def Checkpoints(self) -> "a(sttts)":
        """The VM's checkpoints, oldest first: tag, creation time (microseconds
        since the epoch), memory size in bytes, the boot it was taken in (its
        Booted), and
        the SHA-256 of the kernel it was taken with."""
        return self._props["Checkpoints"]

    @dbus_property(access=PropertyAccess.READ)
    def Shares(self) -> "a{ss}":
        """The directories of the owner's the guest may mount, by tag (never
        opened by kdlabd: the owner serves them, see ServeShares)."""
        return self._props["Shares"]

    @dbus_property(access=PropertyAccess.READ)
    def Diagnosis(self) -> "(ssss)":
        """What kdlabd found wrong with the current or last boot: a stable code
        (e.g. ``root-device-missing``), ``error``/``warning``/``note``, a one-line
        cause and the fix. Empty strings when nothing was found."""
        return self._props["Diagnosis"]

    @dbus_property(access=PropertyAccess.READ)
    def Initramfs(self) -> "s":
        """kdlab's initramfs the VM boots: root, userspace, or ""."""
        return self._props["Initramfs"]

    @dbus_property(access=PropertyAccess.READ)
    def OnPanic(self) -> "s":
        """dump-and-stop, dump-and-keep or ignore."""
        return self._props["OnPanic"]

    @dbus_property(access=PropertyAccess.READ)
    def Run(self) -> "s":
        """ "record", "replay", or "" for a plain boot."""
        return self._props["Run"]

    @dbus_property(access=PropertyAccess.READ)
    def RunRecording(self) -> "o":
        """The recording being recorded or replayed; "/" when none."""
        return self._props["RunRecording"]

    @dbus_property(access=PropertyAccess.READ)
    def LatestDump(self) -> "o":
        """The VM's newest dump, "/" when it has none."""
        return self._props["LatestDump"]
