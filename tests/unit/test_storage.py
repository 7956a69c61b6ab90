"""kdlabd.virt.storage logic that needs no libvirtd: when a refresh may fail.

libvirt refuses to refresh a pool while one of its volumes is being made
("pool has asynchronous jobs running"); the pool stays active and its list
is current. A refresh that fails for a real reason stops the pool. The pool
here is a stand-in with libvirt's behaviour in those two cases.
"""

from __future__ import annotations

import libvirt
import pytest

from kdlabd.virt import storage


class Pool:
    """A pool whose refresh fails, leaving it active or not (as libvirt does)."""

    def __init__(self, *, stays_active: bool) -> None:
        self.active = True
        self._stays_active = stays_active

    def name(self) -> str:
        return "kdlab"

    def isActive(self) -> int:  # noqa: N802 (libvirt's name)
        return int(self.active)

    def refresh(self, _flags: int) -> None:
        self.active = self._stays_active
        raise libvirt.libvirtError("internal error: pool 'kdlab' has asynchronous jobs")


def test_a_refresh_refused_while_a_volume_is_made_is_no_failure() -> None:
    storage.refresh(Pool(stays_active=True))  # type: ignore[arg-type]


def test_a_refresh_that_stopped_the_pool_fails() -> None:
    with pytest.raises(libvirt.libvirtError):
        storage.refresh(Pool(stays_active=False))  # type: ignore[arg-type]
