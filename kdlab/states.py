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
