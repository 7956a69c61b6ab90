"""Client programs as the tests and benchmarks run them: kdlabctl, gdbus, any tool.

Each runs with a minimal environment (nothing of the caller's leaks in),
optionally as another uid through ``setpriv``; :func:`kdlabctl` also fails
when its output holds a Python traceback. A kdlabctl the caller drives itself
(a console on a pseudo-terminal, a gdb-proxy) takes :func:`kdlabctl_argv` and
:func:`ctl_env`.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kdlab.wire import BUS_NAME
from tests.support import REPO
from tests.support.timeouts import CTL_TIMEOUT, TOOL_TIMEOUT

# What a Python traceback leaks into a message; no reply or CLI output may hold it.
TRACEBACK_MARKERS = ("Traceback", 'File "', '.py"')


@dataclass(frozen=True)
class Identity:
    """A uid to run a client as (through setpriv), with its groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def setpriv(self) -> list[str]:
        groups = (
            f"--groups={','.join(map(str, self.groups))}"
            if self.groups
            else "--clear-groups"
        )
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", groups, "--"]


NOBODY = Identity(65534, 65534)


def has_traceback(text: str) -> bool:
    return any(marker in text for marker in TRACEBACK_MARKERS)


def assert_no_traceback(text: str) -> None:
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, f"Python traceback text {marker!r} leaked:\n{text}"


@functools.cache
def cache_home() -> Path:
    """The clients' ``$XDG_CACHE_HOME`` (gdb's index cache goes there): the
    tests' own, mode 0700, removed when they end; never the user's."""
    path = Path(tempfile.mkdtemp(prefix="kdlab-tests-cache-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def client_env() -> dict[str, str]:
    """A minimal environment for client programs: nothing of the caller's leaks in."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": "/",
        "XDG_CACHE_HOME": str(cache_home()),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def ctl_env(address: str) -> dict[str, str]:
    """The tests' own environment, for a kdlabctl they start themselves on *address*."""
    # $KDLAB_HOST of whoever runs the tests must not send them to a host.
    return {
        **os.environ,
        "KDLAB_BUS": address,
        "KDLAB_HOST": "",
        "XDG_CACHE_HOME": str(cache_home()),
    }


def run_tool(
    argv: list[str],
    *,
    user: Identity | None = None,
    timeout: float = TOOL_TIMEOUT,
    cwd: Path | None = None,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client program (as *user*, in *cwd*, fed *input_text* or nothing,
    with *env* added to :func:`client_env`) and capture its text output; never
    raises but on a timeout."""
    prefix = user.setpriv() if user is not None else []
    return subprocess.run(
        [*prefix, *argv],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        env={**client_env(), **(env or {})},
        input=input_text,
        stdin=None if input_text is not None else subprocess.DEVNULL,
        cwd=cwd,
    )


def kdlabctl_argv(address: str, *args: str) -> list[str]:
    """``kdlabctl --bus ADDRESS ARGS...`` with the interpreter running the tests."""
    return [sys.executable, "-m", "kdlabctl", "--bus", address, *args]


def kdlabctl(
    address: str,
    *args: str,
    user: Identity | None = None,
    timeout: float = CTL_TIMEOUT,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run this checkout's kdlabctl on the bus at *address* (as *user*, with
    *env* added to :func:`client_env`); its output must hold no traceback."""
    result = run_tool(
        kdlabctl_argv(address, *args),
        user=user,
        timeout=timeout,
        cwd=REPO,
        input_text=input_text,
        env=env,
    )
    assert_no_traceback(result.stdout + result.stderr)
    return result


def gdbus_call(
    address: str, path: str, method: str, *args: str, user: Identity | None = None
) -> subprocess.CompletedProcess[str]:
    """``gdbus call`` of kdlabd's *method* (``Interface.Member``) on *path*."""
    return run_tool(
        ["gdbus", "call", "--address", address, "--dest", BUS_NAME,
         "--object-path", path, "--method", method, *args],
        user=user,
    )  # fmt: skip


_GDBUS_ERROR = re.compile(r"GDBus\.Error:([\w.]+): (.*)", re.DOTALL)


def gdbus_error(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The D-Bus error name and message a failed ``gdbus call`` printed."""
    assert result.returncode != 0, f"gdbus call succeeded: {result.stdout}"
    match = _GDBUS_ERROR.search(result.stderr)
    assert match is not None, result.stderr
    return match[1], match[2]


def read_until(stream: int, text: str, timeout: float) -> str:
    """Read the pipe *stream* (a client's output) until *text* has come; what
    was read."""
    deadline = time.monotonic() + timeout
    seen = b""
    while text.encode() not in seen:
        ready, _, _ = select.select([stream], [], [], deadline - time.monotonic())
        chunk = os.read(stream, 65536) if ready else b""
        if not chunk:
            raise AssertionError(f"{text!r} not read; got {seen[-3000:]!r}")
        seen += chunk
    return seen.decode(errors="replace")
