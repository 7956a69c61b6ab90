"""kdlab's libvirt storage: pools, volumes, uploads through volume streams.

Synchronous functions on a connection; the backend runs them in worker
threads. Every file kdlab keeps is a volume, so virsh and virt-manager see
it, and uploads go through libvirt's stream API, which works the same for a
local and a remote libvirt.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import structlog
from lxml import etree

from kdlab.errors import HypervisorError, InvalidArgument, KdlabError
from kdlabd.core import validate
from kdlabd.core.models import ImageFormat, ImageRecord, StoredImage

log = structlog.get_logger(__name__)

UPLOAD_CHUNK = 1024 * 1024

Progress = Callable[[int], None]
"""Told the bytes done so far; may raise to abort the upload."""


def pool_xml(name: str, path: Path) -> str:
    pool = etree.Element("pool", type="dir")
    etree.SubElement(pool, "name").text = name
    target = etree.SubElement(pool, "target")
    etree.SubElement(target, "path").text = str(path)
    perms = etree.SubElement(target, "permissions")
    # QEMU (another user) traverses to its volumes but cannot list them.
    etree.SubElement(perms, "mode").text = "0711"
    return etree.tostring(pool, encoding="unicode")


def volume_xml(
    name: str,
    capacity: int,
    fmt: ImageFormat,
    backing: ImageRecord | None = None,
    *,
    owner: int | None = None,
) -> str:
    volume = etree.Element("volume")
    etree.SubElement(volume, "name").text = name
    etree.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    if fmt is ImageFormat.QCOW2 or backing is not None:
        # No preallocation: a new volume costs nothing until written.
        etree.SubElement(volume, "allocation", unit="bytes").text = "0"
    target = etree.SubElement(volume, "target")
    etree.SubElement(target, "format", type=fmt.value)
    perms = etree.SubElement(target, "permissions")
    etree.SubElement(perms, "mode").text = "0600"
    if owner is not None:  # a file QEMU itself writes (a recording's)
        etree.SubElement(perms, "owner").text = str(owner)
    if backing is not None:
        store = etree.SubElement(volume, "backingStore")
        etree.SubElement(store, "path").text = str(backing.path)
        etree.SubElement(store, "format", type=backing.format.value)
    return etree.tostring(volume, encoding="unicode")


def ensure_pool(conn: libvirt.virConnect, name: str, path: Path) -> Path:
    """Define, build and start the directory pool *name* unless it runs already.

    Returns the pool's directory: a pool that existed keeps its own (its
    volumes are there), whatever *path* says. A pool whose directory is gone
    (removed by hand while libvirt kept the pool) is built again, empty:
    without it libvirt can neither start nor refresh the pool.
    """
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        pool = conn.storagePoolDefineXML(pool_xml(name, path), 0)
        pool.build(0)
        pool.setAutostart(1)
    if pool.isActive():
        # A refresh fails only if libvirt stopped the pool (its directory is
        # gone); then it is started below like any stopped pool.
        with contextlib.suppress(libvirt.libvirtError):
            refresh(pool)
    if not pool.isActive():
        _start_pool(pool)
    existing = etree.fromstring(pool.XMLDesc(0).encode()).findtext("target/path")
    return Path(existing) if existing else path


def refresh(pool: libvirt.virStoragePool) -> None:
    """Re-read the pool's directory, for volumes changed behind libvirt's back.

    libvirt refuses while a volume of the pool is being made ("pool has
    asynchronous jobs running"); its own list of volumes is current then,
    so that is no failure. A refresh that fails for a real reason (the
    directory is gone) stops the pool, and a stopped pool is one.
    """
    try:
        pool.refresh(0)
    except libvirt.libvirtError:
        if not pool.isActive():
            raise
        log.info("storage.refresh_skipped", pool=pool.name())


def _start_pool(pool: libvirt.virStoragePool) -> None:
    """Start a stopped pool; if that fails, build it (make its directory) first.

    Building a directory pool whose directory exists changes nothing but its
    mode, so this needs no look at a directory that may be on another host.
    """
    try:
        pool.create(0)
    except libvirt.libvirtError as err:
        try:
            pool.build(0)
            pool.create(0)
        except libvirt.libvirtError:
            raise err from None
        log.warning(
            "storage.pool_rebuilt",
            pool=pool.name(),
            error=err.get_error_message(),
            note="the pool's directory was made again; volumes it had are gone",
        )
    refresh(pool)


def find_volume(
    pool: libvirt.virStoragePool, name: str
) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def delete_volume(pool: libvirt.virStoragePool, name: str) -> None:
    """Delete the volume *name* if it exists."""
    volume = find_volume(pool, name)
    if volume is not None:
        volume.delete(0)


def image_record(
    volume: libvirt.virStorageVol, fmt: ImageFormat, owner_uid: int = 0
) -> ImageRecord:
    """The image *volume* holds, in the format kdlab stored it as."""
    xml = etree.fromstring(volume.XMLDesc(0).encode())
    return ImageRecord(
        name=volume.name(),
        format=fmt,
        capacity=int(xml.findtext("capacity") or 0),
        allocation=int(xml.findtext("allocation") or 0),
        path=Path(volume.path()),
        owner_uid=owner_uid,
    )


def probed_record(
    volume: libvirt.virStorageVol, owner_uid: int = 0
) -> ImageRecord | None:
    """The image *volume* holds, in the format libvirt probes; None for a format
    kdlab does not take (a volume someone copied into the pool by hand)."""
    probed = etree.fromstring(volume.XMLDesc(0).encode()).find("target/format")
    name = probed.get("type", "raw") if probed is not None else "raw"
    if name not in ImageFormat.__members__.values():
        return None
    return image_record(volume, ImageFormat(name), owner_uid)


# Who owns an image is kept in libvirt as well, as an empty volume of the image
# pool named ".owner-UID.IMAGE" next to the image. libvirt keeps no metadata on
# volumes (only domains have <metadata>), and the other places fail:
# - the volume's <permissions><owner> makes the file the user's, who could then
#   chmod it and rewrite, under other users' VMs, a base QEMU reads as root's;
# - <permissions><group> (mode 0600 grants the group nothing) is rewritten by
#   libvirt's DAC driver, which relabels a VM's whole backing chain for QEMU
#   while it runs: the owner would read wrong exactly while the image is in use,
#   and after a kdlabd restart then;
# - a file in kdlabd's state directory is a second database beside libvirt.
# A mark is written before its image exists and removed after it is gone (an
# orphan is pruned at start-up); no image name starts with a dot
# (kdlabd.core.validate.name), and `virsh vol-list` shows the mark beside it.
OWNER_MARK_PREFIX = ".owner-"


def owner_mark(name: str, uid: int) -> str:
    """The name of the volume recording that *uid* owns image *name*."""
    return f"{OWNER_MARK_PREFIX}{uid}.{name}"


def parse_owner_mark(volume: str) -> tuple[str, int] | None:
    """(image name, uid) of an owner mark; None for any other volume."""
    if not volume.startswith(OWNER_MARK_PREFIX):
        return None
    uid, dot, name = volume.removeprefix(OWNER_MARK_PREFIX).partition(".")
    if not (dot and name and uid.isdigit()):
        return None
    return name, int(uid)


def image_owners(volumes: list[str]) -> dict[str, int]:
    """Owner uid by image name, from the pool's volume names.

    kdlabd writes one mark per image; should a crash leave two, the lower
    uid (root's, if it is one) wins: never a guess that widens access.
    """
    owners: dict[str, int] = {}
    for volume in volumes:
        mark = parse_owner_mark(volume)
        if mark is not None:
            name, uid = mark
            owners[name] = min(uid, owners.get(name, uid))
    return owners


def set_image_owner(pool: libvirt.virStoragePool, name: str, uid: int | None) -> None:
    """Replace the owner marks of image *name* by one for *uid* (None: none)."""
    for volume in pool.listVolumes():
        mark = parse_owner_mark(volume)
        if mark is not None and mark[0] == name and mark[1] != uid:
            delete_volume(pool, volume)
    if uid is not None and find_volume(pool, owner_mark(name, uid)) is None:
        create_volume(pool, owner_mark(name, uid), 0, ImageFormat.RAW)


def create_volume(
    pool: libvirt.virStoragePool,
    name: str,
    capacity: int,
    fmt: ImageFormat,
    backing: ImageRecord | None = None,
    *,
    owner: int | None = None,
) -> libvirt.virStorageVol:
    """A new volume; a qcow2 with *backing* is an overlay (created in O(1))."""
    return pool.createXML(volume_xml(name, capacity, fmt, backing, owner=owner), 0)


def upload(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    name: str,
    fd: int,
    size: int,
    *,
    fmt: ImageFormat = ImageFormat.RAW,
    capacity: int | None = None,
    progress: Progress | None = None,
) -> libvirt.virStorageVol:
    """Replace volume *name* with *size* bytes of *fd*; nothing is left on failure.

    *capacity* is the volume's virtual size (a qcow2's differs from its file
    size). The upload is sparse: the file's holes travel as hole markers, not
    as zeros, so a 2 GiB filesystem image with 300 MiB of data sends 300 MiB.
    """
    delete_volume(pool, name)
    volume = create_volume(pool, name, capacity or size, fmt)
    stream = conn.newStream(0)
    try:
        volume.upload(stream, 0, size, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
        for is_data, offset, length in segments(fd, size):
            if is_data:
                _send_data(stream, fd, offset, length, progress)
            else:
                stream.sendHole(length, 0)
            if progress is not None:
                progress(offset + length)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        with contextlib.suppress(libvirt.libvirtError):
            volume.delete(0)
        raise
    return volume


def segments(fd: int, size: int) -> Iterator[tuple[bool, int, int]]:
    """(is_data, offset, length) runs of *fd*'s first *size* bytes, by its holes.

    Files on filesystems that cannot tell holes are one data run.
    """
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                data = size
            elif err.errno == errno.EINVAL:  # no SEEK_DATA here
                yield True, offset, size - offset
                return
            else:
                raise
        data = min(data, size)
        if data > offset:
            yield False, offset, data - offset
            offset = data
        if offset >= size:
            return
        hole = min(os.lseek(fd, offset, os.SEEK_HOLE), size)
        yield True, offset, hole - offset
        offset = hole


def _send_data(
    stream: libvirt.virStream,
    fd: int,
    offset: int,
    length: int,
    progress: Progress | None,
) -> None:
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(UPLOAD_CHUNK, end - offset), offset)
        if not chunk:
            raise InvalidArgument("the file shrank while it was being uploaded")
        stream.send(chunk)
        offset += len(chunk)
        if progress is not None:
            progress(offset)


QEMU_IMG_TIMEOUT = 30.0


def inspect(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    name: str,
    *,
    local: bool,
) -> StoredImage:
    """What the volume *name* holds now that its bytes are stored.

    Three views, each of what will read it later: the first bytes (read back
    through libvirt, so a remote host works too), the format and backing file
    libvirt probes when it refreshes the pool, and on a local host qemu-img's.
    """
    pool.refresh(0)
    volume = pool.storageVolLookupByName(name)
    header = _read_head(conn, volume, validate.IMAGE_HEADER_BYTES)
    xml = etree.fromstring(volume.XMLDesc(0).encode())
    fmt = xml.find("target/format")
    stored = StoredImage(
        header=header,
        probed_format=fmt.get("type", "raw") if fmt is not None else "raw",
        tool_format="",
        virtual_size=int(xml.findtext("capacity") or 0),
        backing=xml.findtext("backingStore/path") or "",
    )
    if not local:
        return stored
    try:
        # A header that names a backing or data file is refused on its own;
        # qemu-img must never be the one to open such a path.
        declared, _ = validate.image_header(header, stored.virtual_size)
    except KdlabError:
        return stored
    info = qemu_img_info(Path(volume.path()), declared)
    specific = info.get("format-specific", {}).get("data", {})
    return StoredImage(
        header=header,
        probed_format=stored.probed_format,
        tool_format=str(info.get("format", "")),
        virtual_size=int(info.get("virtual-size", 0)),
        backing=stored.backing or str(info.get("backing-filename", "")),
        data_file=str(specific.get("data-file", "")),
    )


def qemu_img_info(path: Path, fmt: ImageFormat) -> dict[str, Any]:
    """``qemu-img info`` of *path* read as *fmt*: read-only, no backing opened.

    The format is given, never probed, and qemu-img info does not open a
    backing file; it runs on kdlab's own volume, never a caller's path.
    """
    try:
        result = subprocess.run(
            [
                "qemu-img",
                "info",
                "--output=json",
                "--force-share",
                "-f",
                fmt.value,
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=QEMU_IMG_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HypervisorError(f"cannot inspect the stored image: {err}") from None
    if result.returncode != 0:
        raise InvalidArgument(
            "the stored image is not a valid "
            f"{fmt.value} image: {result.stderr.strip()[-300:]}"
        )
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def _read_head(
    conn: libvirt.virConnect, volume: libvirt.virStorageVol, length: int
) -> bytes:
    """The first *length* bytes of *volume*, read through a libvirt stream."""
    stream = conn.newStream(0)
    chunks: list[bytes] = []
    try:
        volume.download(stream, 0, length, 0)
        while sum(map(len, chunks)) < length:
            data = stream.recv(length)
            if not isinstance(data, bytes) or not data:
                break
            chunks.append(data)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return b"".join(chunks)[:length]
