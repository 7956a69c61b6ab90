"""What a kdlab VM gives the kernel it boots, and what the kernel needs for it.

A VM boots from a whole-disk ext4 image on a virtio disk behind virtio-pci
(``root=/dev/vda``), or without one into kdlab's own initramfs; it prints on
its first serial port, powers off when the ACPI power button is pressed,
tells kdlabd of a panic (pvpanic) with the VMCOREINFO a dump needs (QEMU's
fw_cfg), runs ``kdlabctl exec``'s commands through kdlab's agent on a
virtio-serial port, and mounts shared directories (virtiofs). The config
check asks for these drivers, kdlab's initramfs loads them when they are
modules, and the boot diagnosis names them when a boot lacked them: one
table serves all three.
"""

from __future__ import annotations

ROOT_DEVICE = "/dev/vda"
"""The root of a VM booted from an image: its first disk, a whole-disk filesystem."""
ROOT_FS = "ext4"
"""What kdlab's images hold, and what a root without ``rootfstype=`` is taken for."""
SERIAL_CONSOLE = "ttyS0"
"""Where the kernel must print: kdlab logs the first serial port."""

# By CONFIG_ option (without CONFIG_) and module name, in load order.
ROOT_DISK_DRIVERS = {"VIRTIO_PCI": "virtio_pci", "VIRTIO_BLK": "virtio_blk"}
"""What a virtio root disk needs: without them the kernel sees no disk."""
POWER_BUTTON_DRIVERS = {"ACPI_BUTTON": "button", "INPUT_EVDEV": "evdev"}
"""What ``kdlabctl stop`` needs: systemd-logind reads the ACPI power button as
an input event from ``/dev/input``."""
DUMP_DRIVERS = {"FW_CFG_SYSFS": "qemu_fw_cfg", "PVPANIC_MMIO": "pvpanic_mmio"}
"""What a usable dump needs of the guest: ``qemu_fw_cfg`` hands QEMU's
``vmcoreinfo`` device the kernel's VMCOREINFO (where drgn and crash find the
kernel's layout and KASLR offset), and ``pvpanic_mmio`` binds QEMU's ISA
pvpanic device (ACPI ``QEMU0001``, an I/O port despite the name) to tell
kdlabd of a panic at once."""
DUMP_CORE = ("CRASH_CORE", "VMCORE_INFO")
"""The kernel's VMCOREINFO itself: ``CRASH_CORE``, ``VMCORE_INFO`` since Linux
6.9; neither has a prompt, ``PROC_KCORE`` (or ``KEXEC``) selects it."""
AGENT_DRIVERS = {"VIRTIO_CONSOLE": "virtio_console"}
"""What ``kdlabctl exec`` needs: kdlab's agent talks to kdlabd over a
virtio-serial port (:data:`kdlab.agent.PORT_NAME`)."""
SHARE_DRIVERS = {"FUSE_FS": "fuse", "VIRTIO_FS": "virtiofs"}
"""What a shared directory needs: virtiofs, a FUSE filesystem on a virtio
device."""
SHARES_PARAMETER = "kdlab.shares"
"""The kernel command line's ``kdlab.shares=TAG,...``: the tags of the VM's
shared directories, which kdlab's initramfs mounts at
``SHARES_DIRECTORY/TAG``."""
SHARES_DIRECTORY = "/mnt"
"""Where kdlab's initramfs mounts the shares: ``/mnt/TAG``."""
