"""``kdlabctl modules load``: out-of-tree modules built here, loaded in a guest.

The test writes two small modules (``kdlab_hello`` exports a function that
``kdlab_greeter`` calls: the greeter depends on it) and one whose init fails,
builds them for Debian's cloud kernel with its headers (tests/support/debian.py),
and loads them into ONE running VM of that kernel (kdlab's userspace initramfs,
so kdlab's agent carries the files and runs insmod): dependencies first, a
rebuild in place of the loaded copies, insmod's own error for the failing one.
The modules are built while the VM boots (TCG boots cost seconds).
"""

from __future__ import annotations

import errno
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdlab.errors import EXIT_USAGE
from kdlabctl.modules import GUEST_DIR
from tests.support import debian
from tests.support.prereq import require, require_tool
from tests.support.system import remove_vm
from tests.vm.conftest import Lab

pytestmark = pytest.mark.vm

HELLO = """\
#include <linux/module.h>
#include <linux/moduleparam.h>

static int answer = 42;
module_param(answer, int, 0444);

int kdlab_hello_answer(const char *who)
{
\tpr_info("kdlab_hello: asked by %s\\n", who);
\treturn answer;
}
EXPORT_SYMBOL_GPL(kdlab_hello_answer);

static int __init kdlab_hello_init(void)
{
\tpr_info("kdlab_hello: VERSION loaded, answer=%d\\n", answer);
\treturn 0;
}

static void __exit kdlab_hello_exit(void)
{
\tpr_info("kdlab_hello: VERSION unloaded\\n");
}

module_init(kdlab_hello_init);
module_exit(kdlab_hello_exit);
MODULE_LICENSE("GPL");
"""

GREETER = """\
#include <linux/module.h>

int kdlab_hello_answer(const char *who);

static int __init kdlab_greeter_init(void)
{
\tpr_info("kdlab_greeter: VERSION got %d\\n", kdlab_hello_answer("greeter"));
\treturn 0;
}

static void __exit kdlab_greeter_exit(void)
{
}

module_init(kdlab_greeter_init);
module_exit(kdlab_greeter_exit);
MODULE_LICENSE("GPL");
"""

REFUSES = """\
#include <linux/module.h>

static int __init kdlab_refuses_init(void)
{
\treturn -EINVAL;
}

module_init(kdlab_refuses_init);
MODULE_LICENSE("GPL");
"""

BUILD_SECONDS = 300.0


@dataclass(frozen=True)
class Guest:
    """The running VM, and the directories of modules built for its kernel."""

    name: str
    first: Path  # kdlab_hello and kdlab_greeter, version v1
    rebuilt: Path  # the same two, version v2
    refuses: Path  # kdlab_refuses

    def run(self, lab: Lab, *argv: str) -> subprocess.CompletedProcess[str]:
        """kdlabctl exec of *argv* in the guest; it must exit 0."""
        done = lab.ctl("exec", self.name, "--", *argv)
        assert done.returncode == 0, (argv, done.stderr)
        return done


def sources(directory: Path, modules: dict[str, str], version: str = "") -> Path:
    """*directory* with the C files of *modules* (name: source) and their Kbuild."""
    directory.mkdir()
    for name, source in modules.items():
        (directory / f"{name}.c").write_text(source.replace("VERSION", version))
    objects = " ".join(f"{name}.o" for name in modules)
    (directory / "Kbuild").write_text(f"obj-m := {objects}\n")
    return directory


def build(headers: debian.KernelHeaders, directory: Path) -> subprocess.Popen[str]:
    """make of *directory*'s modules for the headers' kernel, started."""
    return subprocess.Popen(
        ["make", "-s", "-C", str(headers.build), f"M={directory}", "modules"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def guest(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    require_tool("make", "make")
    try:
        headers = debian.cloud_kernel_headers(lab.kernel)
    except debian.FixtureError as err:
        require(False, f"the cloud kernel's headers: {err}")
        raise
    name = f"vmt-{uuid.uuid4().hex[:8]}"
    try:
        created = lab.ctl(
            "create", name, "--kernel", str(lab.kernel.vmlinuz), "--memory", "256"
        )
        assert created.returncode == 0, created.stderr
        started = lab.ctl("start", name)
        assert started.returncode == 0, started.stderr
        top = tmp_path_factory.mktemp("modules")
        modules = {"kdlab_hello": HELLO, "kdlab_greeter": GREETER}
        directories = Guest(
            name,
            sources(top / "first", modules, "v1"),
            sources(top / "rebuilt", modules, "v2"),
            sources(top / "refuses", {"kdlab_refuses": REFUSES}),
        )
        makes = [
            build(headers, directory)
            for directory in (
                directories.first,
                directories.rebuilt,
                directories.refuses,
            )
        ]
        for make in makes:
            output, _ = make.communicate(timeout=BUILD_SECONDS)
            assert make.returncode == 0, output
        # The agent answers once the guest is up.
        up = lab.ctl("exec", "--wait", "150", name, "--", "true", timeout=180)
        assert up.returncode == 0, up.stderr
        yield directories
    finally:
        remove_vm(lab.daemon, name)


def proc_modules(lab: Lab, guest: Guest) -> list[list[str]]:
    """The guest's /proc/modules of the test's modules, newest first as the
    kernel lists them: name, size, users, used by, ..."""
    listed = guest.run(lab, "cat", "/proc/modules").stdout.splitlines()
    return [line.split() for line in listed if line.startswith("kdlab_")]


def test_modules_load_dependencies_first_and_a_rebuild_in_their_place(
    lab: Lab, guest: Guest
) -> None:
    loaded = lab.ctl("modules", "load", guest.name, str(guest.first))
    assert loaded.returncode == 0, loaded.stderr
    # kdlab_greeter needs kdlab_hello's symbol: kdlab_hello is loaded first.
    assert loaded.stdout.splitlines() == ["loaded kdlab_hello", "loaded kdlab_greeter"]
    listed = proc_modules(lab, guest)
    assert [fields[0] for fields in listed] == ["kdlab_greeter", "kdlab_hello"]
    assert listed[1][3].rstrip(",").split(",") == ["kdlab_greeter"]  # used by
    parameter = guest.run(lab, "cat", "/sys/module/kdlab_hello/parameters/answer")
    assert parameter.stdout == "42\n"
    dmesg = guest.run(lab, "dmesg").stdout
    assert "kdlab_hello: v1 loaded, answer=42" in dmesg
    assert "kdlab_hello: asked by greeter" in dmesg
    assert "kdlab_greeter: v1 got 42" in dmesg

    again = lab.ctl("modules", "load", guest.name, str(guest.rebuilt))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["loaded kdlab_hello", "loaded kdlab_greeter"]
    dmesg = guest.run(lab, "dmesg").stdout
    # The old copies went (rmmod: kdlab_hello's exit ran), the new ones came.
    assert "kdlab_hello: v1 unloaded" in dmesg
    assert dmesg.index("kdlab_hello: v1 unloaded") < dmesg.index(
        "kdlab_hello: v2 loaded"
    )
    assert "kdlab_greeter: v2 got 42" in dmesg
    listed = proc_modules(lab, guest)
    assert [fields[0] for fields in listed] == ["kdlab_greeter", "kdlab_hello"]


def test_modules_load_says_insmods_error_and_fails(lab: Lab, guest: Guest) -> None:
    refused = lab.ctl("modules", "load", guest.name, str(guest.refuses))
    # busybox insmod's own words and status (the errno init_module gave),
    # as it printed and returned them in the guest.
    assert refused.returncode == errno.EINVAL, refused.stderr
    assert (
        f"insmod: can't insert '{GUEST_DIR}/kdlab_refuses.ko': Invalid argument"
        in refused.stderr
    )
    assert "loaded kdlab_refuses" not in refused.stdout
    assert "kdlab_refuses" not in guest.run(lab, "cat", "/proc/modules").stdout


def test_modules_load_of_a_module_not_built_is_a_usage_error(
    lab: Lab, guest: Guest
) -> None:
    missing = lab.ctl("modules", "load", guest.name, str(guest.first), "no_such")
    assert missing.returncode == EXIT_USAGE, missing.stderr
    assert f"no module no_such is built in {guest.first}" in missing.stderr
