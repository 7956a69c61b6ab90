"""``overlay_create``: a new VM with its disk on a 100 MiB and on a 10 GiB base.

kdlab's way is the real path: ``kdlabctl create NAME --kernel K --initrd I
--image BASE`` on a bench kdlabd (kdlabctl, the bus, authorization, kdlabd's
checks, the upload of the kernel and initrd into its boot pool, the domain's
definition, and the disk: a qcow2 overlay on BASE through libvirt). K is
Debian's kernel and I a busybox initramfs: given an initrd, kdlabctl builds
none (without one, it builds an initramfs of the kernel's virtio modules for
a disk, some 0.2 s more, which is not the disk's cost). The baseline is the
disk by hand: ``qemu-img create -f qcow2 -b BASE -F raw`` of the very same
base file.

Rows:

- ``:100M`` and ``:10G``: the whole ``kdlabctl create --image`` against
  ``qemu-img create`` (the command does much more than the disk; it is what a
  person waits for).
- ``:disk``: the disk's share of ``kdlabctl create``, the time ``--image``
  adds to the same command without it (the difference within each round),
  against ``qemu-img create``. The goal: under 100 ms.
- ``:flat``: kdlabctl on the 10 GiB base against the 100 MiB one: no data is
  copied, whatever the base's size.
- ``:cp_100M`` and ``:cp_10G`` (extras): against ``cp --sparse=never`` of the
  base, what a VM disk costs without overlays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from bench.lab import bench_daemon, ctl, run, scratch, unique
from bench.measure import INFO, Goal, Row, interleaved, row, seconds
from tests.support import debian
from tests.support.daemon import Kdlabd
from tests.support.system import remove_vm, virsh

POOLS = "kdlab-bench-overlay"
BASES = {"100M": "100M", "10G": "10G"}  # label: kdlabctl image create --size
UNDER_100_MS = Goal("< 100 ms", max_value=100)


def _base_path(name: str) -> Path:
    """The file of the image *name* in the bench kdlabd's image pool."""
    found = virsh("vol-path", "--pool", f"{POOLS}-images", name)
    if found.returncode != 0:
        raise RuntimeError(f"no volume {name}: {found.stderr}")
    return Path(found.stdout.strip())


def _create(daemon: Kdlabd, boot: list[str], *image: str) -> float:
    """Seconds for ``kdlabctl create`` of the *boot* files (with ``--image`` if
    given); the VM is deleted after."""
    name = unique("bench")
    try:
        return seconds(lambda: ctl(daemon, "create", name, "--quiet", *boot, *image))
    finally:
        remove_vm(daemon, name)


def _by_hand(command: Callable[[Path], list[str]], work: Path) -> float:
    """Seconds for *command* (given the file to make), the file removed after."""
    made = work / "by-hand"
    took = seconds(lambda: run(command(made)))
    made.unlink()
    return took


def _qemu_img(base: Path) -> Callable[[Path], list[str]]:
    return lambda made: [
        *("qemu-img", "create", "-q", "-f", "qcow2"),
        *("-b", str(base), "-F", "raw", str(made)),
    ]


def _cp(base: Path) -> Callable[[Path], list[str]]:
    return lambda made: ["cp", "--sparse=never", str(base), str(made)]


def overlay_create(quick: bool) -> list[Row]:
    """kdlabctl create with a disk vs qemu-img create, on a small and a large base."""
    rounds, per_round = (1, 10) if quick else (5, 4)  # a copy a round
    boot = [
        *("--kernel", str(debian.cloud_kernel().vmlinuz)),
        *("--initrd", str(debian.busybox_initramfs(debian.DEFAULT_MARKER))),
    ]
    samples: dict[str, list[float]] = {}
    with bench_daemon(POOLS) as daemon, scratch() as work:
        bases = {}
        for label, size in BASES.items():
            name = f"base-{label}"
            ctl(daemon, "image", "create", name, "--size", size)
            bases[label] = (name, _base_path(name))
        cheap: dict[str, Callable[[], float]] = {
            "kdlab 100M": lambda: _create(daemon, boot, "--image", bases["100M"][0]),
            "kdlab 10G": lambda: _create(daemon, boot, "--image", bases["10G"][0]),
            "kdlab no disk": lambda: _create(daemon, boot),
            "qemu-img 100M": lambda: _by_hand(_qemu_img(bases["100M"][1]), work),
            "qemu-img 10G": lambda: _by_hand(_qemu_img(bases["10G"][1]), work),
        }
        for _ in range(rounds):
            for key, values in zip(
                cheap, interleaved(per_round, *cheap.values()), strict=True
            ):
                samples.setdefault(key, []).extend(values)
            # The copies after them (the 10 GiB one takes about 50 s here), and
            # their data written out before the next round: volume creation
            # waits for the disk, so dirty pages would slow whoever comes next.
            for label in BASES:
                copy = _by_hand(_cp(bases[label][1]), work)
                samples.setdefault(f"cp {label}", []).append(copy)
                run(["sync"])
    disk = [
        with_disk - without
        for with_disk, without in zip(
            samples["kdlab 100M"], samples["kdlab no disk"], strict=True
        )
    ]
    what = "kdlabctl create --kernel --initrd --image"
    ms = functools.partial(row, unit="ms", scale=1000.0)
    qemu_img = "qemu-img create -f qcow2 -b BASE -F raw, the {} base"
    return [
        *(
            ms(
                f"overlay_create:{label}",
                samples[f"kdlab {label}"],
                samples[f"qemu-img {label}"],
                baseline=qemu_img.format(label),
                goal=INFO,
                note=f"{what}: the whole command, a VM and its disk",
            )
            for label in BASES
        ),
        ms(
            "overlay_create:disk",
            disk,
            samples["qemu-img 100M"],
            baseline=qemu_img.format("100M"),
            goal=UNDER_100_MS,
            note="what --image adds to kdlabctl create (same round), the 100M base",
        ),
        ms(
            "overlay_create:flat",
            samples["kdlab 10G"],
            samples["kdlab 100M"],
            baseline="kdlabctl create on the 100 MiB base",
            goal=Goal("flat: ratio <= 1.25", max_ratio=1.25),
            note=f"{what}, on the 10 GiB base against the 100 MiB one",
        ),
        *(
            ms(
                f"overlay_create:cp_{label}",
                samples[f"kdlab {label}"],
                samples[f"cp {label}"],
                baseline=f"cp --sparse=never of the {label} base",
                goal=INFO,
                note=f"{what} against a full copy, made once a round",
            )
            for label in BASES
        ),
    ]
