"""kdlabd's limits: how much of the host one request, and one user, may take.

kdlabd is shared by everyone on a workstation; without limits one member could
ask for more memory than the host has, disks of many TiB, or start imports and
builds until the host gives up. Each limit is a key of kdlabd's configuration
(``max_`` + the field name, see :mod:`kdlabd.config`); a request over one is
refused with :class:`~kdlab.errors.LimitExceeded`, whose message names the
limit, its value and its key. Values that are wrong whatever the configuration
(0 vCPUs, a disk under 1 MiB) stay :mod:`kdlabd.core.validate`'s
InvalidArgument.

Counts are per uid and root is counted like anyone: a limit that root's own
scripts hit is one to raise in the configuration, not to bypass silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kdlab.errors import LimitExceeded
from kdlabd.core import validate

GIB = 1 << 30


@dataclass(frozen=True)
class HostResources:
    """What the hypervisor's host has: the ceiling for a VM's memory and vCPUs."""

    memory_mib: int
    cpus: int


@dataclass(frozen=True)
class Limits:
    """The limits in force. Field ``x`` is configured by the key ``max_x``."""

    memory_mib: int = validate.MEMORY_MIB_RANGE[1]
    vcpus: int = validate.VCPUS_RANGE[1]
    disk_gib: int = 256
    extra_disks: int = 8
    vms_per_user: int = 32
    jobs_per_user: int = 4
    console_viewers_per_vm: int = 16
    console_viewers_per_user: int = 64
    execs_per_vm: int = 32
    """Commands running at once in one VM's guest (kdlabctl exec)."""
    dumps_per_vm: int = 3
    """Automatic (panic) dumps kept per VM: a new one drops the oldest."""
    dump_gib_per_user: int = 64
    """What one uid's dumps may take, in GiB, the one being written included."""

    @property
    def disk_bytes(self) -> int:
        """The largest image or VM disk, in bytes (virtual size)."""
        return self.disk_gib * GIB

    def within_host(self, host: HostResources) -> Limits:
        """These limits, with memory and vCPUs at most what *host* has."""
        return dataclasses.replace(
            self,
            memory_mib=min(self.memory_mib, host.memory_mib),
            vcpus=min(self.vcpus, host.cpus),
        )

    def memory(self, mib: int) -> int:
        return _at_most(
            mib, self.memory_mib, what="memory", key="memory_mib", unit="MiB"
        )

    def cpus(self, count: int) -> int:
        return _at_most(count, self.vcpus, what="number of vCPUs", key="vcpus")

    def extra(self, count: int) -> int:
        return _at_most(
            count, self.extra_disks, what="number of extra disks", key="extra_disks"
        )

    def disk(self, size: int, what: str) -> int:
        """*size* bytes of an image or VM disk (*what*), at most ``max_disk_gib``."""
        if size > self.disk_bytes:
            raise LimitExceeded(
                f"{what} of {_gib(size)} is over the limit of {self.disk_gib} GiB "
                "(configuration key max_disk_gib): ask for less"
            )
        return size

    def room_for_vm(self, uid: int, owned: int) -> None:
        """Refuse uid's new VM when it owns (or is creating) *owned* already."""
        _room(
            uid,
            owned,
            self.vms_per_user,
            what="VMs",
            key="vms_per_user",
            hint="delete one first (kdlabctl delete NAME)",
        )

    def room_for_job(self, uid: int, running: int) -> None:
        """Refuse uid's new import or build while *running* of its jobs run."""
        _room(
            uid,
            running,
            self.jobs_per_user,
            what="running imports and builds",
            key="jobs_per_user",
            hint="wait for one to end, or cancel it",
        )

    def room_for_checkpoint(self, uid: int, used: int, adding: int) -> None:
        """Refuse uid's new checkpoint of *adding* bytes when its checkpoints
        hold *used* bytes: together they count against ``max_disk_gib``."""
        if used + adding > self.disk_bytes:
            raise LimitExceeded(
                f"uid {uid}'s checkpoints hold {_gib(used)}; one more of "
                f"{_gib(adding)} is over the limit of {self.disk_gib} GiB "
                "(configuration key max_disk_gib): delete one first "
                "(kdlabctl checkpoint delete NAME TAG)"
            )

    def room_for_viewer(self, vm: str, on_vm: int, uid: int, mine: int) -> None:
        """Refuse a console viewer of *vm*, which has *on_vm*, for uid with *mine*."""
        if on_vm >= self.console_viewers_per_vm:
            raise LimitExceeded(
                f"VM {vm!r} has {on_vm} console viewers; the limit is "
                f"{self.console_viewers_per_vm} (configuration key "
                "max_console_viewers_per_vm): detach one first"
            )
        _room(
            uid,
            mine,
            self.console_viewers_per_user,
            what="console viewers",
            key="console_viewers_per_user",
            hint="detach one first",
        )

    def room_for_exec(self, vm: str, running: int) -> None:
        """Refuse another command in *vm*, which runs *running* already."""
        if running >= self.execs_per_vm:
            raise LimitExceeded(
                f"VM {vm!r} runs {running} commands from kdlabctl exec; the "
                f"limit is {self.execs_per_vm} (configuration key "
                "max_execs_per_vm): wait for one to end"
            )


def _at_most(asked: int, limit: int, *, what: str, key: str, unit: str = "") -> int:
    if asked > limit:
        unit = f" {unit}" if unit else ""
        raise LimitExceeded(
            f"{what} {asked}{unit} is over the limit of {limit}{unit} "
            f"(configuration key max_{key}): ask for less"
        )
    return asked


def _room(uid: int, have: int, limit: int, *, what: str, key: str, hint: str) -> None:
    if have >= limit:
        raise LimitExceeded(
            f"uid {uid} has {have} {what}; the limit is {limit} (configuration key "
            f"max_{key}): {hint}"
        )


def _gib(size: int) -> str:
    """Bytes as GiB, exact enough to compare with a limit in GiB."""
    return f"{size} bytes ({size / GIB:.1f} GiB)"
