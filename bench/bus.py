"""kdlabd on the bus: call latency and scale, on libvirt's test driver.

kdlabd serves a test driver file pre-populated with N kdlab domains
(:func:`tests.support.testdriver.driver_xml`, through
:class:`tests.support.testdriver.Lab`)
on a private dbus-daemon with kdlab's bus policy. A call's latency is the
server's share: a client that takes the reply's bytes without decoding them
(:class:`bench.rawbus.RawClient`) makes one call at a time. What a dbus-next
client then spends decoding the reply is the client's share, a row of its own.

- ``dbus_call_latency``: p50 and p99 of ``GetManagedObjects`` and ``ListVMs``
  with 100 VMs, each call interleaved with the bus's own ``GetId`` (a round
  trip to dbus-daemon, which answers it itself); the decoding of each reply;
  and what a command costs: ``kdlabctl list`` against ``busctl call ...
  GetManagedObjects``.
- ``scale``: kdlabd's start-up time, its RSS (``VmRSS``), ``ListVMs`` and
  ``GetManagedObjects`` p50 and the decoding of their replies, with 10, 100
  and 1000 VMs. The baseline is the same daemon with 10 VMs, measured in the
  same run: the ratio is how the cost grows with the fleet. (The bus's GetId
  is already the baseline of dbus_call_latency.)
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.lab import BenchError, run, scratch
from bench.measure import (
    INFO,
    NO_GOAL,
    Goal,
    Row,
    interleaved,
    percentile,
    row,
    seconds,
)
from bench.rawbus import RawClient, decode_seconds
from kdlab.wire import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH
from tests.support.bus import (
    DBUS_NAME,
    DBUS_PATH,
    OBJECT_MANAGER,
    BusClient,
    PrivateBus,
)
from tests.support.testdriver import Lab, defined_fleet
from tests.support.timeouts import CALL_TIMEOUT

FLEET = 100
INSTALLED_PREFIX = Path("/opt/kdlab")  # .ci/install's prefix
PYTHON_DIR = f"python{sys.version_info.major}.{sys.version_info.minor}"
SCALES = (10, 100, 1000)
# scale starts kdlabd on up to 1000 VMs: more than the tests' STARTUP_TIMEOUT allows.
FLEET_STARTUP_TIMEOUT = 60.0
# Decoding a reply of 1000 VMs takes a dbus-next client about 0.1 s: fewer of them.
DECODES = 10
# Issue 13: GetManagedObjects and ListVMs of 1000 VMs, p50, server's share.
GOALS = {
    "GetManagedObjects_p50@1000": Goal("<= 40 ms", max_value=40),
    "ListVMs_p50@1000": Goal("<= 2 ms", max_value=2),
}

# (destination, path, interface, member) of each call measured.
CALLS = {
    "GetManagedObjects": (BUS_NAME, MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects"),
    "ListVMs": (BUS_NAME, MANAGER_PATH, MANAGER_INTERFACE, "ListVMs"),
    "GetId": (DBUS_NAME, DBUS_PATH, DBUS_NAME, "GetId"),
}


@dataclass
class Served:
    """kdlabd serving a fleet, two clients, and how long its start took."""

    lab: Lab
    client: BusClient
    raw: RawClient  # what the latencies are measured with
    startup: float  # seconds until kdlabd owned its name

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


@contextlib.contextmanager
def served(count: int) -> Iterator[Served]:
    """kdlabd on a private bus serving *count* VMs from a fresh test driver file."""
    with scratch() as root:
        bus = PrivateBus(root / "bus").start()
        lab = Lab(bus, root, defined_fleet(count, "bench"))
        lab.populate()
        try:
            startup = seconds(lambda: lab.daemon.start(timeout=FLEET_STARTUP_TIMEOUT))
            client = BusClient(lab.daemon.address)
            raw = RawClient(lab.daemon.address, CALL_TIMEOUT)
            try:
                yield Served(lab, client, raw, startup)
            finally:
                raw.close()
                client.close()
        finally:
            try:
                if lab.daemon.running:
                    lab.daemon.stop()  # exit 0 within seconds, or it is killed
            finally:
                bus.stop()


def latency(served: Served, call: str) -> float:
    """Seconds for one round trip of *call* (see :data:`CALLS`), server's share."""
    return served.raw.timed(*CALLS[call])[0]


def decoding(served: Served, call: str) -> float:
    """Seconds a dbus-next client spends decoding the reply to *call*."""
    return decode_seconds(served.raw.call(*CALLS[call]))


def _call_rows(served: Served, call: str, runs: int) -> list[Row]:
    ours, theirs = interleaved(
        runs,
        lambda: latency(served, call),
        lambda: latency(served, "GetId"),
        warmup=20,
    )
    decoded, decoded_id = interleaved(
        DECODES, lambda: decoding(served, call), lambda: decoding(served, "GetId")
    )
    note = f"{FLEET} VMs defined, one call at a time, the reply's bytes not decoded"
    return [
        *(
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
        ),
        row(
            f"dbus_call_latency:{call} decode",
            decoded,
            decoded_id,
            baseline="decoding GetId's reply",
            unit="ms",
            goal=INFO,
            scale=1000.0,
            note="the client's share: a dbus-next client decoding the reply",
        ),
    ]


def installed_kdlabctl() -> tuple[list[str], list[str]]:
    """The kdlabctl users run (``.ci/install``'s, in /opt/kdlab) and its
    interpreter; refused when it holds other code than this tree."""
    tree = Path(__file__).resolve().parent.parent / "kdlabctl"
    installed = INSTALLED_PREFIX / "lib" / PYTHON_DIR / "site-packages" / "kdlabctl"
    stale = [
        source.name
        for source in sorted(tree.glob("*.py"))
        if not (installed / source.name).is_file()
        or (installed / source.name).read_bytes() != source.read_bytes()
    ]
    if stale:
        raise BenchError(
            f"{INSTALLED_PREFIX} holds other kdlabctl code than this tree "
            f"({', '.join(stale)}): run .ci/install (or .ci/setup) first"
        )
    return [str(INSTALLED_PREFIX / "bin" / "kdlabctl")], [
        str(INSTALLED_PREFIX / "bin" / "python3")
    ]


def _cli_rows(address: str, runs: int) -> list[Row]:
    """What one command costs: kdlabctl (Python) against busctl (C), same call;
    the installed kdlabctl, as users start it."""
    kdlabctl, python = installed_kdlabctl()
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
        lambda: seconds(lambda: run([*python, "-c", "pass"])),
    )
    return [
        row(
            "cli:kdlabctl_list",
            listing,
            raw,
            baseline="busctl call ... GetManagedObjects",
            unit="ms",
            goal=Goal("ratio <= 3", max_ratio=3.0),
            scale=1000.0,
            note=f"a whole command, {FLEET} VMs",
        ),
        row(
            "cli:kdlabctl_startup",
            helped,
            bare,
            baseline="python -c pass (kdlabctl's interpreter)",
            unit="ms",
            goal=Goal("ratio <= 1.5", max_ratio=1.5),
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


METRICS = {
    "startup": "s",
    "rss": "MiB",
    "ListVMs_p50": "ms",
    "GetManagedObjects_p50": "ms",
    "ListVMs_decode": "ms",
    "GetManagedObjects_decode": "ms",
}


def _measure_fleet(count: int, calls: int) -> dict[str, float]:
    """kdlabd's start-up, memory and listing latencies serving *count* VMs."""
    with served(count) as lab:
        listing = [latency(lab, "ListVMs") for _ in range(calls)]
        objects = [latency(lab, "GetManagedObjects") for _ in range(calls)]
        listing_decoded = [decoding(lab, "ListVMs") for _ in range(DECODES)]
        objects_decoded = [decoding(lab, "GetManagedObjects") for _ in range(DECODES)]
        return {
            "startup": lab.startup,
            "rss": lab.rss_mib(),
            "ListVMs_p50": statistics.median(listing) * 1000,
            "GetManagedObjects_p50": statistics.median(objects) * 1000,
            "ListVMs_decode": statistics.median(listing_decoded) * 1000,
            "GetManagedObjects_decode": statistics.median(objects_decoded) * 1000,
        }


def scale(quick: bool) -> list[Row]:
    """Start-up, memory and listing latency with 10, 100 and 1000 VMs.

    One kdlabd per size and round; the rounds rotate the sizes, as
    :func:`bench.measure.interleaved` does. Each round gives a row one run:
    the median of its calls.
    """
    rounds, calls = (1, 50) if quick else (5, 200)
    measured: dict[int, list[dict[str, float]]] = {count: [] for count in SCALES}
    for i in range(rounds):
        for count in [*SCALES[i % 3 :], *SCALES[: i % 3]]:
            measured[count].append(_measure_fleet(count, calls))
    base = SCALES[0]
    return [
        row(
            f"scale:{metric}@{count}",
            [m[metric] for m in measured[count]],
            [m[metric] for m in measured[base]],
            baseline=f"the same with {base} VMs",
            unit=unit,
            goal=GOALS.get(f"{metric}@{count}", NO_GOAL),
            note=f"defined VMs, {calls} calls a round"
            + ("; a dbus-next client decoding" if metric.endswith("_decode") else ""),
        )
        for count in SCALES[1:]
        for metric, unit in METRICS.items()
    ]
