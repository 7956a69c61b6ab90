"""Domains that vanish while kdlabd reads them (libvirt's test driver).

Another tool (virsh, a second kdlabd) may undefine a domain between kdlabd
listing it and reading its XML; kdlabd must skip it, not fail to start.
"""

from __future__ import annotations

import libvirt
import pytest

from kdlab.states import StopCause, VMState
from kdlabd.core.models import BootMark, stop_cause
from kdlabd.virt.domain_xml import BOOT_NS, BOOT_PREFIX, boot_mark_xml, build_domain_xml
from kdlabd.virt.libvirt_backend import LibvirtHypervisor, hypervisor_stop_cause
from tests.unit.test_domain_xml import GOLDEN_SPECS


def test_a_domain_undefined_after_it_was_listed_is_skipped() -> None:
    conn = libvirt.open("test:///default")
    try:
        spec = GOLDEN_SPECS["tcg-gdb-unix"]
        dom = conn.defineXML(build_domain_xml(spec))
        assert LibvirtHypervisor._record(dom) is not None
        conn.lookupByName(dom.name()).undefine()
        assert LibvirtHypervisor._record(dom) is None
    finally:
        conn.close()


def test_the_boot_mark_and_how_a_domain_went_off_are_read_back() -> None:
    """kdlabd records each boot (and a Stop call) in the domain's metadata;
    the record reads it back with libvirt's shut-off reason: LastStop."""
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(build_domain_xml(GOLDEN_SPECS["tcg-gdb-unix"]))
        fresh = LibvirtHypervisor._record(dom)
        assert fresh is not None
        assert (fresh.boot, fresh.last_stop) == (BootMark(), StopCause.NONE)

        def mark(boot: BootMark) -> None:
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                boot_mark_xml(boot),
                BOOT_PREFIX,
                BOOT_NS,
                libvirt.VIR_DOMAIN_AFFECT_CONFIG,
            )

        mark(BootMark(5))
        dom.create()
        running = LibvirtHypervisor._record(dom)
        assert running is not None
        assert (running.boot, running.last_stop) == (BootMark(5), StopCause.NONE)
        dom.shutdown()  # as the guest's own poweroff ends: reason "shutdown"
        guest = LibvirtHypervisor._record(dom)
        assert guest is not None
        assert guest.last_stop is StopCause.GUEST
        mark(BootMark(6))
        dom.create()
        dom.destroy()
        killed = LibvirtHypervisor._record(dom)
        assert killed is not None
        assert killed.last_stop is StopCause.KILLED
        mark(BootMark(6, stop_requested=True))
        requested = LibvirtHypervisor._record(dom)
        assert requested is not None
        assert requested.boot == BootMark(6, stop_requested=True)
        assert requested.last_stop is StopCause.REQUESTED
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("state", "reason", "cause"),
    [
        (libvirt.VIR_DOMAIN_RUNNING, 1, StopCause.NONE),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, "guest"),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, "killed"),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, "crashed"),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_FAILED, "crashed"),
        (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN, "unknown"),
        (libvirt.VIR_DOMAIN_CRASHED, 0, "crashed"),
    ],
)
def test_how_libvirt_says_a_domain_went_off(
    state: int, reason: int, cause: str
) -> None:
    assert hypervisor_stop_cause(state, reason) == cause


def test_a_vm_kdlabd_never_booted_has_no_last_stop() -> None:
    """Booted 0 (started before kdlabd recorded boots, or by virsh): kdlabd
    cannot tell whether anyone asked for the stop, so it says nothing."""
    assert stop_cause(VMState.STOPPED, BootMark(), StopCause.GUEST) is StopCause.NONE
    assert stop_cause(VMState.RUNNING, BootMark(1), StopCause.GUEST) is StopCause.NONE
    assert stop_cause(VMState.CRASHED, BootMark(1), StopCause.CRASHED) == "crashed"
