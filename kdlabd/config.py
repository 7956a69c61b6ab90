"""kdlabd's configuration: defaults, /etc/kdlab/kdlabd.toml, then the command line."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.errors import InvalidArgument
from kdlabd.core import validate
from kdlabd.core.limits import HostResources, Limits
from kdlabd.core.models import Accel

DEFAULT_CONFIG = Path("/etc/kdlab/kdlabd.toml")


@dataclass(frozen=True)
class Config:
    """Everything kdlabd can be told. Keys of the TOML file are these field names."""

    bus: str = "system"
    libvirt_uri: str = "qemu:///system"
    state_dir: Path = Path("/var/lib/kdlab")
    runtime_dir: Path = Path("/run/kdlab")
    cache_dir: Path | None = None  # default: STATE_DIR/cache
    accel: Accel = Accel.AUTO
    qemu_user: str = "libvirt-qemu"
    # The pool of VM volumes (kernels, initrds, disks): the key kept its first
    # name, from when the pool held only what a VM boots.
    boot_pool: str = "kdlab-boot"
    image_pool: str = "kdlab"
    dump_pool: str = "kdlab-dumps"
    recording_pool: str = "kdlab-recordings"
    log_format: str = "auto"
    polkit_timeout: float = 25.0
    # Seconds a call that needs libvirt waits while kdlabd reconnects to it.
    reconnect_wait: float = 15.0
    # Limits (kdlabd.core.limits): max_X configures Limits.X.
    max_memory_mib: int | None = None  # default: the host's memory
    max_vcpus: int | None = None  # default: the host's CPUs
    max_disk_gib: int = Limits.disk_gib
    max_extra_disks: int = Limits.extra_disks
    max_vms_per_user: int = Limits.vms_per_user
    max_jobs_per_user: int = Limits.jobs_per_user
    max_console_viewers_per_vm: int = Limits.console_viewers_per_vm
    max_console_viewers_per_user: int = Limits.console_viewers_per_user
    max_execs_per_vm: int = Limits.execs_per_vm
    max_dumps_per_vm: int = Limits.dumps_per_vm
    max_dump_gib_per_user: int = Limits.dump_gib_per_user

    def limits(self, host: HostResources) -> Limits:
        """The limits in force on *host*: memory and vCPUs never above its own."""
        configured = {
            field.name: getattr(self, f"max_{field.name}")
            for field in dataclasses.fields(Limits)
        }
        return Limits(
            **{key: value for key, value in configured.items() if value is not None}
        ).within_host(host)

    @property
    def vm_pool_dir(self) -> Path:
        return self.state_dir / "boot"

    @property
    def image_pool_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def dump_pool_dir(self) -> Path:
        return self.state_dir / "dumps"

    @property
    def recording_pool_dir(self) -> Path:
        return self.state_dir / "recordings"


# What each key means: kdlabd(8) lists them (kdlabd.manpage), with the
# defaults above; a unit test keeps this complete.
KEY_HELP = {
    "bus": "The bus kdlabd serves on: system, session or a D-Bus address.",
    "libvirt_uri": "The libvirt connection URI.",
    "state_dir": "kdlabd's state: the storage pools' directories (boot, images, "
    "dumps) "
    "and each VM's console logs.",
    "runtime_dir": "Where the VMs' gdb sockets live, in a directory only root and "
    "QEMU can enter.",
    "cache_dir": "The debootstrap bases of image builds and the exec agent "
    "their images run (default: STATE_DIR/cache).",
    "accel": "auto uses KVM only when libvirt reports it, a hardware KVM module is "
    "loaded and the QEMU user can open /dev/kvm; otherwise TCG. kvm or tcg force "
    "one.",
    "qemu_user": "The user libvirt runs QEMU as, who must reach the VMs' files "
    "and sockets.",
    "boot_pool": "The libvirt storage pool, in STATE_DIR/boot, of kernels, initrds "
    "and VM disks.",
    "image_pool": "The libvirt storage pool, in STATE_DIR/images, of disk images.",
    "dump_pool": "The libvirt storage pool, in STATE_DIR/dumps, of post-mortem "
    "dumps (each with its ID.json, written by kdlabd).",
    "recording_pool": "The libvirt storage pool, in STATE_DIR/recordings, of "
    "recordings (QEMU's record/replay log, its start state, and kdlabd's ID.json).",
    "log_format": "json (one object a line, with a syslog priority prefix), "
    "console, or auto: json under the journal or when stderr is not a terminal.",
    "polkit_timeout": "Seconds kdlabd waits for polkit's answer before it denies "
    "the call.",
    "reconnect_wait": "Seconds a call that needs libvirt waits while kdlabd "
    "reconnects to it, before it fails with HypervisorError.",
    "max_memory_mib": "A VM's memory in MiB (default: the host's memory; never "
    "above it).",
    "max_vcpus": "A VM's vCPUs (default: the host's CPUs; never above them).",
    "max_disk_gib": "The size in GiB of an image and of a VM's disks.",
    "max_extra_disks": "Blank disks per VM (at most 25: vdb to vdz).",
    "max_vms_per_user": "VMs one uid owns (or is creating).",
    "max_jobs_per_user": "Imports and builds one uid runs at once.",
    "max_console_viewers_per_vm": "Console viewers of one VM.",
    "max_execs_per_vm": "Commands running at once in one VM (kdlabctl exec).",
    "max_console_viewers_per_user": "Console viewers one uid has open.",
    "max_dumps_per_vm": "Automatic (panic) dumps kept per VM; a new one drops the "
    "oldest. Requested dumps are never dropped.",
    "max_dump_gib_per_user": "GiB all dumps of one uid may take; a dump that would "
    "go over is refused before it starts.",
}

_LIMIT_MAX = 2**32 - 1
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_SECONDS = ("polkit_timeout", "reconnect_wait")


def _coerce(key: str, value: Any) -> Any:
    if key not in _FIELDS:
        raise InvalidArgument(
            f"unknown configuration key {key!r}; known: {', '.join(_FIELDS)}"
        )
    if key in _SECONDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise InvalidArgument(f"{key} must be a positive number of seconds")
        return float(value)
    if key.startswith("max_"):
        return _limit(key, value)
    if not isinstance(value, str):
        raise InvalidArgument(f"configuration key {key!r} must be a string")
    if key in ("state_dir", "runtime_dir", "cache_dir"):
        return Path(value)
    if key == "accel":
        try:
            return Accel(value)
        except ValueError:
            raise InvalidArgument(
                f"accel must be one of {', '.join(Accel)}, not {value!r}"
            ) from None
    if key == "log_format" and value not in ("auto", "json", "console"):
        raise InvalidArgument("log_format must be auto, json or console")
    return value


def _limit(key: str, value: Any) -> int:
    """A limit: a count or size of at least 1 (0 extra disks may be allowed)."""
    if key == "max_extra_disks":
        return validate.in_range(value, (0, validate.MAX_EXTRA_DISKS), key)
    return validate.in_range(value, (1, _LIMIT_MAX), key)


def load(path: Path | None, overrides: dict[str, Any]) -> Config:
    """Defaults, then the TOML file (if it exists), then non-None *overrides*."""
    values: dict[str, Any] = {}
    config_path = path or DEFAULT_CONFIG
    try:
        with config_path.open("rb") as file:
            values.update(tomllib.load(file))
    except FileNotFoundError:
        if path is not None:
            raise InvalidArgument(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise InvalidArgument(f"{config_path}: {err}") from None
    except OSError as err:
        raise InvalidArgument(
            f"cannot read configuration file {config_path}: {err.strerror}"
        ) from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config(**{key: _coerce(key, value) for key, value in values.items()})


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="kdlabd",
        description="kdlab's daemon: kernel debug VMs on libvirt, served on D-Bus.",
    )
    cli.add_argument(
        "--config", type=Path, help=f"TOML configuration (default {DEFAULT_CONFIG})"
    )
    cli.add_argument("--bus", help="system (default), session, or a D-Bus address")
    cli.add_argument(
        "--libvirt-uri", help="libvirt connection URI (default qemu:///system)"
    )
    cli.add_argument(
        "--state-dir", help="where logs and boot files live (default /var/lib/kdlab)"
    )
    cli.add_argument(
        "--runtime-dir", help="where gdb sockets live (default /run/kdlab)"
    )
    cli.add_argument(
        "--accel", choices=[a.value for a in Accel], help="guest acceleration"
    )
    cli.add_argument("--log-format", choices=["auto", "json", "console"])
    return cli


def from_args(argv: list[str] | None = None) -> Config:
    args = parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    return load(args.config, overrides)
