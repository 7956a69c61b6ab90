"""A real polkitd on a private bus, deciding with kdlab's shipped policy and rule.

polkitd only talks to "the system bus", but finds it as every GDBus program
does: through ``DBUS_SYSTEM_BUS_ADDRESS``. So it serves a private bus here,
whose configuration is the system bus's default policy plus kdlab's shipped
``systemd/org.kdlab.Kdlab1.conf`` and Debian's own bus policy for polkitd.

polkitd reads its actions and rules from fixed directories. It runs in a mount
namespace of its own where those directories are copies of the installed
ones with this checkout's ``systemd/org.kdlab.Kdlab1.policy`` and
``systemd/50-kdlab.rules`` in place of any installed version: the files under
test, not whatever ``.ci/setup`` last installed, and the host is untouched.
polkitd drops to its own user (``polkitd``) by itself.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from lxml import etree

from tests.support import REPO
from tests.support.bus import SHIPPED_POLICY, PrivateBus, name_has_owner
from tests.support.prereq import require, require_tool
from tests.support.timeouts import STARTUP_TIMEOUT

POLKITD = Path("/usr/lib/polkit-1/polkitd")  # Debian's polkitd package
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_BUS_POLICY = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
ACTIONS = Path("/usr/share/polkit-1/actions")
RULES = Path("/usr/share/polkit-1/rules.d")
SHIPPED_ACTIONS = REPO / "systemd" / "org.kdlab.Kdlab1.policy"
SHIPPED_RULE = REPO / "systemd" / "50-kdlab.rules"

# Run by sh in polkitd's own mount namespace: $1 and $2 replace the actions and
# the rules, $3 is polkitd.
_IN_NAMESPACE = f'mount --bind "$1" {ACTIONS} && mount --bind "$2" {RULES} && exec "$3"'


def require_polkitd() -> None:
    require(POLKITD.is_file(), f"{POLKITD} (apt-get install polkitd)")
    require(POLKIT_BUS_POLICY.is_file(), f"{POLKIT_BUS_POLICY} (polkitd)")
    require_tool("unshare", "util-linux")


def _copy_with(installed: Path, copy: Path, ours: Path | None, theirs: str) -> Path:
    """*copy*: the files of *installed* but *theirs*, plus *ours* (if any)."""
    copy.mkdir(mode=0o755)
    for path in sorted(installed.iterdir()):
        if path.is_file() and path.name != theirs:
            shutil.copyfile(path, copy / path.name)
    if ours is not None:
        shutil.copyfile(ours, copy / theirs)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def _bus_policy(directory: Path) -> Path:
    config = etree.Element("busconfig")
    for policy in (SHIPPED_POLICY, POLKIT_BUS_POLICY):
        etree.SubElement(config, "include").text = str(policy)
    path = directory / "policy.conf"
    path.write_bytes(etree.tostring(config))
    return path


@contextlib.contextmanager
def polkitd_on_a_private_bus(
    directory: Path, *, kdlab_rule: bool = True
) -> Iterator[PrivateBus]:
    """A private bus served by a real polkitd with kdlab's shipped policy and
    (unless *kdlab_rule* is false) its shipped rule."""
    require_polkitd()
    directory.mkdir(mode=0o755, exist_ok=True)
    actions = _copy_with(
        ACTIONS, directory / "actions", SHIPPED_ACTIONS, SHIPPED_ACTIONS.name
    )
    rule = SHIPPED_RULE if kdlab_rule else None
    rules = _copy_with(RULES, directory / "rules.d", rule, SHIPPED_RULE.name)
    bus = PrivateBus(directory / "bus", _bus_policy(directory)).start()
    log_path = directory / "polkitd.log"
    with log_path.open("w") as log:
        polkitd = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", _IN_NAMESPACE, "sh", str(actions), str(rules), str(POLKITD)],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                 "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not name_has_owner(bus.address, POLKIT_NAME):
            if polkitd.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"polkitd did not take {POLKIT_NAME}:\n{log_path.read_text()}"
                )
            time.sleep(0.05)
        yield bus
    finally:
        polkitd.terminate()
        polkitd.wait(timeout=STARTUP_TIMEOUT)
        bus.stop()
