"""``kdlabctl completion bash`` in a real bash, against a real kdlabd.

The script is sourced as a user's ~/.bashrc would (``source <(kdlabctl
completion bash)``); then the words of a command line go into COMP_WORDS and
COMP_CWORD, the function ``complete -p kdlabctl`` names is called as bash's
readline would, and COMPREPLY is what bash offers. kdlabd is on the private
bus with the standard fleet (tests/support/testdriver.py).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from kdlabctl.client import CONNECT_TIMEOUT
from tests.support.bus import PrivateBus
from tests.support.clients import client_env, run_tool
from tests.support.testdriver import FLEET

pytestmark = pytest.mark.bus

# The kdlabctl program of the interpreter running the tests (this checkout's).
PROGRAMS = Path(sys.executable).parent


def offered(
    address: str, *words: str, env: dict[str, str] | None = None
) -> tuple[list[str], str]:
    """What bash offers for the command line *words* (the last is completed),
    and what it printed on stderr (*env* added to kdlabctl's)."""
    previous = ["kdlabctl", *words][-2]
    script = f"""
        source <(kdlabctl completion bash)
        spec=$(complete -p kdlabctl)
        function=${{spec#complete -F }}
        function=${{function% kdlabctl}}
        COMP_WORDS=(kdlabctl {shlex.join(words)})
        COMP_CWORD={len(words)}
        "$function" kdlabctl {shlex.quote(words[-1])} {shlex.quote(previous)}
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    path = f"{PROGRAMS}:{client_env()['PATH']}"
    result = run_tool(
        ["bash", "--norc", "--noprofile", "-c", script],
        env={"PATH": path, "KDLAB_BUS": address, **(env or {})},
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line], result.stderr


def test_the_script_is_valid_bash() -> None:
    script = run_tool([str(PROGRAMS / "kdlabctl"), "completion", "bash"])
    assert script.returncode == 0, script.stderr
    checked = run_tool(["bash", "-n"], input_text=script.stdout)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.usefixtures("kdlabd")
def test_bash_completes_vm_names_from_kdlabd(bus: PrivateBus) -> None:
    names, stderr = offered(bus.address, "start", "")
    assert names == sorted(vm.name for vm in FLEET)
    assert stderr == ""
    names, _ = offered(bus.address, "attach", "--console", "li")
    assert names == ["linux-6.9-rc1"]
    # The bus named on the command line is the one asked.
    names, _ = offered("unix:path=/nonexistent", "--bus", bus.address, "gdb", "b")
    assert names == ["booted", "busy"]


@pytest.mark.usefixtures("image_and_job")
def test_bash_completes_image_names_from_kdlabd(bus: PrivateBus) -> None:
    assert offered(bus.address, "image", "delete", "")[0] == ["base"]
    assert offered(bus.address, "create", "new", "--image", "b")[0] == ["base"]


def test_bash_completes_commands_options_and_files(bus: PrivateBus) -> None:
    assert offered(bus.address, "at")[0] == ["attach"]
    assert offered(bus.address, "image", "re")[0] == ["resize"]
    assert offered(bus.address, "start", "--a")[0] == ["--attach"]
    assert offered(bus.address, "completion", "")[0] == ["bash", "fish", "zsh"]
    files, _ = offered(bus.address, "create", "x", "--kernel", "/etc/ho")
    assert "/etc/hostname" in files


@pytest.mark.parametrize(
    "where", ["no kdlabd on the bus", "no bus", "a bus that never answers"]
)
def test_without_kdlabd_names_are_nothing_and_nothing_is_said(
    bus: PrivateBus, tmp_path: Path, where: str
) -> None:
    """Silent, and (where a bus never answers) without waiting for kdlabctl's
    connection timeout: the process is given less than that to finish."""
    import socket

    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    addresses = {
        "no kdlabd on the bus": bus.address,
        "no bus": f"unix:path={tmp_path}/nothing-here",
        "a bus that never answers": f"unix:path={tmp_path}/silent.sock",
    }
    with silent:
        result = run_tool(
            [str(PROGRAMS / "kdlabctl"), "__complete", "--",
             "--bus", addresses[where], "start", ""],
            timeout=CONNECT_TIMEOUT / 2,
        )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "words\n", "")
    assert offered(addresses[where], "start", "")[0] == []
    assert offered(addresses[where], "st")[0] == ["start", "stop"]


def test_bash_completes_hosts_of_hosts_toml(bus: PrivateBus, tmp_path: Path) -> None:
    (tmp_path / "kdlab").mkdir()
    (tmp_path / "kdlab" / "hosts.toml").write_text(
        '[hosts.lab]\ndestination = "alice@lab2"\n'
        '[hosts.lab3]\ndestination = "[::1]:2222"\n'
    )
    config = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert offered(bus.address, "--host", "la", env=config)[0] == ["lab", "lab3"]
    assert offered(bus.address, "up", "t", "--host", "", env=config)[0] == [
        "lab",
        "lab3",
    ]
