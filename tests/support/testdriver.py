"""kdlabd on libvirt's test driver, serving a pre-populated fleet (the bus tier's).

:class:`Lab` runs kdlabd (:class:`tests.support.daemon.Kdlabd`) against
``test:///<file>``, a ``<node>`` pre-populated with kdlab domains built by
kdlabd's own :func:`~kdlabd.virt.domain_xml.build_domain_xml`. The test driver
cannot upload volumes nor start a domain paused, so a successful CreateVM is
the vm tier's job; every other call runs here for real. Nor can it dump a
domain: the dumps pool is pre-populated with complete dumps
(:data:`DUMPS`: volume, file and kdlabd's sidecar), as kdlabd finds them at
start-up, so every method of a Dump object runs here too.

Everything lives below one world-traversable directory (the caller's): an
unprivileged client must reach the bus socket, and kdlabd checks that the QEMU
user could reach its state and runtime directories.
"""

from __future__ import annotations

import contextlib
import enum
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

from lxml import etree

from kdlab import wire
from kdlabd.config import Config
from kdlabd.core import recordings as recording_files
from kdlabd.core.dumps import DumpRecord, sidecar
from kdlabd.core.models import Accel, BootMark, DebugSettings, Disk, Share, VMSpec
from kdlabd.core.vms import Layout
from kdlabd.virt.domain_xml import BOOT_NS, boot_mark_xml, build_domain_xml
from tests.support.bus import PrivateBus
from tests.support.clients import NOBODY
from tests.support.daemon import Kdlabd
from tests.support.timeouts import STARTUP_TIMEOUT
from tests.support.vmcores import elf_core

# --- libvirt's test driver, pre-populated with kdlab domains -------------------

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


class RunState(enum.IntEnum):
    """libvirt's virDomainState values the test driver's ``<test:runstate>`` takes."""

    RUNNING = 1
    PAUSED = 3
    SHUTOFF = 5
    CRASHED = 6


# The state kdlab shows for each libvirt state of a pre-populated domain.
# "defined" and "stopped" are both shut off: "stopped" VMs have a console log.
RUNSTATES = {
    "defined": RunState.SHUTOFF,
    "stopped": RunState.SHUTOFF,
    "running": RunState.RUNNING,
    "paused": RunState.PAUSED,
    "crashed": RunState.CRASHED,
}


@dataclass(frozen=True)
class FakeVM:
    """A kdlab VM written into the test driver file, and what kdlabd must show of it."""

    name: str
    state: str
    owner: int
    cmdline: str
    boots_with: str  # the Cmdline property: the user's plus kdlab's additions
    gdb_stub: str = "unix"
    memory_mib: int = 256
    vcpus: int = 1
    created_usec: int = 1_700_000_000_000_000
    release: str = ""  # what the bzImage announced at creation
    vmlinux: str = ""  # the client's hints, kept in kdlab's metadata
    kernel_path: str = ""
    disk: bool = False  # a blank vda, for a console that diagnoses the root disk
    on_panic: str = "dump-and-stop"
    booted_usec: int = 0  # the boot mark kdlabd's Start would have recorded
    shares: tuple[tuple[str, str], ...] = ()  # (tag, the owner's directory)

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kdlab-test:{self.name}"))

    @property
    def booted(self) -> bool:
        return self.state != "defined"

    def spec(self, layout: Layout) -> VMSpec:
        port = (
            int(self.gdb_stub.rsplit(":", 1)[1])
            if self.gdb_stub.startswith("tcp:")
            else None
        )
        return VMSpec(
            name=self.name,
            owner_uid=self.owner,
            kernel=layout.state_dir / "boot" / f"{self.name}.kernel",
            initrd=None,
            cmdline=self.cmdline,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            accel=Accel.TCG,
            console_log=layout.console_log(self.name),
            gdb_socket=layout.gdb_socket(self.name),
            agent_socket=layout.agent_socket(self.name),
            debug=DebugSettings(gdb=self.gdb_stub != "off", gdb_tcp_port=port),
            created_usec=self.created_usec,
            release=self.release,
            on_panic=self.on_panic,
            vmlinux=self.vmlinux,
            kernel_path=self.kernel_path,
            disks=(
                (Disk(layout.state_dir / "boot" / f"{self.name}.vda.qcow2", "vda"),)
                if self.disk
                else ()
            ),
            shares=tuple(
                Share(tag, directory, layout.share_socket(self.name, index))
                for index, (tag, directory) in enumerate(self.shares)
            ),
        )

    @property
    def last_stop(self) -> str:
        """A crashed domain of the file went off by a crash (if kdlabd booted it)."""
        return "crashed" if self.state == "crashed" and self.booted_usec else ""

    @property
    def diagnosis(self) -> list[str]:
        """What kdlabd diagnoses from the cmdline alone: KASLR under a gdbstub."""
        if self.gdb_stub != "off" and "kaslr" in self.boots_with.split():
            return ["gdb-kaslr", "warning", ANY, ANY]
        return ["", "", "", ""]

    def properties(self, **changes: Any) -> dict[str, Any]:
        """The org.kdlab.Kdlab1.VM properties kdlabd must export, with *changes*."""
        props = {
            "Name": self.name,
            "UUID": self.uuid,
            "State": self.state,
            "Owner": self.owner,
            "Cmdline": self.boots_with,
            "MemoryMiB": self.memory_mib,
            "VCPUs": self.vcpus,
            "Accel": "tcg",
            "Created": self.created_usec,
            "GdbStub": self.gdb_stub,
            "WaitingForDebugger": False,
            "KernelRelease": self.release,
            "Vmlinux": self.vmlinux,
            "KernelPath": self.kernel_path,
            "Tree": "",
            "Diagnosis": self.diagnosis,
            "Booted": self.booted_usec,
            "LastStop": self.last_stop,
            "OnPanic": self.on_panic,
            "Initramfs": "",
            "LatestDump": latest_dump(self),
            "Run": "",
            "RunRecording": "/",
            "Checkpoints": [],
            "Shares": dict(self.shares),
        }
        props.update(changes)
        return props


# The VMs every bus test starts with. Owner 1000 is "somebody else" for the
# unprivileged callers; "booted" belongs to nobody (65534).
FLEET = (
    FakeVM(
        "idle", "defined", 1000, "root=/dev/vda", "root=/dev/vda console=ttyS0 nokaslr"
    ),
    FakeVM(
        "booted",
        "stopped",
        NOBODY.uid,
        "quiet",
        "quiet console=ttyS0 nokaslr",
        memory_mib=512,
        created_usec=1_700_000_000_123_456,
    ),
    FakeVM(
        "busy", "running", 1000, "console=hvc0 kaslr", "console=hvc0 kaslr", vcpus=2
    ),
    FakeVM(
        "frozen",
        "paused",
        1000,
        "",
        "console=ttyS0 kdlab.shares=src",
        gdb_stub="off",
        shares=(("src", "/home/somebody/src"),),
    ),
    FakeVM(
        "linux-6.9-rc1",
        "defined",
        0,
        "root=/dev/vda rw",
        "root=/dev/vda rw console=ttyS0 nokaslr",
        gdb_stub="tcp:127.0.0.1:4321",
        memory_mib=1024,
        vcpus=4,
        release="6.9.0-rc1-kdlab",
        vmlinux="/home/dev/linux/vmlinux",
        kernel_path="/home/dev/linux/arch/x86/boot/bzImage",
    ),
)
VMS = {vm.name: vm for vm in FLEET}


@dataclass(frozen=True)
class FakeDump:
    """A complete dump in the test driver's dumps pool (the test driver cannot
    dump a domain): a volume of the pool, its file and kdlabd's sidecar."""

    vm: FakeVM
    created_usec: int = 1_700_000_100_000_000

    @property
    def id(self) -> str:
        return f"{self.vm.name}-20231114-224820"

    @property
    def volume(self) -> str:
        return f"{self.id}.core"

    @property
    def content(self) -> bytes:
        return elf_core(f"OSRELEASE={self.vm.release}\nBUILD-ID=00c0ffee\n")

    def record(self) -> DumpRecord:
        return DumpRecord(
            id=self.id,
            vm=self.vm.name,
            vm_uuid=self.vm.uuid,
            owner_uid=self.vm.owner,
            kernel_release=self.vm.release,
            vmlinux_hint=self.vm.vmlinux,
            reason=wire.DUMP_REASON_PANIC,
            headline="Kernel panic - not syncing: Attempted to kill init!",
            created_usec=self.created_usec,
            format=wire.DUMP_FORMAT_ELF,
            volume=self.volume,
            build_id="00c0ffee",
            vmcoreinfo=True,
            size=len(self.content),
            state=wire.DUMP_STATE_COMPLETE,
        )

    def properties(self) -> dict[str, Any]:
        """The org.kdlab.Kdlab1.Dump properties kdlabd must export."""
        return {
            "Id": self.id,
            "VM": self.vm.name,
            "VMUUID": self.vm.uuid,
            "Owner": self.vm.owner,
            "KernelRelease": self.vm.release,
            "BuildId": "00c0ffee",
            "VmlinuxHint": self.vm.vmlinux,
            "Reason": "panic",
            "Headline": "The kernel panicked.",  # not the console's line
            "Created": self.created_usec,
            "Size": len(self.content),
            "Format": "elf",
            "Vmcoreinfo": True,
            "Problem": "",
            "State": "complete",
        }


# The dumps every bus test starts with: one of root's VM, one of uid 1000's.
DUMPS = (FakeDump(VMS["linux-6.9-rc1"]), FakeDump(VMS["busy"]))


@dataclass(frozen=True)
class FakeRecording:
    """A complete recording in the test driver's recordings pool (the test
    driver cannot record): its log, its state file and kdlabd's sidecar."""

    vm: FakeVM
    created_usec: int = 1_700_000_200_000_000
    log: bytes = b"\x00\xe0\x20\x0c" + bytes(60)

    @property
    def id(self) -> str:
        return f"{self.vm.name}-rec"

    @property
    def volumes(self) -> dict[str, bytes]:
        return {f"{self.id}.rr": self.log, f"{self.id}.state": b"QFI\xfb"}

    def record(self) -> recording_files.RecordingRecord:
        return recording_files.RecordingRecord(
            id=self.id,
            vm=self.vm.name,
            vm_uuid=self.vm.uuid,
            owner_uid=self.vm.owner,
            kernel_release=self.vm.release,
            cmdline=self.vm.boots_with,
            qemu="QEMU 7.2.0 (/usr/bin/qemu-system-x86_64 sha256:00c0ffee)",
            fingerprint=(("kernel", "00c0ffee"),),
            created_usec=self.created_usec,
            instructions=1_000_000,
            seconds=2.5,
            ended=wire.RECORDING_ENDED_PANIC,
            state=wire.RECORDING_STATE_COMPLETE,
        )

    def properties(self) -> dict[str, Any]:
        """The org.kdlab.Kdlab1.Recording properties kdlabd must export."""
        record = self.record()
        return {
            "Id": self.id,
            "VM": self.vm.name,
            "VMUUID": self.vm.uuid,
            "Owner": self.vm.owner,
            "KernelRelease": self.vm.release,
            "Cmdline": self.vm.boots_with,
            "Qemu": record.qemu,
            "Instructions": 1_000_000,
            "Seconds": 2.5,
            "Ended": "panic",
            "Truncated": False,
            "Created": self.created_usec,
            "Size": sum(len(v) for v in self.volumes.values()),
            "State": "complete",
        }


# The recordings every bus test starts with: one of root's VM, one of uid 1000's.
RECORDINGS = (FakeRecording(VMS["linux-6.9-rc1"]), FakeRecording(VMS["busy"]))


def latest_dump(vm: FakeVM) -> str:
    """The LatestDump of *vm* with the standard :data:`DUMPS`."""
    paths = [wire.dump_path(d.id) for d in DUMPS if d.vm == vm]
    return paths[-1] if paths else wire.NO_DUMP_PATH


def defined_fleet(count: int, prefix: str = "vm") -> list[FakeVM]:
    """*count* defined VMs of root's, for tests and benchmarks of scale."""
    return [
        FakeVM(
            f"{prefix}-{i:04d}",
            "defined",
            0,
            "root=/dev/vda",
            "root=/dev/vda console=ttyS0 nokaslr",
        )
        for i in range(count)
    ]


# Domains that are not kdlab VMs: no prefix, or the prefix without kdlab's metadata.
FOREIGN_DOMAINS = ("plain", "kdlab-impostor")


def _foreign_domain(name: str) -> etree._Element:
    domain = etree.Element("domain", type="test")
    etree.SubElement(domain, "name").text = name
    etree.SubElement(domain, "memory", unit="MiB").text = "64"
    etree.SubElement(etree.SubElement(domain, "os"), "type").text = "hvm"
    return domain


def _dump_pool(dumps: Iterable[FakeDump], layout: Layout) -> etree._Element:
    """kdlabd's dumps pool with a volume per dump: the test driver lists
    volumes from the file, never from the directory."""
    pool = etree.Element("pool", type="dir")
    etree.SubElement(pool, "name").text = Config.dump_pool
    etree.SubElement(etree.SubElement(pool, "target"), "path").text = str(
        dump_pool_dir(layout)
    )
    for dump in dumps:
        volume = etree.SubElement(pool, "volume")
        etree.SubElement(volume, "name").text = dump.volume
        etree.SubElement(volume, "capacity", unit="bytes").text = str(len(dump.content))
    return pool


def _recording_pool(
    recordings: Iterable[FakeRecording], layout: Layout
) -> etree._Element:
    """kdlabd's recordings pool with the volumes of *recordings*."""
    pool = etree.Element("pool", type="dir")
    etree.SubElement(pool, "name").text = Config.recording_pool
    etree.SubElement(etree.SubElement(pool, "target"), "path").text = str(
        recording_pool_dir(layout)
    )
    for recording in recordings:
        for name, content in recording.volumes.items():
            volume = etree.SubElement(pool, "volume")
            etree.SubElement(volume, "name").text = name
            etree.SubElement(volume, "capacity", unit="bytes").text = str(len(content))
    return pool


def recording_pool_dir(layout: Layout) -> Path:
    return Config(state_dir=layout.state_dir).recording_pool_dir


def dump_pool_dir(layout: Layout) -> Path:
    """Where kdlabd's dumps pool is (kdlabd's default: STATE_DIR/dumps)."""
    return Config(state_dir=layout.state_dir).dump_pool_dir


def driver_xml(
    vms: Iterable[FakeVM],
    layout: Layout,
    dumps: Iterable[FakeDump] = (),
    recordings: Iterable[FakeRecording] = (),
) -> bytes:
    """A test driver ``<node>`` file holding *vms* plus :data:`FOREIGN_DOMAINS`,
    and kdlabd's dumps pool with *dumps*.

    The domains keep kdlab's XML as built (type ``qemu``: libvirt 9's test
    driver accepts it, keeps ``<metadata>`` and drops ``<qemu:commandline>``),
    plus a fixed ``<uuid>`` and the run state in the test driver's namespace
    (a domain in the file runs unless told otherwise).
    """
    node = etree.Element("node", nsmap={"test": TEST_NS})
    for vm in vms:
        domain = etree.fromstring(build_domain_xml(vm.spec(layout)).encode())
        uuid = etree.Element("uuid")
        uuid.text = vm.uuid
        named = domain.find("name")
        assert named is not None, "kdlab's domain XML has a <name>"
        named.addnext(uuid)
        if vm.booted_usec:
            metadata = domain.find("metadata")
            assert metadata is not None, "kdlab's domain XML has <metadata>"
            # As libvirt stores what virDomainSetMetadata was given.
            mark = etree.fromstring(boot_mark_xml(BootMark(vm.booted_usec)))
            mark.tag = f"{{{BOOT_NS}}}boot"
            metadata.append(mark)
        etree.SubElement(domain, f"{{{TEST_NS}}}runstate").text = str(
            int(RUNSTATES[vm.state])
        )
        node.append(domain)
    for name in FOREIGN_DOMAINS:
        node.append(_foreign_domain(name))
    node.append(_dump_pool(dumps, layout))
    node.append(_recording_pool(recordings, layout))
    return etree.tostring(
        node, pretty_print=True, xml_declaration=True, encoding="UTF-8"
    )


# --- kdlabd -------------------------------------------------------------------------


class Lab:
    """kdlabd on *bus*, serving *vms* from a test driver file in *workdir*."""

    def __init__(
        self,
        bus: PrivateBus,
        workdir: Path,
        vms: Iterable[FakeVM] = FLEET,
        dumps: Iterable[FakeDump] | None = None,
    ) -> None:
        self.vms = tuple(vms)
        # The standard dumps go with the standard VMs they are of.
        self.dumps = tuple(
            (d for d in DUMPS if d.vm in self.vms) if dumps is None else dumps
        )
        self.recordings = tuple(r for r in RECORDINGS if r.vm in self.vms)
        self.layout = Layout(workdir / "state", workdir / "run")
        self.driver = workdir / "testdriver.xml"
        self.daemon = Kdlabd(
            address=bus.address,
            libvirt_uri=f"test://{self.driver}",
            state_dir=self.layout.state_dir,
            runtime_dir=self.layout.runtime_dir,
            log_path=workdir / "kdlabd.log",
        )

    def populate(self) -> None:
        """Write the driver file and the host files a real libvirt would have left."""
        self.driver.write_bytes(
            driver_xml(self.vms, self.layout, self.dumps, self.recordings)
        )
        # libvirtd creates a directory pool's directory when it builds the pool;
        # the test driver keeps pools in memory and creates nothing.
        (self.layout.state_dir / "boot").mkdir(mode=0o711, parents=True, exist_ok=True)
        dumps = dump_pool_dir(self.layout)
        dumps.mkdir(mode=0o711, exist_ok=True)
        for dump in self.dumps:
            (dumps / dump.volume).write_bytes(dump.content)
            (dumps / f"{dump.id}.json").write_bytes(sidecar(dump.record()))
        kept = recording_pool_dir(self.layout)
        kept.mkdir(mode=0o711, exist_ok=True)
        for recording in self.recordings:
            for name, content in recording.volumes.items():
                (kept / name).write_bytes(content)
            (kept / f"{recording.id}.json").write_bytes(
                recording_files.sidecar(recording.record())
            )
        for vm in self.vms:
            if vm.booted:
                log = self.layout.console_log(vm.name)
                log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                log.write_text(f"console of {vm.name}\n")

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start kdlabd; it is ready when it owns its name (else: fail with its log)."""
        self.daemon.start(timeout=STARTUP_TIMEOUT, env=env)

    @contextlib.contextmanager
    def serving(self, env: dict[str, str] | None = None) -> Iterator[Lab]:
        """kdlabd serving a fresh driver file; stopped cleanly afterwards.

        *env* adds to its environment (KDLAB_TEST_HOLD_AT, ...). A kdlabd that
        does not come up is killed, not left running.
        """
        self.populate()
        try:
            self.start(env)
        except BaseException:
            if self.daemon.running:
                self.daemon.kill()
            raise
        yield self
        self.stop_cleanly()

    def stop_cleanly(self) -> None:
        """SIGTERM kdlabd: it must not have died on its own before, must exit 0
        at once and must never have logged a traceback."""
        self.daemon.stop()
        log = self.daemon.log()
        assert "Traceback" not in log, f"kdlabd logged a traceback:\n{log}"

    def vm_dir(self, name: str) -> Path:
        return self.layout.vm_dir(name)
