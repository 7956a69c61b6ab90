"""Domains that vanish while kdlabd reads them (libvirt's test driver).

Another tool (virsh, a second kdlabd) may undefine a domain between kdlabd
listing it and reading its XML; kdlabd must skip it, not fail to start.
"""

from __future__ import annotations

import libvirt

from kdlabd.virt.domain_xml import build_domain_xml
from kdlabd.virt.libvirt_backend import LibvirtHypervisor
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
