"""The states clients see, as the bus spells them (never libvirt's integers)."""

from __future__ import annotations

import enum


class VMState(enum.StrEnum):
    """A VM's state as clients see it (never libvirt's integers)."""

    DEFINED = "defined"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"

    @property
    def active(self) -> bool:
        """Whether a QEMU process exists for the VM."""
        return self in (VMState.RUNNING, VMState.PAUSED, VMState.STOPPING)

    @property
    def off(self) -> bool:
        """No QEMU runs and none is being started: the boot's log is whole,
        and there is nothing to attach to."""
        return self in (VMState.DEFINED, VMState.STOPPED, VMState.CRASHED)


class JobState(enum.StrEnum):
    """A job's state: running until it succeeds, fails or is cancelled."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StopCause(enum.StrEnum):
    """Why a VM's last boot ended, as the VM's ``LastStop`` property spells it."""

    NONE = ""
    """The VM runs, or kdlabd started no boot of it (see ``Booted``)."""
    REQUESTED = "requested"
    """A Stop call (kdlabctl stop) powered it off."""
    GUEST = "guest"
    """The guest powered itself off (poweroff, halt, ``init`` ending in a
    poweroff)."""
    CRASHED = "crashed"
    """QEMU or the guest crashed (the hypervisor says so)."""
    KILLED = "killed"
    """Someone else pulled the plug (another libvirt client's destroy)."""
    UNKNOWN = "unknown"
    """It stopped without a Stop call and the hypervisor does not say how
    (libvirtd restarted since, for example)."""

    @property
    def unexpected(self) -> bool:
        """Whether the boot ended without anyone asking kdlab to stop it."""
        return self not in (StopCause.NONE, StopCause.REQUESTED)
