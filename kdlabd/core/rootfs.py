"""What a Debian root file system build is asked for: :class:`RootfsSpec`.

The build itself (debootstrap, tar, mke2fs, all confined) is the host's, behind
the :class:`~kdlabd.core.builder.Builder` port: see :mod:`kdlabd.host.rootfs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlabd.core import validate

DEFAULT_SIZE_BYTES = 2 * validate.GIB
DEFAULT_MIRROR = validate.DEBIAN_MIRROR
DEFAULT_HOSTNAME = "kdlab"


@dataclass(frozen=True)
class RootfsSpec:
    """What to build; validated on construction (:class:`InvalidArgument`).

    *packages* are kept sorted and without duplicates. *ssh_key* is the text of
    one public key as in a ``.pub`` file (a trailing newline is dropped): the
    client read the file, kdlabd never opens a user's path.
    """

    suite: str
    size_bytes: int = DEFAULT_SIZE_BYTES
    packages: tuple[str, ...] = ()
    ssh_key: str = ""
    hostname: str = DEFAULT_HOSTNAME
    mirror: str = DEFAULT_MIRROR

    def __post_init__(self) -> None:
        validate.debian_suite(self.suite)
        validate.rootfs_size(self.size_bytes)
        object.__setattr__(self, "packages", validate.debian_packages(self.packages))
        object.__setattr__(self, "ssh_key", validate.ssh_public_key(self.ssh_key))
        validate.hostname(self.hostname)
        validate.debian_mirror(self.mirror)
