"""Domain XML for kdlab VMs, built and parsed without a libvirt connection.

:func:`build_domain_xml` is a pure function of a :class:`VMSpec` (golden-file
tested and validated against libvirt's RelaxNG schema). :func:`parse_domain_xml`
reads a spec back from a defined domain, so libvirt stays kdlab's only database.
"""

from __future__ import annotations

import json
from pathlib import Path

from lxml import etree

from kdlab.agent import PORT_NAME as AGENT_PORT
from kdlab.wire import ON_PANIC_DUMP_AND_STOP, RUN_RECORD
from kdlabd.core.models import (
    Accel,
    Backing,
    BootMark,
    DebugSettings,
    Disk,
    ImageFormat,
    Run,
    RunFiles,
    Share,
    VMSpec,
)

DOMAIN_PREFIX = "kdlab-"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
KDLAB_NS = "https://kdlab.org/xmlns/domain/1"
KDLAB_PREFIX = "kdlab"
GDB_CHARDEV_ID = "kdlab-gdb"
RR_STATE_DRIVE_ID = "kdlab-rr-state"
RR_START_SNAPSHOT = "kdlab-start"
"""The snapshot QEMU takes as a recording begins and loads as a replay begins."""
SERIAL_ALIAS = "serial0"
SERIAL_CHARDEV = "charserial0"
"""libvirt's id of the first serial port's chardev (``-chardev pty,id=...``)."""
KERNEL_PATH_ATTRIBUTE = "source"
"""The attribute of ``<kdlab:kernel>`` holding the spec's *kernel_path*; the name
defined domains already store it under, so it stays."""

BOOT_NS = "https://kdlab.org/xmlns/boot/1"
"""The namespace of the boot mark: an element of its own in ``<metadata>``, so
kdlabd sets it on a running domain (virDomainSetMetadata) without touching
the spec's ``<kdlab:vm>``."""
BOOT_PREFIX = "kdlab-boot"

_Q = f"{{{QEMU_NS}}}"
_K = f"{{{KDLAB_NS}}}"


def domain_name(vm_name: str) -> str:
    """The libvirt domain name of the kdlab VM *vm_name*."""
    return DOMAIN_PREFIX + vm_name


def qemu_option_value(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax (',' doubles)."""
    return value.replace(",", ",,")


def gdbstub_args(spec: VMSpec) -> list[str]:
    """QEMU arguments for the gdbstub; empty when it is off.

    libvirt has no element for a gdbstub, so it goes into
    ``<qemu:commandline>``. The unix socket is the default and lives in a
    directory only root and the QEMU user may enter. A TCP listener is only
    ever on 127.0.0.1: any local user could otherwise read and write guest
    memory.
    """
    if not spec.debug.gdb:
        return []
    if spec.debug.gdb_tcp_port is not None:
        chardev = (
            f"socket,id={GDB_CHARDEV_ID},host=127.0.0.1,port={spec.debug.gdb_tcp_port}"
        )
    else:
        path = qemu_option_value(str(spec.gdb_socket))
        chardev = f"socket,id={GDB_CHARDEV_ID},path={path}"
    return [
        "-chardev",
        f"{chardev},server=on,wait=off",
        "-gdb",
        f"chardev:{GDB_CHARDEV_ID}",
    ]


def _node_indexes(disks: tuple[Disk, ...]) -> list[int]:
    """libvirt's index of each disk's top node (``libvirt-N-format``): it
    numbers the images of the disks' chains in order, top first."""
    indexes, n = [], 1
    for disk in disks:
        indexes.append(n)
        n += 2 if disk.base is not None else 1
    return indexes


def disk_alias(index: int) -> str:
    """libvirt's alias of the guest device of the *index*-th virtio disk."""
    return f"virtio-disk{index}"


def _disk_args(disks: tuple[Disk, ...], files: RunFiles) -> list[str]:
    """A recorded disk: QEMU's blkreplay driver (which libvirt cannot
    express) on the recording's own qcow2, whose backing is libvirt's node
    of the VM's disk: libvirt still opens and labels the VM's files, the
    guest device reads through blkreplay (override in :func:`_run_override`)
    and the run's writes go to the recording, never to the VM's disk."""
    overlays = dict(files.disks)
    args = []
    for disk, index in zip(disks, _node_indexes(disks), strict=True):
        node = f"kdlab-rr-{disk.target}"
        nodes = [
            {"driver": "file", "node-name": f"{node}-file",
             "filename": str(overlays[disk.target])},
            {"driver": "qcow2", "node-name": f"{node}-top", "file": f"{node}-file",
             "backing": f"libvirt-{index}-format"},
            {"driver": "blkreplay", "node-name": node, "image": f"{node}-top"},
        ]  # fmt: skip
        for blockdev in nodes:
            args += ["-blockdev", json.dumps(blockdev, separators=(",", ":"))]
    return args


def run_args(run: Run, files: RunFiles, disks: tuple[Disk, ...] = ()) -> list[str]:
    """QEMU arguments of a recording or replaying boot (libvirt has no
    element for QEMU's record/replay, so they go into ``<qemu:commandline>``).

    ``-serial chardev:`` registers libvirt's serial chardev with QEMU's
    record/replay: QEMU 7.2 records only chardevs reached through the
    legacy option, and console input must be in the log. The snapshot of
    the run's start goes to a qcow2 no device sees (the state drive).
    The APIC's vapic option (a TCG speed-up for Windows guests) is off: with
    it, QEMU 7.2 deadlocks loading a snapshot taken during a replay (the
    reverse-stepi after kdlabd's periodic snapshot hung QEMU every time).
    A recording and its replays have the domain's UUID in common (libvirt's
    ``-uuid``, in the SMBIOS table the guest reads): replays run in the VM
    that recorded.
    """
    rr = "record" if run.mode == RUN_RECORD else "replay"
    log = qemu_option_value(str(files.log))
    state = qemu_option_value(str(files.state))
    return [
        "-serial",
        f"chardev:{SERIAL_CHARDEV}",
        "-chardev",
        "null,id=kdlab-serial-unused",
        "-global",
        "apic.vapic=off",
        "-icount",
        f"shift=auto,rr={rr},rrfile={log},rrsnapshot={RR_START_SNAPSHOT}",
        "-drive",
        f"file={state},if=none,id={RR_STATE_DRIVE_ID},format=qcow2",
        *_disk_args(disks, files),
    ]


def _run_override(root: etree._Element, disks: tuple[Disk, ...] = ()) -> None:
    """Move libvirt's own serial device off its chardev (to COM2, on a null
    chardev): ``-serial chardev:`` (see :func:`run_args`) makes COM1 on it,
    so libvirt's console and log keep working."""
    override = _sub(root, _Q + "override")
    device = _sub(override, _Q + "device", alias=SERIAL_ALIAS)
    frontend = _sub(device, _Q + "frontend")
    _sub(
        frontend,
        _Q + "property",
        name="chardev",
        type="string",
        value="kdlab-serial-unused",
    )
    _sub(frontend, _Q + "property", name="index", type="unsigned", value="1")
    for index, disk in enumerate(disks):
        device = _sub(override, _Q + "device", alias=disk_alias(index))
        frontend = _sub(device, _Q + "frontend")
        value = f"kdlab-rr-{disk.target}"
        _sub(frontend, _Q + "property", name="drive", type="string", value=value)


def _sub(
    parent: etree._Element, tag: str, text: str | None = None, **attrib: str
) -> etree._Element:
    element = etree.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def _metadata(parent: etree._Element, spec: VMSpec) -> None:
    vm = etree.SubElement(
        _sub(parent, "metadata"), _K + "vm", nsmap={KDLAB_PREFIX: KDLAB_NS}
    )
    _sub(vm, _K + "name", spec.name)
    _sub(vm, _K + "owner", uid=str(spec.owner_uid))
    _sub(vm, _K + "created", usec=str(spec.created_usec))
    _sub(vm, _K + "cmdline", spec.cmdline)
    _sub(vm, _K + "accel", spec.accel.value)
    debug = _sub(vm, _K + "debug", gdb="yes" if spec.debug.gdb else "no")
    if spec.debug.gdb_tcp_port is not None:
        debug.set("tcp-port", str(spec.debug.gdb_tcp_port))
    _sub(vm, _K + "gdb-socket", str(spec.gdb_socket))
    if spec.agent_socket is not None:
        _sub(vm, _K + "agent-socket", str(spec.agent_socket))
    for disk in spec.disks:
        _sub(vm, _K + "disk", target=disk.target, image=disk.base_image)
    kernel = _sub(vm, _K + "kernel", release=spec.release)
    if spec.kernel_path:
        kernel.set(KERNEL_PATH_ATTRIBUTE, spec.kernel_path)
    if spec.vmlinux:
        kernel.set("vmlinux", spec.vmlinux)
    if spec.tree:
        kernel.set("tree", spec.tree)
    _sub(vm, _K + "on-panic", spec.on_panic)
    if spec.initramfs:
        _sub(vm, _K + "initramfs", spec.initramfs)
    for share in spec.shares:
        etree.SubElement(vm, _K + "share", {"tag": share.tag, "dir": share.directory})


def _os(parent: etree._Element, spec: VMSpec) -> None:
    os_el = _sub(parent, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    _sub(os_el, "kernel", str(spec.kernel))
    if spec.initrd is not None:
        _sub(os_el, "initrd", str(spec.initrd))
    _sub(os_el, "cmdline", spec.effective_cmdline)


def _disk(devices: etree._Element, disk: Disk) -> None:
    element = _sub(devices, "disk", type="file", device="disk")
    _sub(element, "driver", name="qemu", type="qcow2", discard="unmap")
    _sub(element, "source", file=str(disk.path))
    # The whole chain is written out, each format stated and the end
    # marked, so nothing is probed from a header: a base whose bytes
    # changed could otherwise add a link to any file on the host.
    # (A disk defined before kdlab wrote chains keeps libvirt's default.)
    if disk.base is not None:
        chain = _sub(element, "backingStore", type="file")
        _sub(chain, "format", type=disk.base.format.value)
        _sub(chain, "source", file=str(disk.base.path))
        _sub(chain, "backingStore")
    elif not disk.base_image:
        _sub(element, "backingStore")
    _sub(element, "target", dev=disk.target, bus="virtio")


def disk_xml(disk: Disk) -> str:
    """The ``<disk>`` element of *disk* alone (to plug it into a running VM)."""
    devices = etree.Element("devices")
    _disk(devices, disk)
    return etree.tostring(devices[0], encoding="unicode")


def _filesystem(devices: etree._Element, share: Share) -> None:
    """A share: QEMU's vhost-user-fs device on the socket of an externally
    started virtiofsd (the owner's, see VMService.serve_shares); libvirt
    starts no virtiofsd of its own and leaves the socket as it is."""
    element = _sub(devices, "filesystem", type="mount")
    _sub(element, "driver", type="virtiofs", queue="1024")
    _sub(element, "source", socket=str(share.socket))
    _sub(element, "target", dir=share.tag)


def _devices(parent: etree._Element, spec: VMSpec, *, agent: bool = True) -> None:
    devices = _sub(parent, "devices")
    for disk in spec.disks:
        _disk(devices, disk)
    for share in spec.shares:
        _filesystem(devices, share)
    serial = _sub(devices, "serial", type="pty")
    # append='off': the file holds exactly one boot; kdlabd rotates it before start.
    _sub(serial, "log", file=str(spec.console_log), append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    # Without these libvirt adds a USB controller and a balloon: slower boots, no use.
    _sub(devices, "controller", type="usb", model="none")
    _sub(devices, "memballoon", model="none")
    if agent and spec.agent_socket is not None:
        # kdlab's exec channel: a virtio-serial port the guest's agent opens
        # as /dev/virtio-ports/org.kdlab.agent.0; QEMU listens on the host
        # side, where kdlabd alone connects (kdlabd.core.execs).
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "source", mode="bind", path=str(spec.agent_socket))
        _sub(channel, "target", type="virtio", name=AGENT_PORT)
    # ISA pvpanic (ACPI QEMU0001, driven by Linux's pvpanic-mmio): the kernel
    # reports its panic to QEMU, which libvirt turns into a crashed event.
    _sub(devices, "panic", model="isa")


def build_domain_xml(
    spec: VMSpec,
    uuid: str | None = None,
    *,
    run: tuple[Run, RunFiles] | None = None,
    mark: BootMark | None = None,
) -> str:
    """The libvirt domain XML of *spec*: direct kernel boot, serial console, gdbstub.

    *uuid* is the domain's own when it is redefined: libvirt refuses a
    definition that would give an existing name another UUID. With *run*
    it is the live definition of one recording or replaying boot (marked
    with *mark*), never defined.
    """
    domain_type = "kvm" if spec.accel is Accel.KVM else "qemu"
    root = etree.Element("domain", type=domain_type, nsmap={"qemu": QEMU_NS})
    _sub(root, "name", domain_name(spec.name))
    if uuid is not None:
        _sub(root, "uuid", uuid)
    _sub(root, "title", f"kdlab VM {spec.name}")
    _metadata(root, spec)
    _sub(root, "memory", str(spec.memory_mib), unit="MiB")
    if spec.shares:
        # vhost-user: virtiofsd reads and writes the guest's memory itself.
        backing = _sub(root, "memoryBacking")
        _sub(backing, "source", type="memfd")
        _sub(backing, "access", mode="shared")
    _sub(root, "vcpu", str(spec.vcpus))
    _os(root, spec)
    features = _sub(root, "features")
    _sub(features, "acpi")  # graceful shutdown is an ACPI power-button press
    # The guest tells QEMU where its VMCOREINFO is (qemu_fw_cfg), so a dump
    # carries it and drgn/crash find the kernel's layout (and KASLR offset).
    _sub(features, "vmcoreinfo", state="on")
    if spec.accel is Accel.KVM:
        _sub(root, "cpu", mode="host-passthrough")
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "restart")
    # A panic (pvpanic) leaves QEMU running with the CPUs stopped, for kdlabd
    # to write a dump and then stop or keep the VM as its OnPanic says.
    _sub(root, "on_crash", "preserve")
    # A recorded or replayed run has no exec channel: QEMU cannot record what
    # comes in on it, and a replay with the device diverges (kdlabd refuses
    # exec during a run anyway).
    _devices(root, spec, agent=run is None)
    args = gdbstub_args(spec)
    if run is not None:
        args += run_args(*run, spec.disks)
    if args:
        commandline = _sub(root, _Q + "commandline")
        for arg in args:
            _sub(commandline, _Q + "arg", value=arg)
    if run is not None:
        _run_override(root, spec.disks)
    if mark is not None:
        meta = root.find("metadata")
        assert meta is not None
        attributes = {
            str(k): str(v) for k, v in etree.fromstring(boot_mark_xml(mark)).items()
        }
        etree.SubElement(
            meta, f"{{{BOOT_NS}}}boot", attributes, nsmap={BOOT_PREFIX: BOOT_NS}
        )
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def boot_mark_xml(mark: BootMark) -> str:
    """*mark* (see :class:`BootMark`) as virDomainSetMetadata takes it: an
    element without its namespace, which libvirt puts in :data:`BOOT_NS`."""
    attributes = {"started": str(mark.started_usec)}
    if mark.stop_requested:
        attributes["stop"] = "requested"
    if mark.run is not None:
        attributes["run"] = mark.run.mode
        attributes["recording"] = mark.run.recording
    return etree.tostring(etree.Element("boot", attributes), encoding="unicode")


def parse_boot_mark(xml: str) -> BootMark:
    """The boot mark in a domain's XML; an empty mark when there is none."""
    element = etree.fromstring(xml.encode()).find(f"metadata/{{{BOOT_NS}}}boot")
    if element is None:
        return BootMark()
    mode, recording = element.get("run"), element.get("recording")
    return BootMark(
        started_usec=int(element.get("started", "0")),
        stop_requested=element.get("stop") == "requested",
        run=Run(mode, recording) if mode and recording else None,
    )


class NotKdlabDomain(ValueError):
    """The domain XML has no kdlab metadata: it is not one of kdlab's VMs."""


def _text(element: etree._Element, path: str) -> str | None:
    found = element.find(path)
    return None if found is None else (found.text or "")


def _memory_mib(root: etree._Element) -> int:
    memory = root.find("memory")
    if memory is None or memory.text is None:
        raise NotKdlabDomain("domain has no <memory>")
    scale = {
        "KiB": 1024,
        "k": 1024,
        "MiB": 1024**2,
        "M": 1024**2,
        "GiB": 1024**3,
        "G": 1024**3,
    }
    unit = memory.get("unit", "KiB")
    return int(memory.text) * scale.get(unit, 1024) // 1024**2


def parse_domain_xml(xml: str) -> VMSpec:
    """Read a kdlab VM's spec back from its (live or inactive) domain XML."""
    root = etree.fromstring(xml.encode())
    meta = root.find(f"metadata/{_K}vm")
    if meta is None:
        raise NotKdlabDomain("domain carries no kdlab metadata")
    kernel = _text(root, "os/kernel")
    initrd = _text(root, "os/initrd")
    log = root.find("devices/serial/log")
    debug = meta.find(_K + "debug")
    port = None if debug is None else debug.get("tcp-port")
    owner = meta.find(_K + "owner")
    created = meta.find(_K + "created")
    kernel_meta = meta.find(_K + "kernel")
    hints = {} if kernel_meta is None else {k: str(v) for k, v in kernel_meta.items()}
    return VMSpec(
        name=_text(meta, _K + "name") or "",
        owner_uid=int(owner.get("uid", "0")) if owner is not None else 0,
        kernel=Path(kernel or ""),
        initrd=Path(initrd) if initrd else None,
        cmdline=_text(meta, _K + "cmdline") or "",
        memory_mib=_memory_mib(root),
        vcpus=int(_text(root, "vcpu") or "1"),
        accel=Accel(_text(meta, _K + "accel") or Accel.TCG),
        console_log=Path(log.get("file", "")) if log is not None else Path(),
        gdb_socket=Path(_text(meta, _K + "gdb-socket") or ""),
        agent_socket=Path(agent)
        if (agent := _text(meta, _K + "agent-socket"))
        else None,
        debug=DebugSettings(
            gdb=debug is None or debug.get("gdb") == "yes",
            gdb_tcp_port=int(port) if port else None,
        ),
        created_usec=int(created.get("usec", "0")) if created is not None else 0,
        release=hints.get("release", ""),
        vmlinux=hints.get("vmlinux", ""),
        kernel_path=hints.get(KERNEL_PATH_ATTRIBUTE, ""),
        tree=hints.get("tree", ""),
        disks=_disks(root, meta),
        on_panic=_text(meta, _K + "on-panic") or ON_PANIC_DUMP_AND_STOP,
        initramfs=_text(meta, _K + "initramfs") or "",
        shares=_shares(root, meta),
    )


def _shares(root: etree._Element, meta: etree._Element) -> tuple[Share, ...]:
    """The shares of kdlab's metadata, with the sockets of their devices."""
    sockets = {}
    for element in root.iterfind("devices/filesystem"):
        source, target = element.find("source"), element.find("target")
        if source is not None and target is not None:
            sockets[target.get("dir", "")] = source.get("socket", "")
    return tuple(
        Share(tag, element.get("dir", ""), Path(sockets.get(tag, "")))
        for element in meta.iterfind(_K + "share")
        if (tag := element.get("tag", ""))
    )


def _disks(root: etree._Element, meta: etree._Element) -> tuple[Disk, ...]:
    images = {d.get("target"): d.get("image", "") for d in meta.iterfind(_K + "disk")}
    disks = []
    for element in root.iterfind("devices/disk"):
        source = element.find("source")
        target = element.find("target")
        if source is None or target is None:
            continue
        dev = target.get("dev", "")
        base = None
        base_source = element.find("backingStore/source")
        base_format = element.find("backingStore/format")
        if base_source is not None and base_format is not None:
            base = Backing(
                Path(base_source.get("file", "")),
                ImageFormat(base_format.get("type", "raw")),
            )
        disks.append(
            Disk(Path(source.get("file", "")), dev, images.get(dev) or "", base)
        )
    return tuple(disks)
