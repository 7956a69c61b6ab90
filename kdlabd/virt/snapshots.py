"""Checkpoints as libvirt internal snapshots: their XML, read and written.

libvirt keeps each snapshot's metadata (name, description, creation time, the
domain as it was); QEMU keeps the state in the VM's qcow2 disks. kdlab's facts
ride in the description (:mod:`kdlabd.core.checkpoints`).
"""

from __future__ import annotations

from lxml import etree

from kdlabd.core import checkpoints
from kdlabd.core.models import Checkpoint


def snapshot_xml(tag: str, description: str) -> str:
    """A snapshot of the whole running domain (memory, devices, disks), internal."""
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "name").text = tag
    etree.SubElement(root, "description").text = description
    return etree.tostring(root, encoding="unicode")


def parse_snapshot_xml(xml: str) -> Checkpoint:
    """The checkpoint a snapshot's XML describes."""
    root = etree.fromstring(xml.encode())
    return checkpoints.parse(
        root.findtext("name") or "",
        root.findtext("description") or "",
        int(root.findtext("creationTime") or "0"),
    )


def disks_not_qcow2(domain_xml: str) -> list[str]:
    """The targets of the domain's disks that cannot hold internal snapshots."""
    root = etree.fromstring(domain_xml.encode())
    found = []
    for disk in root.iterfind("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        fmt = disk.find("driver")
        target = disk.find("target")
        if fmt is None or fmt.get("type") != "qcow2":
            found.append("?" if target is None else target.get("dev", "?"))
    return found
