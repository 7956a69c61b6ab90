"""kdlabd as a subprocess on a private bus, as the bus and vm tiers and bench run it.

:class:`Kdlabd` starts it with a config file of the test's own (so
``/etc/kdlab/kdlabd.toml`` never leaks in), is ready when kdlabd owns its bus
name, and stops it with SIGTERM, which must end it cleanly: every stop counts
in the figure "clean SIGTERM exits" (tests/conftest.py). A kdlabd that dies
on its own fails the test that owned it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdlab.wire import BUS_NAME
from tests.support import REPO
from tests.support.bus import name_has_owner
from tests.support.timeouts import (
    STARTUP_TIMEOUT,
    STOP_SECONDS,
    SYSTEM_STARTUP_TIMEOUT,
)


@dataclass(frozen=True)
class Stop:
    """One SIGTERM of a kdlabd by the tests, and how it ended."""

    pid: int
    status: int | None  # None: it did not exit within STOP_SECONDS
    expected: int

    @property
    def clean(self) -> bool:
        return self.status == self.expected


# Every stop of the run, for the "clean SIGTERM exits" figure (tests/conftest.py).
STOPS: list[Stop] = []


@dataclass
class Kdlabd:
    """kdlabd as a subprocess on a private bus."""

    address: str
    libvirt_uri: str
    state_dir: Path
    runtime_dir: Path
    extra_args: Sequence[str] = ()
    config_text: str = ""
    log_path: Path | None = None
    # RLIMIT_NOFILE (soft and hard) to start kdlabd with; None: the tests' own.
    nofile: int | None = None

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        # Whether the test ended this kdlabd (stop, kill) or waited for its end
        # (wait). Any other end is a death on its own: it fails the test.
        self._ended_by_test = False

    def start(
        self, timeout: float = SYSTEM_STARTUP_TIMEOUT, env: dict[str, str] | None = None
    ) -> None:
        """Start kdlabd; *env* adds to the environment (KDLAB_TEST_CRASH_AT, ...).

        The kdlabd started before, if any, must not have died on its own.
        """
        self._fail_if_died()
        self._ended_by_test = False
        self.log_path = self.log_path or self.state_dir.parent / "kdlabd.log"
        log = self.log_path.open("ab")
        limit = [] if self.nofile is None else ["prlimit", f"--nofile={self.nofile}"]
        self._proc = subprocess.Popen(
            [
                *limit,
                sys.executable,
                "-m",
                "kdlabd",
                "--bus",
                self.address,
                "--libvirt-uri",
                self.libvirt_uri,
                "--state-dir",
                str(self.state_dir),
                "--runtime-dir",
                str(self.runtime_dir),
                "--log-format",
                "json",
                "--config",
                str(self._config()),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **env} if env else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._ended_by_test = True  # reported here, not again at the stop
                raise RuntimeError(
                    f"kdlabd exited {self._proc.returncode}:\n{self.log()}"
                )
            if name_has_owner(self.address, BUS_NAME):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"kdlabd did not take {BUS_NAME} in {timeout}s:\n{self.log()}"
        )

    def _config(self) -> Path:
        """A config file of the test's own, so /etc/kdlab/kdlabd.toml never leaks in."""
        path = self.state_dir.parent / "kdlabd.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config_text)
        return path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def events(self) -> list[dict[str, object]]:
        """The log so far as events (each line is ``<priority>{json}``)."""
        lines = [line for line in self.log().splitlines() if "{" in line]
        return [json.loads(line[line.index("{") :]) for line in lines]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def started(self) -> bool:
        """Started and not ended by the test since (it may have died on its own):
        the test still owes it a stop, which fails if it did die."""
        return self._proc is not None and not self._ended_by_test

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def signal_behind_the_harness(self, how: signal.Signals) -> None:
        """Send *how* to kdlabd as a stray process would, then wait until it has
        gone; the harness is not told (tests of the harness itself)."""
        os.kill(self.pid, how)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while self.running:
            assert time.monotonic() < deadline, f"kdlabd ignored {how.name}"
            time.sleep(0.05)

    def died_on_its_own(self) -> str:
        """What happened if kdlabd ended without the test stopping, killing or
        waiting for it (whatever its exit status); else ""."""
        if self._proc is None or self._ended_by_test or self._proc.poll() is None:
            return ""
        return (
            f"kdlabd died on its own during the test (exit status "
            f"{self._proc.returncode}):\n{self.log()}"
        )

    def _fail_if_died(self) -> None:
        problem = self.died_on_its_own()
        assert not problem, problem

    def stop(self, expected: int = 0) -> int:
        """SIGTERM kdlabd: it must exit with *expected* within STOP_SECONDS.

        One that hangs is killed; either way the test fails, with kdlabd's log.
        Every stop counts in the figure "clean SIGTERM exits". A kdlabd that
        already died on its own fails the test instead: its status would tell
        nothing about a stop.
        """
        assert self._proc is not None
        self._fail_if_died()
        self._ended_by_test = True
        self._proc.send_signal(signal.SIGTERM)
        try:
            status: int | None = self._proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            status = None
        stop = Stop(self._proc.pid, status, expected)
        STOPS.append(stop)
        if stop.clean:
            return expected
        what = (
            f"did not exit within {STOP_SECONDS:g} s"
            if status is None
            else f"exited {status}, not {expected}"
        )
        raise AssertionError(f"kdlabd {what} on SIGTERM:\n{self.log()[-6000:]}")

    def kill(self) -> None:
        assert self._proc is not None
        self._fail_if_died()
        self._ended_by_test = True
        self._proc.kill()
        self._proc.wait()

    def wait(self, timeout: float = 30) -> int:
        """Wait for kdlabd to end by itself, as the test expects; its exit status
        (-9: it was killed)."""
        assert self._proc is not None
        self._ended_by_test = True
        return self._proc.wait(timeout=timeout)


def processes_with(text: str) -> list[str]:
    """Live processes whose command line contains *text*, as "PID command line".

    (A zombie's command line is empty: the dead are not counted.) Processes in
    another PID namespace are found too, by their PIDs on the host.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name} {words[:100]}")
    return found
