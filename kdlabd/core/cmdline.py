"""The kernel command line kdlab boots with, derived from the user's.

:attr:`kdlabd.core.models.VMSpec.effective_cmdline` is what a VM boots with;
a create checks the same line, from the disks it is about to make, before it
makes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kdlab.kernel.guest import SHARES_PARAMETER

SERIAL_CONSOLE = "console=ttyS0"
SHARES_PARAM = SHARES_PARAMETER  # what kdlab's initramfs reads
"""The tags of a VM's shares, for kdlab's initramfs to mount at /mnt/TAG."""


class BootDisk(Protocol):
    """A VM's disk as its command line sees it."""

    @property
    def target(self) -> str:
        """``vda``, ``vdb``, ...: its name in the guest."""

    @property
    def base_image(self) -> str:
        """The image it is an overlay on; "" for a blank disk."""


def _has_param(words: list[str], key: str) -> bool:
    return any(word == key or word.startswith(key + "=") for word in words)


def effective(
    cmdline: str,
    disks: Sequence[BootDisk],
    *,
    gdb: bool,
    shares: Sequence[str] = (),
) -> str:
    """The user's *cmdline* plus what kdlab's VMs need to be debuggable.

    - ``root=/dev/vda rw`` when the first of *disks* is an image, unless
      ``root=`` was given: the image is a whole-disk filesystem on virtio.
    - ``console=ttyS0`` unless a console was chosen: kdlab's log and console
      are the first serial port.
    - ``nokaslr`` when the gdbstub is on (*gdb*), unless the user wrote
      ``kaslr`` or ``nokaslr``: with KASLR the symbols in vmlinux do not match
      the running kernel and breakpoints never hit.
    """
    words = cmdline.split()
    # Everything after "--" belongs to init, not to the kernel.
    end = words.index("--") if "--" in words else len(words)
    kernel_words = words[:end]
    extra = []
    if disks and disks[0].base_image and not _has_param(kernel_words, "root"):
        extra += [f"root=/dev/{disks[0].target}", "rw"]
    if not _has_param(kernel_words, "console"):
        extra.append(SERIAL_CONSOLE)
    kaslr_chosen = _has_param(kernel_words, "kaslr") or _has_param(
        kernel_words, "nokaslr"
    )
    if gdb and not kaslr_chosen:
        extra.append("nokaslr")
    if shares and not _has_param(kernel_words, SHARES_PARAM):
        extra.append(f"{SHARES_PARAM}={','.join(shares)}")
    return " ".join(kernel_words + extra + words[end:])
