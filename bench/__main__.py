"""``bench/run``: every benchmark, kdlab against its baseline in the same run."""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import (
    boot,
    bus,
    checkpoint,
    debug,
    dumps,
    execs,
    kernel,
    lab,
    recording,
    rootfs,
    storage,
)
from bench.measure import Goal, Row, failed


@dataclass(frozen=True)
class Benchmark:
    run: Callable[[bool], list[Row]]
    quick: bool = True  # part of --quick when no names are given


BENCHMARKS = {
    "boot_to_userspace": Benchmark(boot.boot_to_userspace),
    "time_to_breakpoint": Benchmark(debug.time_to_breakpoint),
    "remote_time_to_breakpoint": Benchmark(debug.remote_time_to_breakpoint),
    "disk_boot_to_login": Benchmark(boot.disk_boot_to_login),
    "checkpoint_restore": Benchmark(checkpoint.checkpoint_restore),
    "overlay_create": Benchmark(storage.overlay_create),
    "rootfs_build": Benchmark(rootfs.rootfs_build),
    "dbus_call_latency": Benchmark(bus.dbus_call_latency),
    "scale": Benchmark(bus.scale),
    "dump_take": Benchmark(dumps.dump_take),
    "record_overhead": Benchmark(recording.record_overhead),
    "reverse_step_latency": Benchmark(recording.reverse_step_latency),
    "exec_roundtrip": Benchmark(execs.exec_roundtrip),
    "kernel_build": Benchmark(kernel.kernel_build, quick=False),
}


def _first_line(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout.splitlines() or ["?"])[0]


def _accel() -> str:
    """How kdlabd accelerates VMs here, as a bench kdlabd reports it."""
    try:
        return lab.detect_accel()
    except Exception as err:
        return f"unknown (no bench kdlabd: {err})".splitlines()[0][:300]


def _machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    memory = Path("/proc/meminfo").read_text().split()[1]
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": str(len(models)),
        "memory": f"{int(memory) >> 20} GiB",
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "libvirt": _first_line(["libvirtd", "--version"]),
        "python": platform.python_version(),
        "accel": _accel(),
        "load_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def _number(value: float) -> str:
    return "FAILED" if math.isnan(value) else f"{value:.3f}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "-"}[met]


def print_table(rows: list[Row]) -> None:
    print(
        f"{'benchmark':<40} {'kdlab':>10} {'baseline':>10} {'ratio':>7} {'unit':<4} "
        f"{'runs':>4}  {'goal':<22} {'met?':<6}  baseline (what kdlab is compared with)"
    )
    for r in rows:
        print(
            f"{r.name:<40} {_number(r.kdlab):>10} {_number(r.baseline_value):>10} "
            f"{r.ratio:>7.2f} {r.unit:<4} {r.runs:>4}  {r.goal.text:<22} "
            f"{_verdict(r.met):<6}  {r.baseline}"
        )
        if r.note:
            print(f"{'':<42}{r.note}")


def _run_one(name: str, quick: bool) -> tuple[list[Row], bool]:
    """The rows of one benchmark, and whether it ran to its end."""
    print(f"== {name}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        rows = BENCHMARKS[name].run(quick)
    except Exception as err:
        traceback.print_exc()
        why = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        return [failed(name, baseline="-", unit="-", goal=Goal("-"), why=why)], False
    finally:
        print(f"   {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return rows, True


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every benchmark's clean-up still runs."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs, a few minutes"
    )
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], metavar="NAME")
    args = parser.parse_args(argv)
    _exit_on_sigterm()
    names = args.names or [
        name for name, bench in BENCHMARKS.items() if bench.quick or not args.quick
    ]
    machine = _machine()
    print(f"accel: {machine['accel']} (as kdlabd chose it)", file=sys.stderr)
    started = time.monotonic()
    rows: list[Row] = []
    completed = True
    for name in names:
        more, ok = _run_one(name, args.quick)
        rows.extend(more)
        completed = completed and ok
    print_table(rows)
    if args.output:
        command = shlex.join(
            ["bench/run", *(argv if argv is not None else sys.argv[1:])]
        )
        report = {
            "machine": machine,
            "command": command,
            "seconds": round(time.monotonic() - started),
            "rows": [r.as_json() for r in rows],
        }
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if completed else 1


if __name__ == "__main__":
    sys.exit(main())
