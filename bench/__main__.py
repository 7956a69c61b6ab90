"""``bench/run``: every benchmark, kdlab against its baseline in the same run."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench import boot
from bench.measure import Row

BENCHMARKS: dict[str, Callable[[bool], list[Row]]] = {
    "boot_to_userspace": boot.boot_to_userspace,
}


def _machine() -> dict[str, str]:
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
    return {
        "cpu": models[0] if models else platform.processor(),
        "cores": str(len(models)),
        "kernel": platform.release(),
        "qemu": qemu[0] if qemu else "?",
    }


def _print_table(rows: list[Row]) -> None:
    print(
        f"{'benchmark':<28} {'kdlab':>10} {'baseline':>10} {'ratio':>7} {'unit':<5} "
        "runs  goal"
    )
    for r in rows:
        print(
            f"{r.name:<28} {r.kdlab:>10.3f} {r.baseline_value:>10.3f} {r.ratio:>7.2f} "
            f"{r.unit:<5} {r.runs:>4}  {r.goal}   (vs {r.baseline})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs, a few minutes"
    )
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], metavar="NAME")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for name in args.names or BENCHMARKS:
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.extend(BENCHMARKS[name](args.quick))
    _print_table(rows)
    if args.output:
        args.output.write_text(
            json.dumps(
                {"machine": _machine(), "rows": [r.as_json() for r in rows]}, indent=2
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
