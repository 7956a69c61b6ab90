"""``kdlabctl modules load``'s logic: which modules of a directory, in what
order (:func:`kdlabctl.initramfs.resolve_built`), and the guest's script
(:func:`kdlabctl.modules.load_script`), run by busybox sh with insmod, rmmod
and modprobe that only say how they were called.

The vm tier loads real modules into a real guest (tests/vm/test_modules.py).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from kdlabctl.initramfs import InitramfsError, Module, resolve_built
from kdlabctl.modules import GUEST_DIR, load_script
from tests.unit.test_initramfs import add_module, busybox, names

__all__ = ["busybox"]  # a fixture of test_initramfs's, used here

# Shell functions in place of the commands (busybox sh runs its own applets
# before any of PATH): each says how it was called on the log, and fails as
# told for one call, as busybox insmod does.
STUBS = """\
called() {
    echo "$*" >> "$KDLAB_TEST_LOG"
    if [ "$*" = "$KDLAB_TEST_FAIL" ]; then
        echo "$1: can't insert '$2': Invalid argument" >&2
        return 22
    fi
}
insmod() { called insmod "$@"; }
rmmod() { called rmmod "$@"; }
modprobe() { called modprobe "$@"; }
"""


def run_script(
    busybox: Path, tmp_path: Path, script: str, fail: str = ""
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """*script* run by busybox sh with the stubs; what they were asked."""
    log = tmp_path / "log"
    log.touch()
    done = subprocess.run(
        [busybox, "sh", "-c", STUBS + script],
        env={"KDLAB_TEST_LOG": str(log), "KDLAB_TEST_FAIL": fail},
        capture_output=True,
        text=True,
        check=False,
    )
    return done, log.read_text().splitlines()


# resolve_built


def test_every_built_module_by_default_dependencies_first(tmp_path: Path) -> None:
    add_module(tmp_path, "greeter.ko", "depends=hello")
    add_module(tmp_path, "hello.ko", "depends=")
    add_module(tmp_path, "sub/alone.ko", "depends=")
    modules, outside = resolve_built(tmp_path, [])
    assert names(modules) == ["alone", "hello", "greeter"]
    assert modules[0].path == tmp_path / "sub/alone.ko"
    assert outside == []


def test_named_modules_with_their_dependencies_only(tmp_path: Path) -> None:
    add_module(tmp_path, "greeter.ko", "depends=hello")
    add_module(tmp_path, "hello.ko", "depends=")
    add_module(tmp_path, "alone.ko", "depends=")
    assert names(resolve_built(tmp_path, ["greeter"])[0]) == ["hello", "greeter"]


def test_dependencies_not_built_here_are_the_running_kernels(tmp_path: Path) -> None:
    add_module(tmp_path, "my-driver.ko", "depends=virtio_ring,helper,virtio")
    add_module(tmp_path, "helper.ko", "depends=virtio")
    modules, outside = resolve_built(tmp_path, ["my-driver"])
    assert names(modules) == ["helper", "my_driver"]
    assert outside == ["virtio", "virtio_ring"]


def test_a_module_not_built_is_named(tmp_path: Path) -> None:
    add_module(tmp_path, "hello.ko", "depends=")
    with pytest.raises(InitramfsError) as err:
        resolve_built(tmp_path, ["hello", "nosuch", "other"])
    assert str(err.value) == f"no module nosuch, other is built in {tmp_path}"


def test_a_directory_without_modules_says_to_build_them(tmp_path: Path) -> None:
    (tmp_path / "hello.c").write_text("")
    with pytest.raises(InitramfsError, match=r"no modules .* build them first"):
        resolve_built(tmp_path, [])


# load_script


def test_script_unloads_dependents_first_then_loads_dependencies_first(
    tmp_path: Path, busybox: Path
) -> None:
    modules = [Module("hello", tmp_path / "h.ko"), Module("greeter", tmp_path / "g")]
    script = load_script(modules, ["virtio"])
    # Loaded copies go out in the reverse of the load order, before any insmod.
    assert re.findall(r"rmmod (\w+)", script) == ["greeter", "hello"]
    assert script.rindex("rmmod") < script.index("insmod")
    # Neither is loaded on this machine: only modprobe and insmod run.
    done, calls = run_script(busybox, tmp_path, script)
    assert done.returncode == 0, done.stderr
    assert calls == [
        "modprobe -q virtio",
        f"insmod {GUEST_DIR}/hello.ko",
        f"insmod {GUEST_DIR}/greeter.ko",
    ]
    assert done.stdout == "loaded hello\nloaded greeter\n"


def test_script_stops_at_insmods_failure_with_its_words_and_status(
    tmp_path: Path, busybox: Path
) -> None:
    modules = [Module("hello", tmp_path / "h.ko"), Module("greeter", tmp_path / "g")]
    failing = f"insmod {GUEST_DIR}/hello.ko"
    done, calls = run_script(busybox, tmp_path, load_script(modules, []), failing)
    assert done.returncode == 22
    assert (
        done.stderr
        == f"insmod: can't insert '{GUEST_DIR}/hello.ko': Invalid argument\n"
    )
    assert calls == [failing]
    assert done.stdout == ""


def test_a_module_outside_that_modprobe_cannot_load_is_left_to_insmod(
    tmp_path: Path, busybox: Path
) -> None:
    modules = [Module("hello", tmp_path / "h.ko")]
    failing = "modprobe -q virtio"
    done, calls = run_script(
        busybox, tmp_path, load_script(modules, ["virtio"]), failing
    )
    assert done.returncode == 0, done.stderr
    assert calls == [failing, f"insmod {GUEST_DIR}/hello.ko"]
    assert done.stderr == ""  # modprobe's complaint is not insmod's error
