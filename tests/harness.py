"""Real processes for the bus and vm tiers: a private dbus-daemon and kdlabd.

The private bus loads kdlab's shipped bus policy (systemd/org.kdlab.Kdlab1.conf),
so what the tests see is what a system bus with kdlab installed enforces.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from tests.fixtures import debian

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "systemd" / "org.kdlab.Kdlab1.conf"
BUS_NAME = "org.kdlab.Kdlab1"
STARTUP_TIMEOUT = 15.0
# SIGTERM to exit: kdlabd waits at most a few seconds for libvirt on its way out.
STOP_SECONDS = 10.0

SYSTEM_BUS_CONFIG = Path("/usr/share/dbus-1/system.conf")  # dbus-system-bus-common


def bus_config(socket: Path, policy: Path | None) -> bytes:
    """A bus configuration with the system bus's own default policy.

    The ``<policy context="default">`` of the installed ``system.conf`` (deny
    owning names and sending method calls, except to the bus itself), then an
    include of the *policy* file (kdlab's shipped one, normally).
    """
    system = etree.parse(
        str(SYSTEM_BUS_CONFIG), etree.XMLParser(load_dtd=False, no_network=True)
    )
    config = etree.Element("busconfig")
    etree.SubElement(config, "type").text = "system"
    etree.SubElement(config, "listen").text = f"unix:path={socket}"
    etree.SubElement(config, "auth").text = "EXTERNAL"
    config.extend(system.getroot().findall("policy[@context='default']"))
    if policy is not None:
        etree.SubElement(config, "include").text = str(policy)
    return etree.tostring(config, doctype=system.docinfo.doctype)


class PrivateBus:
    """A dbus-daemon of our own with the system bus's default policy and kdlab's.

    The default policy is the installed system bus's (no one may own a name
    or call a method unless a policy file allows it), so kdlab's shipped
    policy alone must let root own org.kdlab.Kdlab1 and anyone call it.
    """

    def __init__(self, directory: Path, policy: Path | None = POLICY) -> None:
        self.directory = directory
        self.policy = policy
        self.address = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> PrivateBus:
        self.directory.mkdir(mode=0o755, exist_ok=True)
        config = self.directory / "bus.conf"
        config.write_bytes(bus_config(self.directory / "socket", self.policy))
        stderr = (self.directory / "dbus-daemon.log").open("w")
        with stderr:
            self._proc = subprocess.Popen(
                [
                    "dbus-daemon",
                    f"--config-file={config}",
                    "--print-address",
                    "--nofork",
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], STARTUP_TIMEOUT)
        self.address = self._proc.stdout.readline().strip() if ready else ""
        if not self.address:
            self.stop()
            log = (self.directory / "dbus-daemon.log").read_text()
            raise AssertionError(f"dbus-daemon printed no address:\n{log}")
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def ctl_env(address: str) -> dict[str, str]:
    env = dict(os.environ)
    env["KDLAB_BUS"] = address
    return env


def kdlabctl(
    address: str,
    *args: str,
    timeout: float = 120,
    user: int | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run kdlabctl against *address* (optionally as another uid, groups cleared)."""
    command: list[str] = [sys.executable, "-m", "kdlabctl", *args]
    if user is not None:
        command = [
            "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--clear-groups",
            *command,
        ]
    return subprocess.run(
        command,
        env=ctl_env(address),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        cwd=REPO,
        check=False,
    )


def kdlabctl_json(address: str, *args: str) -> object:
    result = kdlabctl(address, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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

    def start(self, timeout: float = 90, env: dict[str, str] | None = None) -> None:
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


def name_has_owner(address: str, name: str) -> bool:
    result = subprocess.run(
        [
            "busctl",
            f"--address={address}",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "b true"


SYSTEM_LIBVIRT = "qemu:///system"


def virsh(*args: str) -> subprocess.CompletedProcess[str]:
    """virsh on the system libvirtd."""
    return subprocess.run(
        ["virsh", "-c", SYSTEM_LIBVIRT, *args],
        capture_output=True,
        text=True,
        check=False,
    )


def forget_cached_base(suite: str, packages: tuple[str, ...]) -> None:
    """Remove the debootstrap base of *suite* with *packages* from the builds'
    cache (see :func:`system_kdlabd`), so the next such build bootstraps for
    real: a test that must catch debootstrap running cannot rely on no run
    before it having completed that build."""
    from kdlabd.core.rootfs import RootfsSpec, cache_key

    key = cache_key(RootfsSpec(suite, packages=packages))
    (debian.cache_dir() / "kdlabd" / f"{key}.tar").unlink(missing_ok=True)


@contextlib.contextmanager
def system_kdlabd(
    pool_prefix: str, accel: str = "tcg", config: str = "", nofile: int | None = None
) -> Iterator[Kdlabd]:
    """kdlabd on the system libvirtd, on a private bus, with its own state and pool.

    Its VMs are real domains of the system libvirtd; a kdlabd the developer
    runs is not disturbed. *config* adds lines to its kdlabd.toml, *nofile*
    sets its descriptor limit. On exit the daemon must stop cleanly (exit 0
    within STOP_SECONDS of SIGTERM, no traceback in its log) and must not have
    died on its own before; its pool and directories are removed.
    """
    # QEMU (the libvirt-qemu user) must traverse to the boot volumes and the
    # gdb socket: pytest's temporary directories are 0700, /var/tmp is not.
    root = Path(tempfile.mkdtemp(prefix="kdlab-lab-", dir="/var/tmp"))
    root.chmod(0o711)
    bus = PrivateBus(root / "bus").start()
    daemon = Kdlabd(
        address=bus.address,
        libvirt_uri=SYSTEM_LIBVIRT,
        state_dir=root / "state",
        runtime_dir=root / "run",
        extra_args=("--accel", accel),
        # Builds keep their debootstrap cache across runs, as a developer's do.
        config_text=(
            f'boot_pool = "{pool_prefix}-boot"\nimage_pool = "{pool_prefix}-images"\n'
            f'cache_dir = "{debian.cache_dir() / "kdlabd"}"\n{config}'
        ),
        nofile=nofile,
    )
    try:
        daemon.start()
        yield daemon
    finally:
        died = daemon.died_on_its_own()
        try:
            if daemon.running:
                daemon.stop()  # exit 0 within STOP_SECONDS, or it fails here
        finally:
            log = daemon.log()
            bus.stop()
            for pool in (f"{pool_prefix}-boot", f"{pool_prefix}-images"):
                virsh("pool-destroy", pool)
                virsh("pool-undefine", pool)
            shutil.rmtree(root, ignore_errors=True)
    if died:
        raise RuntimeError(died)
    if "Traceback" in log:
        raise RuntimeError(f"kdlabd logged a traceback:\n{log}")


@dataclass(frozen=True)
class BareGuest:
    """Bare QEMU under TCG booting a kernel, an initrd and a virtio disk.

    The hand-made baseline some vm tests boot without kdlab.
    """

    qemu: str
    kernel: Path
    initrd: Path
    disk: Path
    memory_mib: int = 512
    snapshot: bool = False

    def command(self, cmdline: str) -> list[str]:
        drive = [f"file={self.disk},if=virtio,format=raw"]
        # -snapshot: the boot writes into a temporary overlay, not the image.
        drive += ["-snapshot"] if self.snapshot else []
        return [
            self.qemu,
            *("-machine", "accel=tcg", "-m", str(self.memory_mib), "-smp", "1"),
            *("-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot"),
            *("-kernel", str(self.kernel), "-initrd", str(self.initrd)),
            "-drive",
            *drive,
            *("-append", cmdline),
        ]
