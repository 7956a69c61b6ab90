"""kdlabd on the bus: call latency and scale, on libvirt's test driver.

kdlabd serves a test driver file pre-populated with N kdlab domains
(:func:`tests.bus.harness.driver_xml`, through :class:`tests.bus.harness.Lab`)
on a private dbus-daemon with kdlab's bus policy; a dbus-next client
(:class:`tests.bus.harness.BusClient`) makes one call at a time.

- ``dbus_call_latency``: p50 and p99 of ``GetManagedObjects`` and ``ListVMs``
  with 100 VMs, each call interleaved with the bus's own ``GetId`` (a round
  trip to dbus-daemon, which answers it itself); and what a command costs:
  ``kdlabctl list`` against ``busctl call ... GetManagedObjects``.
- ``scale``: kdlabd's start-up time, its RSS (``VmRSS``) and ``ListVMs`` p50
  with 10, 100 and 1000 VMs. The baseline is the same daemon with 10 VMs,
  measured in the same run: the ratio is how the cost grows with the fleet.
  (The bus's GetId is already the baseline of dbus_call_latency.)
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dbus_next import Message, MessageType

from bench.lab import BenchError, run, scratch
from bench.measure import (
    INFO,
    NO_GOAL,
    Row,
    failed,
    interleaved,
    percentile,
    row,
    seconds,
)
from kdlabd.wire import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH
from tests.bus.harness import (
    DBUS_NAME,
    DBUS_PATH,
    OBJECT_MANAGER,
    BusClient,
    FakeVM,
    Lab,
    PrivateBus,
)
from tests.harness import Kdlabd

ANSWER_TIMEOUT = 5.0
CALL_TIMEOUT = 15.0
FLEET = 100
SCALES = (10, 100, 1000)

# (destination, path, interface, member) of each call measured.
CALLS = {
    "GetManagedObjects": (BUS_NAME, MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects"),
    "ListVMs": (BUS_NAME, MANAGER_PATH, MANAGER_INTERFACE, "ListVMs"),
    "GetId": (DBUS_NAME, DBUS_PATH, DBUS_NAME, "GetId"),
}


def fleet(count: int) -> list[FakeVM]:
    """*count* defined kdlab VMs, as the bus tier writes them into a driver file."""
    return [
        FakeVM(
            f"bench-{i:04d}",
            "defined",
            0,
            "root=/dev/vda",
            "root=/dev/vda console=ttyS0 nokaslr",
        )
        for i in range(count)
    ]


class DeafDaemon(BenchError):
    """kdlabd never answered: it did not take its name, or took it and went deaf."""


@dataclass
class Served:
    """kdlabd serving a fleet, a client, and how its start went."""

    lab: Lab
    client: BusClient
    startup: float  # seconds until kdlabd owned its name
    deaf_starts: list[str]  # why the starts before this one failed

    def rss_mib(self) -> float:
        """kdlabd's resident memory (VmRSS), in MiB."""
        (pid,) = self.client.ok(
            DBUS_PATH,
            DBUS_NAME,
            "GetConnectionUnixProcessID",
            "s",
            [BUS_NAME],
            destination=DBUS_NAME,
        )
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"no VmRSS in /proc/{pid}/status")

    def note(self) -> str:
        if not self.deaf_starts:
            return ""
        return (
            f"; {len(self.deaf_starts)} earlier start(s) of kdlabd never answered "
            f"({self.deaf_starts[-1]})"
        )


def _stop(daemon: Kdlabd) -> None:
    if daemon.running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.stop(timeout=10)  # kills it after that


def _start(lab: Lab, count: int) -> tuple[BusClient, float]:
    """Start kdlabd; a client and the start-up time, once ListVMs is answered.

    Owning the name is not enough: a kdlabd whose connection died during its
    start-up burst of signals owns it and never answers (DeafDaemon).
    """
    lab.populate()
    timeout = 5 + count / 100
    try:
        startup = seconds(lambda: lab.daemon.start(timeout=timeout))
    except RuntimeError:
        _stop(lab.daemon)
        raise DeafDaemon(f"no {BUS_NAME} on the bus after {timeout:.0f} s") from None
    client = BusClient(lab.daemon.address)
    try:
        latency(client, "ListVMs", timeout=ANSWER_TIMEOUT)
    except TimeoutError:
        client.close()
        _stop(lab.daemon)
        raise DeafDaemon(
            f"owned {BUS_NAME} but left ListVMs unanswered for {ANSWER_TIMEOUT:.0f} s"
        ) from None
    return client, startup


@contextlib.contextmanager
def served(count: int, attempts: int = 3) -> Iterator[Served]:
    """kdlabd on a private bus serving *count* VMs from a fresh test driver file.

    A kdlabd that never answers is stopped and started again on a fresh file,
    up to *attempts* times; the failures are kept for the rows' notes.
    """
    with scratch() as root:
        bus = PrivateBus(root / "bus").start()
        try:
            deaf: list[str] = []
            for attempt in range(attempts):
                workdir = root / f"start-{attempt}"
                workdir.mkdir(mode=0o711)
                lab = Lab(bus, workdir, fleet(count))
                try:
                    client, startup = _start(lab, count)
                except DeafDaemon as err:
                    deaf.append(str(err))
                    continue
                try:
                    yield Served(lab, client, startup, deaf)
                finally:
                    client.close()
                    _stop(lab.daemon)
                return
            raise DeafDaemon(f"kdlabd with {count} VMs, {attempts} starts: {deaf[-1]}")
        finally:
            bus.stop()


def latency(client: BusClient, call: str, timeout: float = CALL_TIMEOUT) -> float:
    """Seconds for one round trip of *call* (see :data:`CALLS`)."""
    destination, path, interface, member = CALLS[call]
    message = Message(
        destination=destination, path=path, interface=interface, member=member
    )

    async def timed() -> float:
        start = time.perf_counter()
        reply = await client.bus.call(message)
        took = time.perf_counter() - start
        if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
            raise BenchError(f"{member} failed: {reply and reply.body}")
        return took

    return client.run(timed(), timeout)


def _call_rows(served: Served, call: str, runs: int) -> list[Row]:
    ours, theirs = interleaved(
        runs,
        lambda: latency(served.client, call),
        lambda: latency(served.client, "GetId"),
        warmup=20,
    )
    note = f"{FLEET} VMs defined, one call at a time, dbus-next client{served.note()}"
    return [
        row(
            f"dbus_call_latency:{call} {label}",
            ours,
            theirs,
            baseline="org.freedesktop.DBus.GetId (the bus itself)",
            unit="ms",
            goal=NO_GOAL,
            stat=percentile(q),
            scale=1000.0,
            note=note,
        )
        for label, q in (("p50", 50), ("p99", 99))
    ]


def _cli_rows(address: str, runs: int) -> list[Row]:
    """What one command costs: kdlabctl (Python) against busctl (C), same call."""
    kdlabctl = [sys.executable, "-m", "kdlabctl"]
    busctl = [
        "busctl",
        f"--address={address}",
        "call",
        BUS_NAME,
        MANAGER_PATH,
        OBJECT_MANAGER,
        "GetManagedObjects",
    ]
    listing, raw = interleaved(
        runs,
        lambda: seconds(lambda: run([*kdlabctl, "--bus", address, "list"])),
        lambda: seconds(lambda: run(busctl)),
    )
    helped, bare = interleaved(
        runs,
        lambda: seconds(lambda: run([*kdlabctl, "--help"])),
        lambda: seconds(lambda: run([sys.executable, "-c", "pass"])),
    )
    return [
        row(
            "cli:kdlabctl_list",
            listing,
            raw,
            baseline="busctl call ... GetManagedObjects",
            unit="ms",
            goal=INFO,
            scale=1000.0,
            note=f"a whole command, {FLEET} VMs",
        ),
        row(
            "cli:kdlabctl_startup",
            helped,
            bare,
            baseline="python -c pass (same interpreter)",
            unit="ms",
            goal=INFO,
            scale=1000.0,
            note="kdlabctl --help: interpreter and imports, no bus",
        ),
    ]


def dbus_call_latency(quick: bool) -> list[Row]:
    """p50/p99 of kdlabd's listing calls against the bus's own round trip."""
    calls = 300 if quick else 2000
    with served(FLEET) as lab:
        return [
            *_call_rows(lab, "GetManagedObjects", calls),
            *_call_rows(lab, "ListVMs", calls),
            *_cli_rows(lab.lab.daemon.address, 5 if quick else 15),
        ]


METRICS = {"startup": "s", "rss": "MiB", "ListVMs_p50": "ms"}


@dataclass
class _Fleet:
    """What was measured of kdlabd serving *count* VMs, over the rounds."""

    count: int
    metrics: dict[str, list[float]] = field(default_factory=dict)
    starts: int = 0
    deaf: list[str] = field(default_factory=list)
    broken: str = ""

    def measure(self, calls: int, attempts: int) -> None:
        if self.broken:
            return
        try:
            with served(self.count, attempts) as lab:
                listing = [latency(lab.client, "ListVMs") for _ in range(calls)]
                measured = {
                    "startup": lab.startup,
                    "rss": lab.rss_mib(),
                    "ListVMs_p50": statistics.median(listing) * 1000,
                }
                self.starts += 1 + len(lab.deaf_starts)
                self.deaf += lab.deaf_starts
        except DeafDaemon as err:
            self.starts += attempts
            self.broken = str(err)
            return
        for metric, value in measured.items():
            self.metrics.setdefault(metric, []).append(value)

    def note(self) -> str:
        deaf = f"; {len(self.deaf)} of {self.starts} starts never answered"
        return "one kdlabd per size and round, defined VMs" + (
            deaf if self.deaf else ""
        )


def scale(quick: bool) -> list[Row]:
    """Start-up, memory and ListVMs latency with 10, 100 and 1000 VMs."""
    rounds, calls, attempts = (1, 50, 2) if quick else (3, 200, 3)
    fleets = [_Fleet(count) for count in SCALES]
    for i in range(rounds):
        for fleet_ in [*fleets[i % 3 :], *fleets[: i % 3]]:  # rotated, as interleaved
            fleet_.measure(calls, attempts)
    base = fleets[0]
    return [
        _scale_row(metric, fleet_, base) for fleet_ in fleets[1:] for metric in METRICS
    ]


def _scale_row(metric: str, fleet_: _Fleet, base: _Fleet) -> Row:
    name, unit = f"scale:{metric}@{fleet_.count}", METRICS[metric]
    baseline = f"the same with {base.count} VMs"
    why = fleet_.broken or base.broken
    if why:
        return failed(name, baseline=baseline, unit=unit, goal=NO_GOAL, why=why)
    return row(
        name,
        fleet_.metrics[metric],
        base.metrics[metric],
        baseline=baseline,
        unit=unit,
        goal=NO_GOAL,
        note=fleet_.note(),
    )
