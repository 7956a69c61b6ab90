"""kdlabd's entry point: wire libvirt, the VM service and the bus, then serve."""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import signal
import sys

import structlog
from dbus_next.constants import NameFlag, RequestNameReply

from kdlab.errors import KdlabError
from kdlab.wire import BUS_NAME, bus_address
from kdlabd import logs
from kdlabd.bus.auth import Authorizer
from kdlabd.bus.dbus_next_patches import KdlabBus
from kdlabd.bus.exporter import BusExporter
from kdlabd.config import Config, from_args
from kdlabd.core import blocking
from kdlabd.core.checkpoints import CheckpointService
from kdlabd.core.dumps import DumpService
from kdlabd.core.execs import ExecService
from kdlabd.core.images import ImageService
from kdlabd.core.jobs import JobManager
from kdlabd.core.recordings import RecordingService
from kdlabd.core.vms import Layout, VMService
from kdlabd.host.builder import LocalBuilder
from kdlabd.host.facts import QemuUser
from kdlabd.host.journal import FileJournal
from kdlabd.host.local import LocalHost
from kdlabd.virt.libvirt_backend import LibvirtHypervisor, register_event_loop

log = structlog.get_logger(__name__)

# kdlabd.service's LimitNOFILE=. Console viewers, gdb sessions and received
# descriptors each hold one; without systemd the soft limit (often 1024) is
# raised to this at start, as far as the hard limit allows.
DESCRIPTOR_LIMIT = 65536
# The signals that stop kdlabd cleanly (kdlabd(8) lists them).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards DESCRIPTOR_LIMIT; the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = DESCRIPTOR_LIMIT
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as err:  # seccomp (@resources) under systemd
            log.warning("kdlabd.descriptor_limit_kept", limit=soft, error=str(err))
            return soft
        return wanted
    return soft


async def _load(
    images: ImageService,
    dumps: DumpService,
    vms: VMService,
    recordings: RecordingService,
) -> None:
    """Rebuild every service's view from libvirt, in the order they need."""
    await images.load()
    await dumps.load()
    await dumps.reconcile()
    await vms.load()
    await vms.reconcile()
    await recordings.load()  # after VMs: it follows the runs that record
    await images.clean_builds()
    await images.reconcile()


async def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT or until the bus goes away."""
    # A call stuck in libvirt must not keep a stopped kdlabd alive.
    asyncio.get_running_loop().set_default_executor(blocking.DaemonThreads())
    log.info("kdlabd.descriptors", limit=raise_descriptor_limit())
    register_event_loop()
    layout = Layout(config.state_dir, config.runtime_dir, config.cache_dir)
    layout.state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    hypervisor = LibvirtHypervisor(
        config.libvirt_uri,
        vm_pool=config.boot_pool,
        vm_pool_dir=config.vm_pool_dir,
        image_pool=config.image_pool,
        image_pool_dir=config.image_pool_dir,
        dump_pool=config.dump_pool,
        dump_pool_dir=config.dump_pool_dir,
        recording_pool=config.recording_pool,
        recording_pool_dir=config.recording_pool_dir,
        gdb_dir=layout.gdb_dir(),
        qemu_user=config.qemu_user,
        reconnect_wait=config.reconnect_wait,
    )
    await hypervisor.connect()
    vms: VMService | None = None
    dumps: DumpService | None = None
    recordings: RecordingService | None = None
    execs: ExecService | None = None
    bus = await KdlabBus(
        bus_address=bus_address(config.bus), negotiate_unix_fd=True
    ).connect()
    try:
        accel = await hypervisor.resolve_accel(config.accel)
        authorizer = await Authorizer.for_bus(bus, config.polkit_timeout)
        limits = config.limits(await hypervisor.host_resources())
        log.info("kdlabd.limits", **dataclasses.asdict(limits))
        jobs = JobManager()
        host = LocalHost(QemuUser.lookup(config.qemu_user))
        # Each service asks the other: VMs look images up, images ask who uses
        # them. The lambda finds `images` when a VM is created, made by then.
        vms = VMService(
            hypervisor,
            layout,
            accel,
            host=host,
            images=lambda name: images.for_disk(name),  # noqa: PLW0108
            limits=limits,
        )
        images = ImageService(
            hypervisor,
            jobs=jobs,
            users=vms.uses_image,
            builder=LocalBuilder(layout.scratch_dir(), layout.cache_dir()),
            files=host,
            journal=FileJournal(layout.journal_dir()),
            limits=limits,
        )
        dumps = DumpService(
            hypervisor,
            host=host,
            jobs=jobs,
            stop_vm=lambda name: vms.stop(name, force=True),
            limits=limits,
        )
        checkpoints = CheckpointService(vms, hypervisor, host, jobs, limits)
        recordings = RecordingService(hypervisor, host=host, vms=vms, limits=limits)
        execs = ExecService(vms, host, limits)
        BusExporter(
            bus,
            authorizer,
            vms,
            images,
            jobs,
            dumps=dumps,
            checkpoints=checkpoints,
            recordings=recordings,
            execs=execs,
        )
        # Dumps are loaded before VMs: a VM found panicked at start-up is
        # dumped unless its boot's dump exists (see DumpService.panicked).
        vms.subscribe(dumps)

        def reconnected() -> None:
            vms.hypervisor_reconnected()
            images.hypervisor_reconnected()

        hypervisor.watch(vms.domain_changed, reconnected)
        await _load(images, dumps, vms, recordings)
        # Objects are exported before the name is taken: owning the name means ready.
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            raise KdlabError(
                f"{BUS_NAME} is already owned on the bus: is kdlabd already running?"
            )
        log.info(
            "kdlabd.ready",
            bus=config.bus,
            libvirt_uri=config.libvirt_uri,
            accel=accel.value,
        )
        await _until_stopped(bus)
    finally:
        for service in (execs, vms, dumps, recordings):
            if service is not None:
                await service.close()
        bus.disconnect()
        await hypervisor.close()
    # Daemon threads: whatever still waits for libvirtd ends with the process.
    log.info("kdlabd.stopped", threads_left=blocking.busy_threads())


async def _until_stopped(bus: KdlabBus) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    disconnected = asyncio.ensure_future(bus.wait_for_disconnect())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if disconnected.done():
        raise KdlabError("lost the D-Bus connection")
    disconnected.cancel()


def main(argv: list[str] | None = None) -> int:
    try:
        config = from_args(argv)
    except KdlabError as err:
        print(f"kdlabd: {err}", file=sys.stderr)
        return 2
    logs.configure(config.log_format)
    try:
        asyncio.run(serve(config))
    except KdlabError as err:
        log.error("kdlabd.failed", error=str(err))
        return 1
    except Exception as err:  # libvirt or the bus unreachable at start-up
        log.error("kdlabd.failed", error=f"{type(err).__name__}: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
