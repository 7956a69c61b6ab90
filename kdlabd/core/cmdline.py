"""The kernel command line kdlab boots with, derived from the user's."""

from __future__ import annotations

from kdlabd.core.models import VMSpec

SERIAL_CONSOLE = "console=ttyS0"


def _has_param(words: list[str], key: str) -> bool:
    return any(word == key or word.startswith(key + "=") for word in words)


def effective_cmdline(spec: VMSpec) -> str:
    """The user's command line plus what kdlab's VMs need to be debuggable.

    - ``root=/dev/vda rw`` when the first disk is an image, unless ``root=``
      was given: the image is a whole-disk filesystem on virtio.
    - ``console=ttyS0`` unless a console was chosen: kdlab's log and console
      are the first serial port.
    - ``nokaslr`` when the gdbstub is on, unless the user wrote ``kaslr`` or
      ``nokaslr``: with KASLR the symbols in vmlinux do not match the running
      kernel and breakpoints never hit.
    """
    words = spec.cmdline.split()
    # Everything after "--" belongs to init, not to the kernel.
    end = words.index("--") if "--" in words else len(words)
    kernel_words = words[:end]
    extra = []
    if spec.disks and spec.disks[0].base_image and not _has_param(kernel_words, "root"):
        extra += [f"root=/dev/{spec.disks[0].target}", "rw"]
    if not _has_param(kernel_words, "console"):
        extra.append(SERIAL_CONSOLE)
    kaslr_chosen = _has_param(kernel_words, "kaslr") or _has_param(
        kernel_words, "nokaslr"
    )
    if spec.debug.gdb and not kaslr_chosen:
        extra.append("nokaslr")
    return " ".join(kernel_words + extra + words[end:])
