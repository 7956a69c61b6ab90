"""kdlabctl(1), generated from the parser kdlabctl runs (:func:`cli.build_parser`).

``python -m kdlabctl.manpage DIR`` writes ``DIR/man1/kdlabctl.1``. .ci/install
runs it with the installed copy, so the manual describes the installed program.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlab import roff
from kdlabctl.cli import build_parser

SUMMARY = "the command-line client of kdlabd, kdlab's kernel debug lab"


def page() -> roff.Page:
    """kdlabctl(1): every command and option of :func:`build_parser`."""
    manual = roff.Page("kdlabctl", 1, SUMMARY)
    manual.program(build_parser())
    manual.heading("ENVIRONMENT")
    manual.item(
        roff.bold("KDLAB_BUS"),
        roff.fill("The bus kdlabd is on when --bus is not given (system, session "
                  "or a D-Bus address)."),
    )  # fmt: skip
    manual.item(
        roff.bold("KDLAB_HOST"),
        roff.fill("The host whose kdlabd commands use when --host is not given: "
                  "a name of hosts.toml or [USER@]HOST[:PORT]; empty or unset, "
                  "this machine. Commands that run only here (kernel, "
                  "completion) ignore it."),
    )  # fmt: skip
    manual.item(
        roff.bold("KDLAB_COCKPIT_WS"),
        roff.fill("The cockpit-ws program kdlabctl web runs (default "
                  "/usr/lib/cockpit/cockpit-ws); cockpit-bridge is found in PATH."),
    )  # fmt: skip
    manual.heading("FILES")
    manual.item(
        roff.bold("$XDG_CONFIG_HOME/kdlab/hosts.toml"),
        roff.fill("Hosts for --host, kdlabctl hosts and list --all-hosts (default "
                  "~/.config/kdlab/hosts.toml): a [hosts.NAME] table each, with "
                  "destination ([USER@]HOST[:PORT]), and optionally ssh_options "
                  "(a list), kdlabctl (the command that runs it on the host) and "
                  "bus (kdlabd's bus there, default system)."),
    )  # fmt: skip
    manual.see_also(("kdlabd", 8), ("kdlab-dbus", 7), ("gdb", 1), ("ssh", 1))
    return manual


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(
        prog="python -m kdlabctl.manpage", description="Write kdlabctl(1)."
    )
    cli.add_argument("directory", type=Path, help="the man directory (its man1/)")
    args = cli.parse_args(argv)
    print(page().write(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
