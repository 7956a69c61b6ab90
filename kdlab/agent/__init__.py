"""kdlab's guest exec agent: its C source and how to build it.

The agent (``agent.c``, one file, no dependencies) runs in the guest, reads
frames from the virtio-serial port ``PORT_NAME`` and runs commands for
kdlabd (``kdlab/agent/protocol.py`` is the protocol). It is built here, on
the host, as a static binary, so the initramfs needs no C library of its own.
In a guest image it runs as ``GUEST_BINARY`` under the systemd unit ``UNIT``
(one file, package data: kdlabd installs both in the images it builds, and
users in images of their own).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("agent.c")
PORT_NAME = "org.kdlab.agent.0"
GUEST_PORT = f"/dev/virtio-ports/{PORT_NAME}"
GUEST_BINARY = "/usr/local/sbin/kdlab-agent"
"""Where a guest image keeps the agent (``UNIT``'s ``ExecStart``)."""
UNIT = Path(__file__).with_name("kdlab-agent.service")
"""The systemd unit that runs the agent in a guest image, at boot."""
CC = "cc"
CC_FLAGS = ("-static", "-O2", "-Wall", "-Wextra", "-Werror")
CC_SECONDS = 60
_INSTALL = "install gcc and libc6-dev"


class AgentBuildError(Exception):
    """The agent could not be compiled; the message says what to install."""


def _run_cc(args: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            [CC, *args], capture_output=True, timeout=CC_SECONDS, check=False
        )
    except FileNotFoundError:
        raise AgentBuildError(
            f"no C compiler ({CC}) to build kdlab's guest agent: {_INSTALL}"
        ) from None
    except subprocess.TimeoutExpired:
        raise AgentBuildError(
            f"{CC} did not finish building kdlab's guest agent in {CC_SECONDS} s"
        ) from None


def build(cache_dir: Path) -> Path:
    """The agent binary, compiled into *cache_dir* unless it is there already.

    Its name holds a digest of the source, the compiler's version and flags,
    so a new source or compiler builds a new binary; the binary appears only
    complete (written under a temporary name, then renamed).
    """
    source = SOURCE.read_bytes()
    version = _run_cc(["--version"])
    if version.returncode != 0:
        raise AgentBuildError(
            f"{CC} --version failed ({_INSTALL}): {version.stderr.decode().strip()}"
        )
    recipe = source + version.stdout + " ".join(CC_FLAGS).encode()
    digest = hashlib.sha256(recipe).hexdigest()[:16]
    target = cache_dir / f"kdlab-agent-{digest}"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".kdlab-agent-", dir=cache_dir)
    os.close(fd)
    try:
        done = _run_cc([*CC_FLAGS, "-o", temporary, str(SOURCE)])
        if done.returncode != 0:
            raise AgentBuildError(
                f"{CC} could not build kdlab's guest agent ({_INSTALL}): "
                f"{done.stderr.decode(errors='replace').strip()}"
            )
        os.chmod(temporary, 0o755)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return target
