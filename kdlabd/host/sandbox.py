"""Confinement of image builds: what debootstrap and package scripts may do.

Every program of a build (debootstrap, tar, mke2fs, rm) runs in new PID, IPC,
UTS and mount namespaces, with a capability bounding set of only what
debootstrap needs (:data:`BUILD_CAPABILITIES`) and no way to gain more
(no_new_privs), on a host file system that is read-only but for the
directories the step writes. Only debootstrap keeps the host's network, for
its mirror; the other steps get an empty network namespace. The packages'
maintainer scripts are confined further by :mod:`kdlabd.host.sandbox_init`'s
``chroot``: no network, no CAP_SYS_ADMIN/CAP_SYS_CHROOT/CAP_MKNOD, a /proc of
processes only.

Two ways to get there, one command inside:

- where systemd is PID 1, each step is a transient service
  (``systemd-run --unit=kdlab-build-TOKEN-N``) with the sandbox properties of
  :func:`unit_properties`, so kdlabd's own unit keeps its hardening (it needs
  none of these privileges); killing the build is ``systemctl stop``
  (KillMode=control-group, SIGKILL);
- elsewhere (containers, CI) ``setpriv`` applies the same bounding set and
  ``unshare`` makes the namespaces; every process carries ``KDLAB_BUILD=TOKEN``
  in its environment, and killing the build is killing every process that
  does (the PID namespace's init among them, so the kernel kills the rest).

The token is written in kdlabd's journal before anything starts, so a kdlabd
killed in the middle finds and kills what is left when it starts again
(:func:`kill_build`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from kdlab.errors import BuildFailed

log = structlog.get_logger(__name__)

TOKEN_ENV = "KDLAB_BUILD"
UNIT_PREFIX = "kdlab-build-"
INIT = Path(__file__).with_name("sandbox_init.py")
"""Run by path inside the namespaces; see its docstring."""
NOT_FOUND = "kdlab-sandbox: command not found: "
"""How :mod:`kdlabd.host.sandbox_init` reports a missing program (exit 127)."""
KILL_TIMEOUT = 30.0

# What debootstrap needs, by capability number (linux/capability.h):
BUILD_CAPABILITIES = {
    "CAP_CHOWN": 0,  # files of other owners in the tree (dpkg, tar)
    "CAP_DAC_OVERRIDE": 1,  # root's usual access to the tree's files
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,  # chmod/utime of files it does not own
    "CAP_FSETID": 4,  # set-group-ID bits kept on files of other groups
    "CAP_KILL": 5,  # signals to its own processes of other users
    "CAP_SETGID": 6,  # apt's and dpkg's helpers switching user
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,  # to drop the others for what runs in the tree
    "CAP_SYS_CHROOT": 18,  # chroot into the tree
    "CAP_SYS_ADMIN": 21,  # the namespaces, the tree's /proc, bind mounts
    "CAP_MKNOD": 27,  # /dev/null and friends in the tree
    "CAP_SETFCAP": 31,  # file capabilities of packages (ping)
}
IN_TARGET_DROPPED = ("CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_SETPCAP")
"""Taken away from everything run inside the tree (dpkg, maintainer scripts)."""


def systemd_booted() -> bool:
    """Whether systemd is PID 1 here (sd_booted(3))."""
    return Path("/run/systemd/system").is_dir()


def in_target_capabilities() -> list[int]:
    return sorted(
        number
        for name, number in BUILD_CAPABILITIES.items()
        if name not in IN_TARGET_DROPPED
    )


def unit_properties(writable: Sequence[Path]) -> list[tuple[str, str]]:
    """The transient build unit's sandbox; kdlabd.service is not widened for it.

    Not set, because debootstrap needs them: PrivateDevices= (mknod of the
    tree's /dev; DevicePolicy=closed allows those devices only),
    RestrictSUIDSGID= (dpkg installs set-uid programs), SystemCallFilter=
    (mount, chroot, mknod, unshare), ProtectHostname= (forbids sethostname in
    the build's own UTS namespace), PrivateNetwork= (the mirror).
    """
    return [
        ("CapabilityBoundingSet", " ".join(BUILD_CAPABILITIES)),
        ("NoNewPrivileges", "yes"),
        ("UMask", "0022"),
        ("KillMode", "control-group"),
        ("KillSignal", "SIGKILL"),
        ("TimeoutStopSec", "30"),
        ("PrivateTmp", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", " ".join(str(path) for path in writable)),
        ("ProtectHome", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("PrivateIPC", "yes"),
        ("RestrictNamespaces", "mnt pid ipc uts net"),
        ("RestrictRealtime", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallArchitectures", "native"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "/dev/console m"),
    ]


class BuildSandbox:
    """The confinement of one build; its token names all of its processes."""

    def __init__(self, token: str | None = None, *, systemd: bool | None = None):
        self.token = token or secrets.token_hex(8)
        self.systemd = systemd_booted() if systemd is None else systemd
        self._steps = itertools.count(1)

    def command(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        writable: Sequence[Path],
        network: bool = False,
        chroot_shim: Path | None = None,
    ) -> list[str]:
        """*argv* confined, writing only under *writable*; run it with :meth:`env`."""
        inner = [sys.executable, "-I", "-S", str(INIT), "setup"]
        for path in writable:
            inner += ["--writable", str(path)]
        if chroot_shim is not None:
            inner += ["--chroot-shim", str(chroot_shim)]
        namespaces = [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--ipc",
            "--uts",
            "--mount",
            "--propagation=private",
            "--mount-proc",
            *([] if network else ["--net"]),
            "--",
            *inner,
            "--",
            *argv,
        ]
        if self.systemd:
            return self._systemd_run(writable, self.env(env)) + namespaces
        caps = ",".join(
            f"+{name.removeprefix('CAP_').lower()}" for name in BUILD_CAPABILITIES
        )
        return [
            "setpriv",
            f"--bounding-set=-all,{caps}",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--no-new-privs",
            "--",
            *namespaces,
        ]

    def _systemd_run(
        self, writable: Sequence[Path], env: Mapping[str, str]
    ) -> list[str]:
        argv = [
            "systemd-run",
            "--quiet",
            "--wait",
            "--pipe",
            "--collect",
            "--service-type=exec",
            f"--unit={UNIT_PREFIX}{self.token}-{next(self._steps)}",
            f"--description=kdlab image build {self.token}",
        ]
        argv += [
            f"--property={key}={value}" for key, value in unit_properties(writable)
        ]
        argv += [f"--setenv={key}={value}" for key, value in env.items()]
        return [*argv, "--"]

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The environment of a confined command: *env* and the build's token."""
        return {**env, TOKEN_ENV: self.token}

    def chroot_shim(self) -> str:
        """The text of the program put over the host's chroot for debootstrap."""
        keep = ",".join(str(cap) for cap in in_target_capabilities())
        command = [sys.executable, "-I", "-S", str(INIT), "chroot", "--keep", keep]
        return f'#!/bin/sh\nexec {shlex.join(command)} "$@"\n'

    def kill(self) -> None:
        """Kill every process of the build and wait until they are gone (blocks)."""
        kill_build(self.token, systemd=self.systemd)


def tagged(token: str) -> list[int]:
    """The processes whose environment carries the build token *token*."""
    tag = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as file:
                environ = file.read()
        except OSError:  # gone, or a kernel thread
            continue
        if tag in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _stop_units(pattern: str, timeout: float) -> None:
    """``systemctl stop`` the units matching *pattern*; fail if any is left."""
    left = ""
    try:
        # Its exit status says little with a pattern (none loaded is fine):
        # what counts is that no such unit is left.
        subprocess.run(
            ["systemctl", "stop", pattern],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        listed = subprocess.run(
            ["systemctl", "list-units", "--plain", "--no-legend", pattern],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        left = listed.stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        left = str(err)
    if left:
        raise BuildFailed(
            f"could not stop the build units {pattern} ({left}): stop them with "
            f"systemctl stop '{pattern}'"
        )


def kill_build(token: str, *, systemd: bool, timeout: float = KILL_TIMEOUT) -> None:
    """Kill what is left of build *token* and wait for it to be gone (blocks).

    The token is random and recorded before the build started anything, so
    whatever carries it is the build's, whatever became of its PIDs.
    """
    if systemd:
        _stop_units(f"{UNIT_PREFIX}{token}-*", timeout)
        return
    deadline = time.monotonic() + timeout
    while found := tagged(token):
        if time.monotonic() > deadline:
            raise BuildFailed(
                f"processes {found} of build {token} did not die within "
                f"{timeout:g} s: kill them (kill -9)"
            )
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
