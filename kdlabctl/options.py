"""What kdlabctl sends kdlabd: a new VM's options and files, image builds.

Only calls on dbus-next send options (:mod:`kdlabctl.asyncbus`): its
marshaller takes its own variants, made here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from dbus_next import Variant


@dataclass(frozen=True)
class VMOptions:
    """CreateVM's options but the files; None (or empty) keeps kdlabd's default."""

    cmdline: str | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    gdb: bool | None = None
    gdb_tcp_port: int | None = None
    vmlinux: str | None = None
    kernel_path: str | None = None
    tree: str | None = None
    image: str | None = None
    disk_size: int | None = None
    extra_disks: tuple[int, ...] = ()
    on_panic: str | None = None
    initramfs: str | None = None
    shares: tuple[tuple[str, str], ...] = ()
    """(tag, directory) pairs, the directories as the user resolved them."""

    def fields(self) -> dict[str, Any]:
        return asdict(self) | {"shares": dict(self.shares) or None}


@dataclass(frozen=True)
class BootFiles:
    """Descriptors of the files a new VM boots, opened by the caller as the user."""

    kernel: int
    initrd: int | None = None


@dataclass(frozen=True)
class ImageBuild:
    """BuildImage's options; None (or empty) keeps kdlabd's default."""

    suite: str
    size: int | None = None
    packages: tuple[str, ...] = ()
    ssh_key: str | None = None

    def fields(self) -> dict[str, Any]:
        return asdict(self)


def variants(values: Mapping[str, Any], types: Mapping[str, str]) -> dict[str, Variant]:
    """``a{sv}`` options, each value with its key's D-Bus type; None and empty
    arrays are left out (kdlabd's default)."""
    return {
        key: Variant(types[key], list(value) if isinstance(value, tuple) else value)
        for key, value in values.items()
        if value is not None and value != ()
    }
