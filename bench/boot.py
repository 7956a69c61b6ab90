"""Boot benchmarks: kdlab's VMs against bare QEMU and plain libvirt, same files.

- ``boot_to_userspace``: ``kdlabctl start`` to the busybox initramfs's marker
  line against bare ``qemu-system-x86_64`` with the same kernel, initrd, command
  line, accel and memory; ``virsh start`` of the very same domain is measured
  alongside, so the table shows libvirt's share (``:libvirt``) and kdlab's own
  (``:kdlab_share``, kdlab against that virsh start).
- ``disk_boot_to_login``: a VM made by kdlab from a kdlab Debian image, booted to
  systemd's autologin prompt, against a hand-written libvirt domain on the same
  kernel, initramfs and image (its own qcow2 overlay).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape

from bench.lab import (
    BENCH_IMAGES,
    accel,
    bench_daemon,
    bench_image,
    bench_vm,
    ctl,
    layout,
    run,
    scratch,
    stop_vm,
    unique,
    wait_in_file,
    wait_inactive,
)
from bench.measure import INFO, Goal, Laps, Row, interleaved, row
from kdlabctl import initramfs
from tests.support import debian
from tests.support.daemon import Kdlabd
from tests.support.system import SYSTEM_LIBVIRT, remove_domain, virsh

MARKER = debian.DEFAULT_MARKER
MEMORY_MIB = 256
DISK_MEMORY_MIB = 512
PROMPT = "root@kdlab:~#"
VIRSH = ("virsh", "-c", SYSTEM_LIBVIRT)


def timed_boot(
    start: Callable[[], object],
    stop: Callable[[], object],
    *,
    log: Path,
    marker: str,
    laps: Laps,
    lap: str,
) -> float:
    """Seconds from *start* until *log* holds *marker*; *stop* follows, untimed.

    The log is removed first: a boot started outside kdlabd (virsh) has no
    kdlabd to rotate the last boot's log away.
    """
    log.unlink(missing_ok=True)
    began = time.perf_counter()
    start()
    laps.add(lap, time.perf_counter() - began)
    wait_in_file(log, marker.encode())
    took = time.perf_counter() - began
    stop()
    return took


def kdlab_boot(daemon: Kdlabd, name: str, marker: str, laps: Laps) -> float:
    wait_inactive(daemon, name)
    return timed_boot(
        lambda: ctl(daemon, "start", name),
        lambda: stop_vm(daemon, name),
        log=layout(daemon).console_log(name),
        marker=marker,
        laps=laps,
        lap="kdlabctl start",
    )


def _virsh_boot(domain: str, log: Path, marker: str, laps: Laps) -> float:
    return timed_boot(
        lambda: run([*VIRSH, "start", domain]),
        lambda: virsh("destroy", domain),
        log=log,
        marker=marker,
        laps=laps,
        lap="virsh start",
    )


def bare_qemu_command(
    kernel: Path, initrd: Path, cmdline: str, accelerator: str
) -> list[str]:
    """QEMU by hand, accelerated as kdlab's domain (KVM: the host's CPU, as
    kdlab's ``host-passthrough``)."""
    return [
        "qemu-system-x86_64",
        "-machine",
        f"pc,accel={accelerator}",
        *(["-cpu", "host"] if accelerator == "kvm" else []),
        "-m",
        str(MEMORY_MIB),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
    ]


def _bare_qemu_boot(command: list[str]) -> float:
    start = time.perf_counter()
    qemu = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert qemu.stdout is not None
    seen = b""
    try:
        while MARKER.encode() not in seen:
            ready, _, _ = select.select([qemu.stdout], [], [], 120)
            chunk = os.read(qemu.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                raise RuntimeError("bare QEMU ended before the marker")
            seen = seen[-4096:] + chunk
        return time.perf_counter() - start
    finally:
        qemu.kill()
        qemu.wait()


def _cmdline(daemon: Kdlabd, name: str) -> str:
    """The command line the VM boots with (kdlab's additions included)."""
    return str(json.loads(ctl(daemon, "show", name, "--json"))["cmdline"])


def marker_vm(
    daemon: Kdlabd, kernel: debian.CloudKernel, initrd: Path, *create_args: str
) -> contextlib.AbstractContextManager[str]:
    """A bench VM of Debian's *kernel* with the busybox *initrd* printing MARKER."""
    return bench_vm(
        daemon,
        "--kernel",
        str(kernel.vmlinuz),
        "--initrd",
        str(initrd),
        "--memory",
        str(MEMORY_MIB),
        *create_args,
    )


def boot_to_userspace(quick: bool) -> list[Row]:
    """``kdlabctl start`` to the userspace marker vs bare QEMU, same files and accel."""
    kernel = debian.cloud_kernel()
    initrd = debian.busybox_initramfs(MARKER)
    laps = Laps()
    with bench_daemon() as daemon, marker_vm(daemon, kernel, initrd) as name:
        accelerator = accel(daemon)
        bare = bare_qemu_command(
            kernel.vmlinuz, initrd, _cmdline(daemon, name), accelerator
        )
        log = layout(daemon).console_log(name)
        ours, theirs, libvirt = interleaved(
            5 if quick else 9,
            lambda: kdlab_boot(daemon, name, MARKER, laps),
            lambda: _bare_qemu_boot(bare),
            lambda: _virsh_boot(f"kdlab-{name}", log, MARKER, laps),
            warmup=1,
        )
    what = (
        f"Debian {kernel.release} + busybox initramfs, {accelerator.upper()}, "
        f"{MEMORY_MIB} MiB"
    )
    return [
        row(
            "boot_to_userspace",
            ours,
            theirs,
            baseline="bare qemu-system-x86_64",
            unit="s",
            goal=Goal("ratio <= 1.10", max_ratio=1.10),
            note=f"{what}; {laps.note('kdlabctl start')} of it",
        ),
        row(
            "boot_to_userspace:libvirt",
            libvirt,
            theirs,
            baseline="bare qemu-system-x86_64",
            unit="s",
            goal=INFO,
            note="virsh start of kdlab's own domain: what libvirt costs; "
            f"{laps.note('virsh start')} of it",
        ),
        row(
            "boot_to_userspace:kdlab_share",
            ours,
            libvirt,
            baseline="virsh start of the same domain",
            unit="s",
            goal=Goal("ratio <= 1.10", max_ratio=1.10),
            note="what kdlab adds to libvirt: kdlabctl, D-Bus, kdlabd",
        ),
    ]


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _ssh_forward(port: int) -> str:
    """QEMU's user-mode network on a virtio NIC, 127.0.0.1:*port* forwarded to
    the guest's port 22 (libvirt forwards ports only with passt, not here)."""
    args = (
        "-netdev",
        f"user,id=benchnet,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device",
        # A slot of its own: QEMU creates it before libvirt's devices, which
        # have theirs from slot 2 on.
        "virtio-net-pci,netdev=benchnet,addr=0x10",
    )
    values = "".join(f"<qemu:arg value='{escape(arg)}'/>" for arg in args)
    return f"\n  <qemu:commandline>{values}</qemu:commandline>"


def domain_xml(
    name: str,
    *,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    disk: Path,
    log: Path,
    accelerator: str,
    ssh_port: int | None = None,
) -> str:
    """A hand-written minimal domain: direct kernel boot, a virtio disk, a log;
    accelerated as kdlab's (KVM: the host's CPU, as kdlab's). With *ssh_port*,
    a user-mode NIC too, its port 22 forwarded from 127.0.0.1:*ssh_port*."""
    kvm = accelerator == "kvm"
    namespace = "" if ssh_port is None else f" xmlns:qemu='{QEMU_NS}'"
    network = "" if ssh_port is None else _ssh_forward(ssh_port)
    return f"""\
<domain type='{"kvm" if kvm else "qemu"}'{namespace}>
  <name>{name}</name>
  <memory unit='MiB'>{DISK_MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>{"<cpu mode='host-passthrough'/>" if kvm else ""}
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{escape(str(disk))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{escape(str(log))}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>{network}
</domain>
"""


def image_path(image: str) -> Path:
    """The file of the bench kdlabd's image *image*."""
    return Path(run([*VIRSH, "vol-path", "--pool", BENCH_IMAGES, image]).strip())


def define_by_hand(
    work: Path,
    kernel: Path,
    cmdline: str,
    image: Path,
    accelerator: str,
    *,
    ssh_port: int | None = None,
) -> tuple[str, Path]:
    """Define the hand-written domain on the same files; its name and log.

    With *ssh_port* (:func:`domain_xml`), its initramfs loads virtio_net too."""
    initrd = work / "initrd.img"
    modules = initramfs.find_modules_dir(kernel, None)
    assert modules is not None, f"no modules next to {kernel}"
    nic = () if ssh_port is None else ("virtio_net",)
    wanted = (*initramfs.DEFAULT_MODULES, *nic)
    initrd.write_bytes(initramfs.build(modules, wanted))
    initrd.chmod(0o644)
    overlay = work / "overlay.qcow2"
    run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(image),
            str(overlay),
        ]
    )
    name, log = unique("bench-raw"), work / "console.log"
    xml = work / "domain.xml"
    xml.write_text(
        domain_xml(
            name,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            disk=overlay,
            log=log,
            accelerator=accelerator,
            ssh_port=ssh_port,
        )
    )
    run([*VIRSH, "define", str(xml)])
    return name, log


def disk_boot_to_login(quick: bool) -> list[Row]:
    """A VM from a kdlab Debian image to its autologin prompt vs a hand-made domain."""
    kernel = debian.cloud_kernel()
    laps = Laps()
    with (
        bench_daemon() as daemon,
        bench_image(daemon) as image,
        bench_vm(
            daemon,
            "--kernel",
            str(kernel.vmlinuz),
            "--image",
            image,
            "--memory",
            str(DISK_MEMORY_MIB),
        ) as name,
        scratch() as work,
    ):
        accelerator = accel(daemon)
        domain, log = define_by_hand(
            work, kernel.vmlinuz, _cmdline(daemon, name), image_path(image), accelerator
        )
        try:
            ours, theirs = interleaved(
                3 if quick else 7,
                lambda: kdlab_boot(daemon, name, PROMPT, laps),
                lambda: _virsh_boot(domain, log, PROMPT, laps),
            )
        finally:
            remove_domain(domain)
    return [
        row(
            "disk_boot_to_login",
            ours,
            theirs,
            baseline="hand-written libvirt domain (virsh start)",
            unit="s",
            goal=Goal("ratio <= 1.10", max_ratio=1.10),
            note=f"bookworm image, Debian {kernel.release}, kdlabctl's initramfs, "
            f"{accelerator.upper()}, {DISK_MEMORY_MIB} MiB; "
            + laps.note("kdlabctl start", "virsh start"),
        )
    ]
