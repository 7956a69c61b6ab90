"""The libvirt implementation of :class:`kdlabd.core.hypervisor.Hypervisor`.

Blocking libvirt calls run in worker threads; events arrive on the asyncio
loop through libvirt's own asyncio event implementation (``libvirtaio``),
which :func:`register_event_loop` installs before any connection is opened.
A lost connection (libvirtd restart) is re-opened in the background as soon
as libvirtd answers again, and the caller is told, so it can rebuild its
view; meanwhile calls that need libvirt wait for it (up to a bound) instead
of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
import libvirtaio
import structlog
from lxml import etree

from kdlab.errors import (
    HypervisorError,
    InvalidArgument,
    InvalidState,
    KdlabError,
    NoSuchCheckpoint,
    NoSuchVM,
    UnsupportedDisk,
    VMExists,
    out_of_descriptors,
)
from kdlab.states import StopCause, VMState
from kdlabd.core import blocking
from kdlabd.core.hypervisor import (
    ConsoleOutput,
    ConsoleSent,
    ConsoleStream,
    DomainChanged,
    DumpProgress,
    Reconnected,
    UploadProgress,
)
from kdlabd.core.limits import HostResources
from kdlabd.core.models import (
    Accel,
    BootMark,
    Checkpoint,
    Disk,
    ImageFormat,
    ImageRecord,
    ImageSource,
    RunFiles,
    RunStart,
    StoredImage,
    VMRecord,
    VMSpec,
    stop_cause,
)
from kdlabd.host import facts
from kdlabd.virt import snapshots, storage
from kdlabd.virt.domain_xml import (
    BOOT_NS,
    BOOT_PREFIX,
    DOMAIN_PREFIX,
    NotKdlabDomain,
    boot_mark_xml,
    build_domain_xml,
    disk_xml,
    domain_name,
    parse_boot_mark,
    parse_domain_xml,
)

log = structlog.get_logger(__name__)

_MIB = 1 << 20
T = TypeVar("T")

# A local libvirtd is polled at a short interval: a failed attempt costs a
# connect() to its socket, and a restarted libvirtd is found within this.
_LOCAL_RECONNECT_INTERVAL = 0.25
# A remote one (qemu+ssh://) backs off: each attempt may start an ssh.
_REMOTE_RECONNECT_DELAYS = (0.25, 0.5, 1.0, 2.0, 5.0)
# Failed attempts are logged once, then every so many.
_RECONNECT_LOG_EVERY = 40
DEFAULT_RECONNECT_WAIT = 15.0
"""Seconds a call that needs libvirt waits for a lost connection to return."""
# How long shutdown waits for libvirt's pending event callbacks.
_DRAIN_SECONDS = 2.0
# Closing a connection is a call to libvirtd; one that does not answer is left
# to its keepalive (kdlabd's 5 s x 3, libvirtd's own) rather than waited for.
_CLOSE_SECONDS = 3.0
# Opening a console: a connection of its own, the domain, the stream.
_CONSOLE_OPEN_SECONDS = 15.0
_KEEPALIVE = (5, 3)
# A dump's progress is read this often while libvirt writes it.
_DUMP_POLL_SECONDS = 0.5
PANIC_NS = "https://kdlab.org/xmlns/panic/1"
"""Live metadata of a running domain whose panic kdlabd has handled."""


def dump_seconds(memory_mib: int, compressed: bool) -> float:
    """The time limit of a dump of *memory_mib*: generous (TCG, a busy host,
    zlib at a few tens of MiB/s), so only a stuck libvirt or QEMU hits it."""
    return 120.0 + memory_mib * (0.5 if compressed else 0.1)


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: VMState.STOPPED,
    libvirt.VIR_DOMAIN_RUNNING: VMState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VMState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VMState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VMState.STOPPING,
    libvirt.VIR_DOMAIN_SHUTOFF: VMState.STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: VMState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VMState.PAUSED,
}


def register_event_loop() -> None:
    """Dispatch libvirt events on the running loop. Call once, before connecting.

    Also stops libvirt-python from printing every error to stderr: kdlabd
    reports errors itself, translated, in its own log.
    """
    libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def panicked(state: int, reason: int) -> bool:
    """Whether libvirt keeps the domain after a guest panic (on_crash preserve):
    QEMU runs, the CPUs are stopped."""
    return bool(
        state == libvirt.VIR_DOMAIN_CRASHED
        and reason == libvirt.VIR_DOMAIN_CRASHED_PANICKED
    )


def vm_state(state: int, reason: int) -> VMState:
    """kdlab's state for libvirt's (state, reason) pair."""
    if panicked(state, reason):
        return VMState.PAUSED  # QEMU is alive: gdb can attach, Stop kills it
    if (
        state == libvirt.VIR_DOMAIN_SHUTOFF
        and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
    ):
        return VMState.CRASHED
    return _STATES.get(state, VMState.STOPPED)


# How a domain went off, by libvirt's shut-off reason: libvirt cannot tell
# kdlabd's own shutdown or destroy from anyone else's (the boot mark can).
_STOP_CAUSES = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: StopCause.GUEST,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: StopCause.KILLED,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: StopCause.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: StopCause.CRASHED,
}


def hypervisor_stop_cause(state: int, reason: int) -> StopCause:
    """What libvirt's (state, reason) pair tells of how a domain went off."""
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return StopCause.CRASHED
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return _STOP_CAUSES.get(reason, StopCause.UNKNOWN)
    return StopCause.NONE


def _translate(err: libvirt.libvirtError) -> KdlabError:
    code = err.get_error_code()
    message = err.get_error_message() or str(err)
    if os.strerror(errno.EMFILE) in message or os.strerror(errno.ENFILE) in message:
        return out_of_descriptors(f"libvirt: {message}")
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return NoSuchVM(f"libvirt has no such domain: {message}")
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return InvalidState(message)
    return HypervisorError(f"libvirt: {message}")


class LibvirtHypervisor:
    """kdlab's VMs as persistent libvirt domains named ``kdlab-NAME``."""

    def __init__(
        self,
        uri: str,
        *,
        vm_pool: str,
        vm_pool_dir: Path,
        image_pool: str,
        image_pool_dir: Path,
        gdb_dir: Path,
        dump_pool: str = "kdlab-dumps",
        dump_pool_dir: Path | None = None,
        recording_pool: str = "kdlab-recordings",
        recording_pool_dir: Path | None = None,
        qemu_user: str,
        reconnect_wait: float = DEFAULT_RECONNECT_WAIT,
    ) -> None:
        self._uri = uri
        self._vm_pool_name = vm_pool
        self._vm_pool_dir = vm_pool_dir
        self._image_pool_name = image_pool
        self._image_pool_dir = image_pool_dir
        self._dump_pool_name = dump_pool
        self._dump_pool_dir = dump_pool_dir or image_pool_dir.parent / "dumps"
        self._recording_pool_name = recording_pool
        self._recording_pool_dir = (
            recording_pool_dir or image_pool_dir.parent / "recordings"
        )
        self._gdb_dir = gdb_dir
        self._qemu_user = facts.QemuUser.lookup(qemu_user)
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._on_domain_changed: DomainChanged = lambda _name: None
        self._on_reconnected: Reconnected = lambda: None
        self._reconnecting: asyncio.Task[None] | None = None
        self._reconnect_wait = reconnect_wait
        self._connected = asyncio.Event()
        self._closing = False
        self._consoles: set[_Console] = set()

    def watch(
        self, on_domain_changed: DomainChanged, on_reconnected: Reconnected
    ) -> None:
        self._on_domain_changed = on_domain_changed
        self._on_reconnected = on_reconnected

    @property
    def local(self) -> bool:
        """Whether libvirt runs on this host (so host checks and paths apply)."""
        return "://" in self._uri and self._uri.split("://", 1)[1].startswith("/")

    async def connect(self) -> None:
        """Connect, subscribe to events and make sure kdlab's pools run.

        The connection is used only once all of that is done, so a call never
        sees a half-prepared one.
        """
        self._loop = asyncio.get_running_loop()
        try:
            conn = await asyncio.to_thread(libvirt.open, self._uri)
        except libvirt.libvirtError as err:
            raise HypervisorError(
                f"cannot connect to libvirt at {self._uri}: {err.get_error_message()}; "
                "is libvirtd running?"
            ) from None
        try:
            # Keepalive detects a dead libvirtd; drivers without it (test://)
            # need none.
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(*_KEEPALIVE)
            conn.registerCloseCallback(self._closed, None)
            callback_ids = [
                conn.domainEventRegisterAny(
                    None,
                    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    self._lifecycle_event,
                    None,
                )
            ]
            await asyncio.to_thread(self._ensure_pools, conn)
        except libvirt.libvirtError as err:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.close)
            raise _translate(err) from None
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.close)
            raise
        self._conn, self._callback_ids = conn, callback_ids
        self._connected.set()
        log.info("libvirt.connected", uri=self._uri)

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        conn, self._conn = self._conn, None
        # Calls waiting for a reconnection are woken, to fail at once.
        self._connected.set()
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            for callback_id in self._callback_ids:
                conn.domainEventDeregisterAny(callback_id)
            conn.unregisterCloseCallback()
        # Objects of a connection (a cancelled upload's stream and volume, kept
        # by its traceback) hold it open; freed now, libvirt really closes it
        # while the loop still runs, instead of at exit on a closed loop.
        gc.collect()
        try:
            remaining = await blocking.run(
                conn.close, seconds=_CLOSE_SECONDS, what="closing libvirt's connection"
            )
        except (blocking.Unanswered, libvirt.libvirtError):
            return  # its event handles stay registered: nothing to drain
        if remaining:
            log.warning("libvirt.close_leaked", references=remaining)
            return
        if self._consoles:  # their connections' handles stay registered
            log.warning("libvirt.consoles_left", consoles=len(self._consoles))
            return
        impl = libvirtaio.getCurrentImpl()
        if impl is not None:
            try:
                await asyncio.wait_for(impl.drain(), _DRAIN_SECONDS)
            except TimeoutError:
                log.warning("libvirt.drain_timeout", seconds=_DRAIN_SECONDS)

    async def resolve_accel(self, accel: Accel) -> Accel:
        def capabilities(conn: libvirt.virConnect) -> str:
            return str(conn.getCapabilities())

        caps = etree.fromstring(
            (await self._call(capabilities, again=capabilities)).encode()
        )
        libvirt_has_kvm = bool(
            caps.xpath("//guest[arch/@name='x86_64']/arch/domain[@type='kvm']")
        )
        if accel is Accel.TCG:
            return Accel.TCG
        usable, why = libvirt_has_kvm, "libvirt reports no KVM for x86_64 guests"
        if usable and self.local:
            usable, why = facts.kvm_usable(self._qemu_user)
        if accel is Accel.KVM and not libvirt_has_kvm:
            raise InvalidArgument(f"--accel kvm: {why}; use --accel tcg or auto")
        if accel is Accel.KVM:
            return Accel.KVM
        chosen = Accel.KVM if usable else Accel.TCG
        log.info("accel.resolved", accel=chosen.value, reason=why)
        return chosen

    async def list_vms(self) -> list[VMRecord]:
        def list_all(conn: libvirt.virConnect) -> list[VMRecord]:
            records = []
            for dom in conn.listAllDomains(0):
                record = self._record(dom)
                if record is not None:
                    records.append(record)
            return records

        return await self._call(list_all, again=list_all)

    async def get_vm(self, name: str) -> VMRecord | None:
        def get(conn: libvirt.virConnect) -> VMRecord | None:
            dom = self._lookup(conn, name)
            return None if dom is None else self._record(dom)

        return await self._call(get, again=get)

    async def define_vm(self, spec: VMSpec) -> VMRecord:
        xml = build_domain_xml(spec)

        def define(conn: libvirt.virConnect) -> VMRecord:
            if self._lookup(conn, spec.name) is not None:
                raise VMExists(
                    f"libvirt already has a domain named {domain_name(spec.name)!r}: "
                    "choose another name"
                )
            log.debug("vm.define_xml", vm=spec.name, xml=xml)
            dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            record = self._record(dom)
            assert record is not None, "a domain kdlab defined must parse back"
            return record

        def define_again(conn: libvirt.virConnect) -> VMRecord:
            dom = self._lookup(conn, spec.name)
            found = None if dom is None else self._record(dom)
            # Created at the same microsecond: the define got through.
            if found is not None and found.spec.created_usec == spec.created_usec:
                return found
            return define(conn)

        return await self._call(define, again=define_again)

    async def redefine_vm(self, spec: VMSpec) -> VMRecord:
        def redefine(conn: libvirt.virConnect) -> VMRecord:
            xml = build_domain_xml(spec, self._domain(conn, spec.name).UUIDString())
            record = self._record(
                conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            )
            assert record is not None, "a domain kdlab defined must parse back"
            return record

        return await self._call(redefine, again=redefine)

    async def undefine_vm(self, name: str) -> None:
        def undefine(conn: libvirt.virConnect) -> None:
            # libvirt refuses to undefine a domain with snapshot metadata; the
            # snapshots' state goes with the VM's disks.
            self._domain(conn, name).undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            )

        def undefine_again(conn: libvirt.virConnect) -> None:
            if self._lookup(conn, name) is not None:
                undefine(conn)

        await self._call(undefine, again=undefine_again)

    async def start_vm(
        self,
        name: str,
        *,
        paused: bool,
        checkpoint: str = "",
        run: RunStart | None = None,
    ) -> None:
        if self.local:
            try:
                facts.prepare_private_dir(self._gdb_dir, self._qemu_user)
                facts.require_reachable(self._vm_pool_dir, self._qemu_user)
            except PermissionError as err:
                raise HypervisorError(str(err)) from None
            except OSError as err:
                raise HypervisorError(
                    f"{err.filename}: {err.strerror}; kdlabd's directories are gone "
                    "(restart kdlabd to recreate its pools)"
                ) from None
        if checkpoint:
            # libvirt starts QEMU with -loadvm: the new process begins in the
            # checkpoint's state.
            revert = (
                libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
                if paused
                else libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
            )
            await self._change(
                name,
                lambda dom: dom.revertToSnapshot(_snapshot(dom, checkpoint), revert),
                active=True,
            )
            return
        flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
        if run is not None:
            await self._start_run(name, run, flags)
            return
        await self._change(name, lambda dom: dom.createWithFlags(flags), active=True)

    async def _start_run(self, name: str, run: RunStart, flags: int) -> None:
        """Boot the inactive persistent domain from a live definition of its
        own with the run's pieces: libvirt keeps the persistent one as it is
        and brings it back when QEMU stops."""

        def create(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            spec = parse_domain_xml(inactive).replace(vcpus=run.vcpus)
            xml = build_domain_xml(
                spec,
                dom.UUIDString(),
                run=(run.run, run.files),
                mark=parse_boot_mark(inactive),
            )
            log.debug("run.domain_xml", vm=name, xml=xml)
            conn.createXML(xml, flags)

        def again(conn: libvirt.virConnect) -> None:
            if not self._domain(conn, name).isActive():
                create(conn)

        await self._call(create, again=again)

    async def emulator(self) -> tuple[str, Path]:
        def identify(conn: libvirt.virConnect) -> tuple[str, Path]:
            version = conn.getVersion()  # major * 1_000_000 + minor * 1000 + micro
            caps = etree.fromstring(conn.getCapabilities().encode())
            path = str(caps.xpath("string(guest[arch/@name='x86_64']/arch/emulator)"))
            dotted = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
            return f"QEMU {dotted}", Path(path)

        return await self._call(identify, again=identify)

    async def run_position(self, name: str) -> int:
        answer = await self._qmp(name, '{"execute": "query-replay"}')
        try:
            return int(json.loads(answer)["return"]["icount"])
        except (ValueError, KeyError, TypeError):
            raise HypervisorError(
                f"QEMU's answer about VM {name!r}'s record/replay: {answer[:200]}"
            ) from None

    async def monitor(self, name: str, command: str) -> str:
        return await self._qmp(name, command, hmp=True)

    async def _qmp(self, name: str, command: str, *, hmp: bool = False) -> str:
        flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP if hmp else 0

        def ask(conn: libvirt.virConnect) -> str:
            dom = self._domain(conn, name)
            return str(libvirt_qemu.qemuMonitorCommand(dom, command, flags))

        return await self._call(ask)

    async def create_recording_files(
        self, recording: str, disks: tuple[Disk, ...]
    ) -> RunFiles:
        files = await self.recording_files(recording, [d.target for d in disks])
        owner = self._qemu_user.uid if self._qemu_user is not None else None
        overlays = dict(files.disks)

        def create(conn: libvirt.virConnect) -> RunFiles:
            pool = self._recording_pool(conn)
            made = [
                (files.log, ImageFormat.RAW, 0),
                (files.state, ImageFormat.QCOW2, _MIB),
            ]
            for disk in disks:
                # As large as the VM's disk: the guest sees the top's size.
                size = int(conn.storageVolLookupByPath(str(disk.path)).info()[1])
                made.append((overlays[disk.target], ImageFormat.QCOW2, size))
            for path, fmt, size in made:
                storage.delete_volume(pool, path.name)
                storage.create_volume(pool, path.name, size, fmt, owner=owner)
            return files

        return await self._call(create, again=create)

    async def recording_files(
        self, recording: str, targets: Sequence[str] = ()
    ) -> RunFiles:
        return recording_files(self._recording_pool_dir, recording, targets)

    async def list_recording_volumes(self) -> dict[str, tuple[Path, int]]:
        return await self._call(
            lambda conn: _volumes(self._recording_pool(conn)),
            again=lambda conn: _volumes(self._recording_pool(conn)),
        )

    async def delete_recording_volume(self, volume: str) -> None:
        def delete(conn: libvirt.virConnect) -> None:
            pool = self._recording_pool(conn)
            storage.refresh(pool)
            storage.delete_volume(pool, volume)

        await self._call(delete, again=delete)

    async def recording_pool_free(self) -> int:
        def free(conn: libvirt.virConnect) -> int:
            return _free(self._recording_pool(conn))

        return await self._call(free, again=free)

    async def mark_boot(self, name: str, mark: BootMark) -> None:
        def record(conn: libvirt.virConnect) -> None:
            self._domain(conn, name).setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                boot_mark_xml(mark),
                BOOT_PREFIX,
                BOOT_NS,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )

        await self._call(record, again=record)

    async def attach_disk(self, name: str, disk: Disk) -> None:
        xml = disk_xml(disk)
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG

        def attach(conn: libvirt.virConnect) -> None:
            self._domain(conn, name).attachDeviceFlags(xml, flags)

        await self._call(attach)

    async def save_checkpoint(self, name: str, tag: str, description: str) -> None:
        xml = snapshots.snapshot_xml(tag, description)

        def save(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            raw = snapshots.disks_not_qcow2(dom.XMLDesc(0))
            if raw:
                raise UnsupportedDisk(
                    f"VM {name!r} has disks that are not qcow2 ({', '.join(raw)}): "
                    "a checkpoint is kept inside qcow2 disks. Recreate the VM with "
                    "kdlab (kdlabctl create ... --image), whose disks are qcow2"
                )
            log.debug("checkpoint.snapshot_xml", vm=name, xml=xml)
            dom.snapshotCreateXML(xml, 0)

        def save_again(conn: libvirt.virConnect) -> None:
            # One call in libvirtd: it either made the whole snapshot or none.
            if tag not in self._domain(conn, name).snapshotListNames(0):
                save(conn)

        await self._call(save, again=save_again)

    async def restore_checkpoint(self, name: str, tag: str, *, paused: bool) -> None:
        def restore(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            _snapshot(dom, tag)
            if paused and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                dom.suspend()
            try:
                # loadvm in the running QEMU: libvirt's own revert (9.0)
                # starts a new QEMU process, which would drop gdb and consoles.
                answer = libvirt_qemu.qemuMonitorCommand(
                    dom,
                    f"loadvm {tag}",
                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
                )
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                # A driver without QEMU's monitor (libvirt's test driver).
                flag = libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED if paused else 0
                dom.revertToSnapshot(_snapshot(dom, tag), flag)
                answer = ""
            if answer.strip():
                raise HypervisorError(
                    f"QEMU could not load checkpoint {tag!r} of VM {name!r}: "
                    f"{answer.strip()}"
                )
            if not paused and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()

        await self._call(restore)

    async def delete_checkpoint(self, name: str, tag: str) -> None:
        def delete(conn: libvirt.virConnect) -> None:
            _snapshot(self._domain(conn, name), tag).delete(0)

        def delete_again(conn: libvirt.virConnect) -> None:
            if tag in self._domain(conn, name).snapshotListNames(0):
                delete(conn)

        await self._call(delete, again=delete_again)

    async def shutdown_vm(self, name: str) -> None:
        await self._change(name, lambda dom: dom.shutdown(), active=False)

    async def destroy_vm(self, name: str) -> None:
        await self._change(name, lambda dom: dom.destroy(), active=False)

    async def suspend_vm(self, name: str) -> None:
        def suspend(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                dom.suspend()

        await self._call(suspend, again=suspend)

    async def panic_handled(self, name: str) -> bool:
        def handled(conn: libvirt.virConnect) -> bool:
            dom = self._domain(conn, name)
            if not dom.isActive():
                return False
            try:
                dom.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    PANIC_NS,
                    libvirt.VIR_DOMAIN_AFFECT_LIVE,
                )
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return False
                raise
            return True

        return await self._call(handled, again=handled)

    async def mark_panic_handled(self, name: str) -> None:
        # Live metadata lives as long as the QEMU process: the next boot's
        # panic is a new one, and a restarted kdlabd sees this one was dumped.
        def mark(conn: libvirt.virConnect) -> None:
            self._domain(conn, name).setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                "<handled/>",
                "kdlab-panic",
                PANIC_NS,
                libvirt.VIR_DOMAIN_AFFECT_LIVE,
            )

        await self._call(mark, again=mark)

    async def dump_vm(
        self,
        name: str,
        volume: str,
        *,
        compressed: bool,
        memory_mib: int,
        progress: DumpProgress,
    ) -> Path:
        path = self._dump_pool_dir / volume
        fmt = (
            libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_KDUMP_ZLIB
            if compressed
            else libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW  # ELF, for memory-only
        )
        dom = await self._call(lambda conn: self._domain(conn, name))
        seconds = dump_seconds(memory_mib, compressed)
        dumping = asyncio.ensure_future(
            blocking.run(
                lambda: dom.coreDumpWithFormat(
                    str(path), fmt, libvirt.VIR_DUMP_MEMORY_ONLY
                ),
                seconds=seconds,
                what=f"dumping the memory of {name}",
            )
        )
        try:
            await self._follow_dump(dom, dumping, progress)
            await dumping
        except BaseException as err:
            with contextlib.suppress(libvirt.libvirtError, blocking.Unanswered):
                await blocking.run(dom.abortJob, seconds=10, what="aborting a dump")
            with contextlib.suppress(KdlabError):
                await self.delete_dump_volume(volume)
            if isinstance(err, libvirt.libvirtError):
                raise _translate(err) from None
            if isinstance(err, blocking.Unanswered):
                raise HypervisorError(
                    f"the dump of VM {name!r} did not end within {seconds:g} s; "
                    "it was aborted"
                ) from None
            raise
        # No refresh of the pool here: listing and deleting its volumes
        # refresh it first.
        return path

    @staticmethod
    async def _follow_dump(
        dom: libvirt.virDomain,
        dumping: asyncio.Future[object],
        progress: DumpProgress,
    ) -> None:
        """Report the dump's progress (libvirt's job statistics) until it ends."""
        while not dumping.done():
            await asyncio.wait({dumping}, timeout=_DUMP_POLL_SECONDS)
            if dumping.done():
                return
            try:
                stats = await blocking.run(
                    dom.jobStats, seconds=5, what="reading a dump's progress"
                )
            except (libvirt.libvirtError, blocking.Unanswered):
                continue
            progress(
                int(stats.get("memory_processed", 0)),
                int(stats.get("memory_total", 0)),
            )

    async def list_dump_volumes(self) -> dict[str, tuple[Path, int]]:
        def volumes(conn: libvirt.virConnect) -> dict[str, tuple[Path, int]]:
            return _volumes(self._dump_pool(conn))

        return await self._call(volumes, again=volumes)

    async def dump_volume_path(self, volume: str) -> Path:
        return self._dump_pool_dir / volume

    async def delete_dump_volume(self, volume: str) -> None:
        def delete(conn: libvirt.virConnect) -> None:
            pool = self._dump_pool(conn)
            storage.refresh(pool)
            storage.delete_volume(pool, volume)

        await self._call(delete, again=delete)

    async def dump_pool_free(self) -> int:
        def free(conn: libvirt.virConnect) -> int:
            return _free(self._dump_pool(conn))

        return await self._call(free, again=free)

    async def _change(
        self, name: str, act: Callable[[libvirt.virDomain], object], *, active: bool
    ) -> None:
        """*act* on the VM's domain, to make it *active* (or inactive).

        If libvirtd went away meanwhile, *act* again on the new connection
        unless the domain's state shows that it got through.
        """

        def run(conn: libvirt.virConnect) -> None:
            act(self._domain(conn, name))

        def again(conn: libvirt.virConnect) -> None:
            dom = self._domain(conn, name)
            if bool(dom.isActive()) != active:
                act(dom)

        await self._call(run, again=again)

    async def open_console(
        self, name: str, on_output: ConsoleOutput, on_sent: ConsoleSent
    ) -> ConsoleStream:
        # libvirtd stops reading a client whose console input the guest does
        # not take (max_client_requests); on the shared connection that froze
        # every other call until a keepalive dropped it. Each console gets a
        # connection of its own, made once libvirtd answers again if it went away.
        if self._conn is None:
            await self._reconnection()
        abandoned = threading.Event()

        def open_stream() -> tuple[libvirt.virConnect, libvirt.virStream]:
            conn = libvirt.open(self._uri)
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.setKeepAlive(*_KEEPALIVE)
                stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
                # FORCE: kdlabd holds the one session per VM and shares it; a
                # stale session (virsh console left open) must not lock viewers out.
                self._domain(conn, name).openConsole(
                    None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE
                )
                if abandoned.is_set():  # the caller gave up: nobody will close it
                    stream.abort()
                    raise HypervisorError("opened too late")
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                raise
            return conn, stream

        try:
            conn, stream = await blocking.run(
                open_stream,
                seconds=_CONSOLE_OPEN_SECONDS,
                what=f"opening the console of {name}",
            )
        except blocking.Unanswered:
            abandoned.set()
            raise HypervisorError(
                f"libvirt did not open the console of VM {name!r} within "
                f"{_CONSOLE_OPEN_SECONDS:g} s; try again"
            ) from None
        except libvirt.libvirtError as err:
            raise _translate(err) from None
        console = _Console(conn, stream, on_output, on_sent, self._consoles.discard)
        self._consoles.add(console)
        return console

    async def upload_boot_file(self, volume: str, fd: int, size: int) -> Path:
        def upload(conn: libvirt.virConnect) -> Path:
            pool = conn.storagePoolLookupByName(self._vm_pool_name)
            return Path(storage.upload(conn, pool, volume, fd, size).path())

        # A boot file is small: uploaded again whole (the upload replaces it).
        return await self._call(upload, again=upload)

    async def list_vm_volumes(self) -> list[str]:
        def names(conn: libvirt.virConnect) -> list[str]:
            pool = conn.storagePoolLookupByName(self._vm_pool_name)
            storage.refresh(pool)
            return [str(v) for v in pool.listVolumes()]

        return await self._call(names, again=names)

    async def delete_vm_volume(self, volume: str) -> None:
        def delete(conn: libvirt.virConnect) -> None:
            storage.delete_volume(
                conn.storagePoolLookupByName(self._vm_pool_name), volume
            )

        await self._call(delete, again=delete)

    async def host_resources(self) -> HostResources:
        def info(conn: libvirt.virConnect) -> HostResources:
            # virNodeInfo: [model, memory in MiB, active CPUs, ...]
            _model, memory_mib, cpus, *_ = conn.getInfo()
            return HostResources(memory_mib=int(memory_mib), cpus=int(cpus))

        return await self._call(info)

    async def list_images(self) -> list[ImageRecord]:
        def list_all(conn: libvirt.virConnect) -> list[ImageRecord]:
            pool = self._image_pool(conn)
            storage.refresh(pool)
            volumes = pool.listAllVolumes(0)
            owners = storage.image_owners([v.name() for v in volumes])
            records = [
                storage.probed_record(v, owners.get(v.name(), 0))
                for v in volumes
                if storage.parse_owner_mark(v.name()) is None
            ]
            return [record for record in records if record is not None]

        return await self._call(list_all, again=list_all)

    async def get_image(self, name: str) -> ImageRecord | None:
        def get(conn: libvirt.virConnect) -> ImageRecord | None:
            pool = self._image_pool(conn)
            volume = storage.find_volume(pool, name)
            if volume is None:
                return None
            return storage.probed_record(volume, self._owner(pool, name))

        return await self._call(get, again=get)

    async def image_owners(self) -> dict[str, int]:
        def owners(conn: libvirt.virConnect) -> dict[str, int]:
            return storage.image_owners(self._image_pool(conn).listVolumes())

        return await self._call(owners, again=owners)

    async def set_image_owner(self, name: str, uid: int | None) -> None:
        def record(conn: libvirt.virConnect) -> None:
            storage.set_image_owner(self._image_pool(conn), name, uid)

        await self._call(record, again=record)

    async def create_image(self, name: str, size: int) -> ImageRecord:
        def create(conn: libvirt.virConnect) -> ImageRecord:
            pool = self._image_pool(conn)
            volume = storage.create_volume(pool, name, size, ImageFormat.RAW)
            return self._image_record(pool, volume, ImageFormat.RAW)

        def create_again(conn: libvirt.virConnect) -> ImageRecord:
            # The image service holds the name, and it was no image: a volume
            # of that name now is the one this call created.
            pool = self._image_pool(conn)
            volume = storage.find_volume(pool, name)
            if volume is None:
                return create(conn)
            return self._image_record(pool, volume, ImageFormat.RAW)

        return await self._call(create, again=create_again)

    async def upload_image(
        self, name: str, source: ImageSource, progress: UploadProgress
    ) -> ImageRecord:
        def upload(conn: libvirt.virConnect) -> ImageRecord:
            pool = conn.storagePoolLookupByName(self._image_pool_name)
            volume = storage.upload(
                conn,
                pool,
                name,
                source.fd,
                source.size,
                fmt=source.format,
                capacity=source.capacity,
                progress=progress,
            )
            return self._image_record(pool, volume, source.format)

        # Not again: an import is long and reports its progress; it fails, and
        # its rollback (or reconciliation) removes what it uploaded.
        return await self._call(upload)

    async def inspect_image(self, name: str) -> StoredImage:
        def inspect(conn: libvirt.virConnect) -> StoredImage:
            pool = conn.storagePoolLookupByName(self._image_pool_name)
            return storage.inspect(conn, pool, name, local=self.local)

        return await self._call(inspect, again=inspect)

    async def delete_image(self, name: str) -> None:
        def delete(conn: libvirt.virConnect) -> None:
            pool = self._image_pool(conn)
            storage.delete_volume(pool, name)
            # The owner goes last: an image is never left without one.
            storage.set_image_owner(pool, name, None)

        await self._call(delete, again=delete)

    async def resize_image(self, image: ImageRecord, size: int) -> ImageRecord:
        def resize(conn: libvirt.virConnect) -> ImageRecord:
            pool = self._image_pool(conn)
            volume = pool.storageVolLookupByName(image.name)
            volume.resize(size, 0)
            return self._image_record(pool, volume, image.format)

        return await self._call(resize, again=resize)

    async def create_vm_disk(
        self, volume: str, size: int, base: ImageRecord | None
    ) -> Path:
        def create(conn: libvirt.virConnect) -> Path:
            pool = conn.storagePoolLookupByName(self._vm_pool_name)
            storage.delete_volume(pool, volume)
            created = storage.create_volume(pool, volume, size, ImageFormat.QCOW2, base)
            return Path(created.path())

        return await self._call(create, again=create)

    async def _call(
        self,
        fn: Callable[[libvirt.virConnect], T],
        *,
        again: Callable[[libvirt.virConnect], T] | None = None,
    ) -> T:
        """Run *fn* with the connection in a worker thread; translate libvirt errors.

        While the connection is lost (libvirtd restarting), the call waits for
        kdlabd to reconnect, up to the configured bound. If the connection
        dies during *fn* (libvirtd stopped while the call was on its way),
        whether *fn* got through is not known: *again* runs on the new
        connection and does what is left (*fn* itself when running it twice
        is harmless). Without *again* the call fails.
        """
        conn = self._conn or await self._reconnection()
        try:
            return await asyncio.to_thread(fn, conn)
        except libvirt.libvirtError as err:
            if _alive(conn):
                raise _translate(err) from None
            # The close callback may not have run yet: reconnect now.
            self._lost(conn, libvirt.VIR_CONNECT_CLOSE_REASON_EOF)
            if again is None:
                raise HypervisorError(
                    f"libvirtd went away during the call ({err.get_error_message()}); "
                    "kdlabd reconnects by itself: try again"
                ) from None
            log.info("libvirt.call_again", error=err.get_error_message())
        conn = await self._reconnection()
        try:
            return await asyncio.to_thread(again, conn)
        except libvirt.libvirtError as err:
            raise _translate(err) from None

    async def _reconnection(self) -> libvirt.virConnect:
        """The connection, once kdlabd has reconnected; HypervisorError if it
        does not within the bound, or if kdlabd is stopping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_wait
        while (conn := self._conn) is None and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._reconnecting is None:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), remaining)
        if conn is not None:
            return conn
        if self._closing:
            raise HypervisorError("kdlabd is stopping: its libvirt connection closed")
        raise HypervisorError(
            f"not connected to libvirt at {self._uri}: libvirtd has not answered for "
            f"{self._reconnect_wait:g} s; kdlabd reconnects by itself as soon as it "
            "does (is libvirtd running? systemctl status libvirtd)"
        )

    def _image_pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        return conn.storagePoolLookupByName(self._image_pool_name)

    def _dump_pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        return conn.storagePoolLookupByName(self._dump_pool_name)

    def _recording_pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        return conn.storagePoolLookupByName(self._recording_pool_name)

    @staticmethod
    def _owner(pool: libvirt.virStoragePool, name: str) -> int:
        """The uid recorded as image *name*'s owner (root if none)."""
        return storage.image_owners(pool.listVolumes()).get(name, 0)

    @classmethod
    def _image_record(
        cls,
        pool: libvirt.virStoragePool,
        volume: libvirt.virStorageVol,
        fmt: ImageFormat,
    ) -> ImageRecord:
        """The image *volume* holds, as *fmt*, with its recorded owner."""
        return storage.image_record(volume, fmt, cls._owner(pool, volume.name()))

    @staticmethod
    def _lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
        try:
            return conn.lookupByName(domain_name(name))
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _domain(self, conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
        dom = self._lookup(conn, name)
        if dom is None:
            raise NoSuchVM(f"no VM named {name!r} (its libvirt domain is gone)")
        return dom

    @staticmethod
    def _record(dom: libvirt.virDomain) -> VMRecord | None:
        """kdlab's record of *dom*; None if it is not kdlab's, or if it was
        undefined since it was listed (someone's virsh, another kdlabd)."""
        try:
            if not dom.name().startswith(DOMAIN_PREFIX):
                return None
            xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            spec = parse_domain_xml(xml)
            state, reason = dom.state()
            checkpoints = _checkpoints(dom)
        except NotKdlabDomain:
            return None
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise
        shown, mark = vm_state(state, reason), parse_boot_mark(xml)
        return VMRecord(
            spec=spec,
            uuid=dom.UUIDString(),
            state=shown,
            boot=mark,
            last_stop=stop_cause(shown, mark, hypervisor_stop_cause(state, reason)),
            panicked=panicked(state, reason),
            checkpoints=checkpoints,
        )

    def _ensure_pools(self, conn: libvirt.virConnect) -> None:
        """kdlab's pools exist and run; a pool that existed keeps its directory."""
        self._vm_pool_dir = _ensure_pool(
            conn, self._vm_pool_name, self._vm_pool_dir, "boot_pool"
        )
        self._image_pool_dir = _ensure_pool(
            conn, self._image_pool_name, self._image_pool_dir, "image_pool"
        )
        self._dump_pool_dir = _ensure_pool(
            conn, self._dump_pool_name, self._dump_pool_dir, "dump_pool"
        )
        self._recording_pool_dir = _ensure_pool(
            conn, self._recording_pool_name, self._recording_pool_dir, "recording_pool"
        )

    def _lifecycle_event(
        self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any
    ) -> None:
        name = dom.name()
        if name.startswith(DOMAIN_PREFIX):
            log.debug("libvirt.event", domain=name, lifecycle=event, detail=detail)
            self._on_domain_changed(name.removeprefix(DOMAIN_PREFIX))

    def _closed(self, conn: Any, reason: int, _opaque: Any) -> None:
        """libvirt's close callback: from the loop, or from whichever worker
        thread's call found the connection dead (an upload, say)."""
        self._loop.call_soon_threadsafe(self._lost, conn, reason)

    def _lost(self, conn: libvirt.virConnect, reason: int) -> None:
        if conn is not self._conn:
            return
        log.warning("libvirt.disconnected", uri=self._uri, reason=reason)
        self._conn = None
        self._connected.clear()
        if not self._closing and self._reconnecting is None:
            self._reconnecting = self._loop.create_task(self._reconnect(conn))

    async def _reconnect(self, dead: libvirt.virConnect) -> None:
        # Free the dead connection's event handles and callbacks first.
        with contextlib.suppress(libvirt.libvirtError, blocking.Unanswered):
            await blocking.run(
                dead.close, seconds=_CLOSE_SECONDS, what="closing the lost connection"
            )
        attempt = 0
        try:
            while True:
                await asyncio.sleep(self._reconnect_delay(attempt))
                attempt += 1
                try:
                    await self.connect()
                except (libvirt.libvirtError, KdlabError) as err:
                    if attempt % _RECONNECT_LOG_EVERY == 1:
                        log.info(
                            "libvirt.reconnect_failed", attempt=attempt, error=str(err)
                        )
                    continue
                log.info("libvirt.reconnected", attempts=attempt)
                self._on_reconnected()
                return
        finally:
            self._reconnecting = None

    def _reconnect_delay(self, attempt: int) -> float:
        """Seconds before reconnection attempt *attempt* (from 0)."""
        if self.local:
            return _LOCAL_RECONNECT_INTERVAL
        return _REMOTE_RECONNECT_DELAYS[min(attempt, len(_REMOTE_RECONNECT_DELAYS) - 1)]


def _snapshot(dom: libvirt.virDomain, tag: str) -> libvirt.virDomainSnapshot:
    try:
        return dom.snapshotLookupByName(tag, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise NoSuchCheckpoint(
                f"VM {dom.name().removeprefix(DOMAIN_PREFIX)!r} has no checkpoint "
                f"{tag!r} (kdlabctl checkpoint list)"
            ) from None
        raise


def _checkpoints(dom: libvirt.virDomain) -> tuple[Checkpoint, ...]:
    """The VM's checkpoints, oldest first."""
    found = [
        snapshots.parse_snapshot_xml(snap.getXMLDesc(0))
        for snap in dom.listAllSnapshots(0)
    ]
    return tuple(sorted(found, key=lambda c: (c.created_usec, c.tag)))


def _alive(conn: libvirt.virConnect) -> bool:
    """Whether *conn* is still open (a local check: no call to libvirtd)."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def _volumes(pool: libvirt.virStoragePool) -> dict[str, tuple[Path, int]]:
    """A pool's volumes, fresh from its directory: name to (path, size)."""
    storage.refresh(pool)
    found = {}
    for volume in pool.listAllVolumes(0):
        _type, capacity, _allocation = volume.info()
        found[volume.name()] = (Path(volume.path()), int(capacity))
    return found


def _free(pool: libvirt.virStoragePool) -> int:
    """Bytes free on a pool's filesystem."""
    storage.refresh(pool)
    # virStoragePoolInfo: [state, capacity, allocation, available]
    return int(pool.info()[3])


def recording_files(
    pool_dir: Path, recording: str, targets: Sequence[str] = ()
) -> RunFiles:
    """The files of *recording* in the recordings pool at *pool_dir*, with
    its overlays of the disks *targets*."""
    return RunFiles(
        pool_dir / f"{recording}.rr",
        pool_dir / f"{recording}.state",
        tuple((t, pool_dir / f"{recording}.{t}.qcow2") for t in targets),
    )


def _ensure_pool(conn: libvirt.virConnect, name: str, expected: Path, key: str) -> Path:
    """Make sure the pool *name* runs; say so when it is not where kdlabd expects.

    A pool defined elsewhere (before ``state_dir`` changed, or by hand) keeps
    its directory: the volumes of existing VMs and images are there, and
    their domains name those paths. kdlabd goes on with it and logs where it
    is, once (after that *expected* is the pool's own directory).
    """
    path = storage.ensure_pool(conn, name, expected)
    if path != expected:
        log.warning(
            "storage.pool_elsewhere",
            pool=name,
            path=str(path),
            expected=str(expected),
            note=f"libvirt's pool {name} keeps its directory {path}, not "
            f"{expected} (state_dir), and kdlabd uses it; to have a pool in "
            f"state_dir, set {key} to another name",
        )
    return path


_EAGAIN = -2
_READABLE = libvirt.VIR_STREAM_EVENT_READABLE
_CLOSED = libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
# Typed input goes to libvirtd in packets of at most this many bytes.
_SEND_MAX = 64 * 1024


def _weakly(
    method: Callable[[libvirt.virStream, int, Any], None],
) -> Callable[[libvirt.virStream, int, Any], None]:
    """*method* as a stream callback that does not keep its object alive (libvirt
    leaks what a remote stream's callback holds: see _Console._write)."""
    ref = weakref.WeakMethod(method)

    def callback(stream: libvirt.virStream, events: int, opaque: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(stream, events, opaque)

    return callback


class _Console:
    """A console stream on a libvirt connection of its own.

    Output arrives through the stream's events on the loop (libvirtaio);
    a non-blocking ``recv`` only copies what libvirt already received. Input
    cannot be sent from the loop: ``virStreamSend`` waits until libvirtd
    reads the packet, and libvirtd stops reading while the guest takes no
    input. A writer thread of the console's own sends it, and then also
    aborts the stream and closes the connection when the console closes,
    since those are calls that wait behind a stuck send. The loop only counts
    the backlog.
    """

    def __init__(
        self,
        conn: libvirt.virConnect,
        stream: libvirt.virStream,
        on_output: ConsoleOutput,
        on_sent: ConsoleSent,
        on_finished: Callable[[_Console], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn: libvirt.virConnect | None = conn
        self._stream: libvirt.virStream | None = stream
        self._on_output = on_output
        self._on_sent = on_sent
        self._on_finished = on_finished
        self._backlog = 0
        self._ended = False
        self._input: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        stream.eventAddCallback(_READABLE | _CLOSED, _weakly(self._event), None)
        conn.registerCloseCallback(self._conn_closed, None)
        # The thread gets the only other references: libvirt's last unref of
        # the connection (a call to libvirtd) then happens there, never here.
        threading.Thread(
            target=self._write,
            args=(conn, stream),
            name=blocking.thread_name("console"),
            daemon=True,
        ).start()

    @property
    def backlog(self) -> int:
        return self._backlog

    def send(self, data: bytes) -> None:
        if self._closing.is_set():
            return
        self._backlog += len(data)
        self._input.put(data)

    async def close(self) -> None:
        if not self._closing.is_set():
            self._closing.set()
            # libvirtaio is not thread-safe: callbacks are removed here, on the
            # loop, before the writer thread aborts the stream.
            # (The connection's close callback is unregistered by the writer
            # thread: on a remote connection that is a call to libvirtd, which
            # waits while libvirtd does not read the connection, as it does not
            # while a paused guest leaves the typed input unread.)
            stream, self._stream = self._stream, None
            self._conn = None
            with contextlib.suppress(libvirt.libvirtError, AttributeError):
                stream.eventRemoveCallback()  # type: ignore[union-attr]
            del stream
            self._input.put(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), _CLOSE_SECONDS)
        except TimeoutError:
            # A send or the abort waits for libvirtd; the thread ends when its
            # keepalive drops the connection, or with kdlabd (a daemon thread).
            log.warning("console.close_unanswered", seconds=_CLOSE_SECONDS)

    def _write(self, conn: libvirt.virConnect, stream: libvirt.virStream) -> None:
        """The writer thread: send typed input until closed, then close."""
        failed = False
        try:
            while (data := self._next_input()) is not None:
                if not failed:
                    failed = not self._send_all(stream, data)
                self._from_thread(self._took, len(data), failed)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            # libvirt 9.0 never calls the free function of a remote stream's
            # event callback (remoteStreamCallbackFree; upstream patch
            # "remote/stream-event: Fix a memory leak", 2025): libvirt-python's
            # reference to the stream leaks, and the stream kept the connection
            # and its socket open for ever. Free the stream itself; only a
            # small wrapper object is left behind.
            stream.__del__()
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            self._from_thread(self._finished)

    def _next_input(self) -> bytes | None:
        """What was typed, several chunks at once; None once the console closes."""
        data = self._input.get()
        if data is None or self._closing.is_set():
            return None
        while len(data) < _SEND_MAX:
            try:
                more = self._input.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return None
            data += more
        return data

    def _send_all(self, stream: libvirt.virStream, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self._closing.is_set():
            try:
                sent = stream.send(view.tobytes())
            except libvirt.libvirtError:
                return False
            if sent == _EAGAIN:  # remote streams block instead; others may not
                time.sleep(0.05)
                continue
            view = view[sent:]
        return True

    def _from_thread(self, fn: Callable[..., None], *args: object) -> None:
        # After kdlabd's loop has closed there is nobody left to tell.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _took(self, count: int, failed: bool) -> None:
        self._backlog -= count
        if failed:
            self._end()
        else:
            self._on_sent()

    def _finished(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        self._on_finished(self)

    def _conn_closed(self, _conn: Any, _reason: int, _opaque: Any) -> None:
        """libvirt's close callback (a keepalive gave up, libvirtd restarted)."""
        self._from_thread(self._end)

    def _event(self, stream: libvirt.virStream, events: int, _opaque: Any) -> None:
        if events & _READABLE:
            self._read(stream)
        if events & _CLOSED:
            self._end()

    def _read(self, stream: libvirt.virStream) -> None:
        while not self._closing.is_set():
            try:
                data = stream.recv(65536)
            except libvirt.libvirtError:
                self._end()
                return
            if data == _EAGAIN:
                return
            if not data:
                self._end()
                return
            self._on_output(data)

    def _end(self) -> None:
        """The console ended by itself: tell the session, which closes it."""
        if not self._ended and not self._closing.is_set():
            self._ended = True
            self._on_output(b"")
