"""Block devices: what the kernel printed of the disks and partitions it found."""

from __future__ import annotations

import re
from dataclasses import dataclass

# printk_all_partitions(): "fe00      65536 vda " (the device number as
# %02x%02x, or %03x:%05x when larger), partitions indented, each disk followed by
# " driver: NAME" or " (driver?)", which 6.1 prints as a line of its own.
PARTITION_ROW = re.compile(
    r"^(?:[0-9a-f]{4}|[0-9a-f]{3}:[0-9a-f]{5})\s+(?P<kib>\d+)\s+(?P<name>[a-z]\S*)"
)
PARTITION_LIST = (
    'Please append a correct "root=" boot option; here are the available partitions:',
    "List of all partitions:",
)
# A disk's partition scan: " vda: vda1 vda2 < vda5 >".
PARTITION_SCAN = re.compile(r"^(?P<disk>[a-z][a-z0-9]*): (?P<parts>[a-z0-9<> ]+)$")
# A driver naming its disk: "virtio_blk virtio0: [vda] 131072 512-byte logical
# blocks (67.1 MB/64.0 MiB)"; sd prints the same.
DISK_PROBED = re.compile(r"\[(?P<name>[a-z][a-z0-9]*)\] \d+ \d+-byte logical blocks")
DEVICE_NAME = re.compile(r"[a-z][a-z0-9]*")
PSEUDO_DISK = re.compile(r"(?:loop|ram|zram|nbd|sr|fd|nullb)\d+")


def partition_of(name: str, disk: str) -> bool:
    """Whether *name* is a partition of *disk*: vda1 of vda, nvme0n1p2 of nvme0n1."""
    rest = name.removeprefix(disk)
    if rest == name or not rest:
        return False
    if disk[-1].isdigit():
        return rest.startswith("p") and rest[1:].isdigit()
    return rest.isdigit()


@dataclass(frozen=True)
class Devices:
    """Block devices a boot showed, with sizes in KiB where the kernel gave them."""

    sizes: dict[str, int]

    def __contains__(self, name: object) -> bool:
        return name in self.sizes

    def disks(self) -> list[str]:
        return [
            n for n in self.sizes if not any(partition_of(n, d) for d in self.sizes)
        ]

    def partitions(self, disk: str) -> list[str]:
        return [n for n in self.sizes if partition_of(n, disk)]

    def best_root(self, disk: str) -> str:
        """The device to mount as root on *disk*: its largest partition, or itself.

        Largest, not first: cloud images keep small boot partitions (vda14,
        vda15) beside the root.
        """
        parts = self.partitions(disk)
        return max(parts, key=lambda p: self.sizes[p]) if parts else disk
