"""Checks of the files in systemd/: the kdlabd unit, D-Bus activation and bus policy,
sysusers.d and tmpfiles.d entries.

systemd's own tools do the checking where they can work on a scratch root (``--root``),
so these tests run on a machine without systemd as PID 1 and never touch the host's
configuration. Each check is also run on a deliberately broken copy, to prove that it
can fail. A missing tool is a failure that names the Debian package providing it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from kdlabd.host.sandbox import BUILD_CAPABILITIES, BuildSandbox

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "kdlabd.service"
ACTIVATION = SYSTEMD_DIR / "org.kdlab.Kdlab1.service"
POLICY = SYSTEMD_DIR / "org.kdlab.Kdlab1.conf"
SYSUSERS = SYSTEMD_DIR / "kdlab.sysusers"
TMPFILES = SYSTEMD_DIR / "kdlab.tmpfiles"

BUS_NAME = "org.kdlab.Kdlab1"
EXEC_PATH = "/opt/kdlab/bin/kdlabd"  # .ci/install's
STATE_DIR = "/var/lib/kdlab"
RUNTIME_DIR = "/run/kdlab"
# `systemd-analyze security` overall exposure (0.0 best .. 10.0 worst) must stay at or
# below this; it is 2.1 when this was written. Raise it only with a reason in the unit.
MAX_EXPOSURE = 2.5

POLICY_DOCTYPE = (
    "busconfig",
    "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN",
    "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd",
)

Sections = dict[str, list[tuple[str, str]]]
Doctype = tuple[str, str | None, str | None]


# --- helpers ------------------------------------------------------------------


def require_tool(name: str, package: str) -> str:
    """The path of *name*, or a test failure naming the Debian package to install."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {package!r}")
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run *argv* with captured text output; callers check the exit status."""
    return subprocess.run(
        argv, capture_output=True, text=True, errors="replace", timeout=60, check=False
    )


def readline(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """The next line of *proc*'s stdout, or "" if none comes within *timeout* s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def parse_ini(text: str) -> Sections:
    """Parse a systemd/D-Bus style ini file, keeping repeated keys in order."""
    sections: Sections = {}
    current: list[tuple[str, str]] | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise ValueError(
                f"line {lineno}: not a key=value line in a section: {raw!r}"
            )
        current.append((key.strip(), value.strip()))
    return sections


def values(sections: Sections, section: str, key: str) -> list[str]:
    """Every value of *key* in *section*, in file order."""
    return [v for k, v in sections.get(section, []) if k == key]


def single(sections: Sections, section: str, key: str) -> str:
    """The one value of *key* in *section*."""
    found = values(sections, section, key)
    assert len(found) == 1, f"[{section}] {key}= should appear once, found {found}"
    return found[0]


def unit_settings() -> Sections:
    return parse_ini(UNIT.read_text())


def host_unit_dir() -> Path:
    """The directory of the distribution's units (sysinit.target, dbus.socket...)."""
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    pytest.fail("no systemd unit directory with sysinit.target: install 'systemd'")


def make_unit_root(
    base: Path,
    unit_text: str,
    *,
    stub_exec: bool = True,
    name: str = UNIT.name,
    exec_path: str = EXEC_PATH,
) -> Path:
    """A scratch root with the host's units, the unit *name* (kdlabd.service) and a
    stub ExecStart binary.

    `systemd-analyze verify` resolves the unit's dependencies (sysinit.target,
    dbus.socket, ...) and checks that ExecStart= is executable, both inside --root.
    """
    root = base / "root"
    shutil.copytree(host_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / name).write_text(unit_text)
    if stub_exec:
        stub = root / exec_path.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def verify(root: Path, name: str = UNIT.name) -> subprocess.CompletedProcess[str]:
    analyze = require_tool("systemd-analyze", "systemd")
    return run(
        [analyze, "verify", "--man=no", "--generators=no", f"--root={root}", name]
    )


def verify_problems(proc: subprocess.CompletedProcess[str]) -> str:
    """What `verify` objected to; empty when clean.

    Settings systemd cannot parse are only logged ("..., ignoring") with exit status 0,
    so any output counts as a problem.
    """
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return f"exit status {proc.returncode}: {output}"
    return output


# --- kdlabd.service -----------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = verify(make_unit_root(tmp_path, UNIT.read_text()))
    assert verify_problems(proc) == ""


def _replace_line(key: str, new: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        mutated, count = re.subn(rf"(?m)^{re.escape(key)}=.*$", new, text)
        assert count == 1, f"{key}= not found exactly once in the unit"
        return mutated

    return mutate


@pytest.mark.parametrize(
    ("mutate", "stub_exec"),
    [
        pytest.param(lambda text: text, False, id="ExecStart-binary-missing"),
        pytest.param(
            _replace_line("ExecStart", "ExecStrat=/bin/true"), True, id="key-typo"
        ),
        pytest.param(
            _replace_line("Restart", "Restart=sometimes"), True, id="bad-value"
        ),
        pytest.param(_replace_line("BusName", ""), True, id="dbus-without-BusName"),
    ],
)
def test_verify_rejects_broken_unit(
    tmp_path: Path, mutate: Callable[[str], str], stub_exec: bool
) -> None:
    root = make_unit_root(tmp_path, mutate(UNIT.read_text()), stub_exec=stub_exec)
    assert verify_problems(verify(root)) != "", "verify accepted a broken unit"


def test_unit_runs_the_kdlabd_that_ci_install_installs() -> None:
    """The unit and .ci/kdlabd-service (no init system) start the installed
    kdlabd, not one in a clone that other users or the unit's sandbox may not
    reach."""
    install = (REPO / ".ci" / "install").read_text()
    prefix = re.search(r"^prefix=(/\S+)$", install, re.MULTILINE)
    assert prefix is not None, ".ci/install sets no default prefix="
    assert f"{prefix[1]}/bin/kdlabd" == EXEC_PATH
    assert f"nohup {EXEC_PATH} " in (REPO / ".ci" / "kdlabd-service").read_text()


def test_unit_core_settings() -> None:
    unit = unit_settings()
    assert single(unit, "Service", "Type") == "dbus"
    assert single(unit, "Service", "BusName") == BUS_NAME
    assert single(unit, "Service", "ExecStart").split()[0] == EXEC_PATH
    assert single(unit, "Service", "Restart") == "on-failure"
    assert single(unit, "Service", "StateDirectory") == "kdlab"
    assert single(unit, "Service", "RuntimeDirectory") == "kdlab"
    assert single(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    assert single(unit, "Service", "ConfigurationDirectory") == "kdlab"
    assert single(unit, "Service", "ProtectSystem") == "strict"
    writable = " ".join(values(unit, "Service", "ReadWritePaths")).split()
    assert {STATE_DIR, RUNTIME_DIR} <= set(writable)
    capabilities = set(single(unit, "Service", "CapabilityBoundingSet").split())
    assert capabilities == {"CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE"}
    assert "libvirtd.service" in " ".join(values(unit, "Unit", "After")).split()


def test_unit_descriptor_limit_is_kdlabds() -> None:
    """The unit gives kdlabd the descriptor limit it raises itself to elsewhere."""
    from kdlabd.daemon import DESCRIPTOR_LIMIT

    limit = single(unit_settings(), "Service", "LimitNOFILE")
    assert limit == str(DESCRIPTOR_LIMIT)
    assert DESCRIPTOR_LIMIT > 1024


def test_unit_security_exposure(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    root = make_unit_root(tmp_path, UNIT.read_text())
    proc = run(
        [
            analyze,
            "security",
            "--offline=true",
            f"--root={root}",
            f"--threshold={round(MAX_EXPOSURE * 10)}",
            "--no-pager",
            UNIT.name,
        ]
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, f"no exposure level in output:\n{proc.stdout}{proc.stderr}"
    score = float(match.group(1))
    assert proc.returncode == 0, (
        f"exposure {score} is above {MAX_EXPOSURE}:\n{proc.stdout}"
    )


# --- the transient unit of an image build ---------------------------------------

BUILD_TOKEN = "0123456789abcdef"
BUILD_UNIT = f"kdlab-build-{BUILD_TOKEN}-1.service"
BUILD_TREE = Path("/var/lib/kdlab/scratch/build-bookworm-x/root")


def build_unit_text(mutate: Callable[[list[str]], list[str]] = list) -> str:
    """The unit `systemd-run` makes for a debootstrap step, as a unit file.

    Built from the very command line kdlabd runs: its --property= settings are
    unit file settings of the same names, --setenv= is Environment=.
    """
    argv = BuildSandbox(BUILD_TOKEN, systemd=True).command(
        ["debootstrap", "bookworm", str(BUILD_TREE)],
        {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
        writable=[BUILD_TREE],
        network=True,
    )
    split = argv.index("--")
    options, inside = argv[:split], argv[split + 1 :]
    assert inside[0] == "unshare"
    assert f"--unit={BUILD_UNIT.removesuffix('.service')}" in options
    service = ["Type=exec", f"ExecStart=/usr/bin/{shlex.join(inside)}"]
    for option in options:
        if option.startswith("--property="):
            service.append(option.removeprefix("--property="))
        elif option.startswith("--setenv="):
            service.append(
                f"Environment={shlex.quote(option.removeprefix('--setenv='))}"
            )
    head = ["[Unit]", "Description=kdlab image build", "[Service]"]
    return "\n".join([*head, *mutate(service)]) + "\n"


def verify_build_unit(tmp_path: Path, text: str) -> str:
    root = make_unit_root(tmp_path, text, name=BUILD_UNIT, exec_path="/usr/bin/unshare")
    return verify_problems(verify(root, BUILD_UNIT))


def test_build_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify_build_unit(tmp_path, build_unit_text()) == ""


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("ProtectSystem=", "ProtectSytem=", id="key-typo"),
        pytest.param("KillMode=control-group", "KillMode=group", id="bad-value"),
        pytest.param(
            "DeviceAllow=/dev/console m",
            "DeviceAllow=/dev/console x",
            id="bad-device-access",
        ),
    ],
)
def test_verify_rejects_a_broken_build_unit(tmp_path: Path, old: str, new: str) -> None:
    def broken(service: list[str]) -> list[str]:
        mutated = [line.replace(old, new) for line in service]
        assert mutated != service
        return mutated

    assert verify_build_unit(tmp_path, build_unit_text(broken)) != ""


def test_build_unit_sandbox() -> None:
    """What the unit grants is what debootstrap needs, no more; the rest is shut."""
    settings = dict(line.split("=", 1) for line in build_unit_text().splitlines()[3:])
    caps = set(settings["CapabilityBoundingSet"].split())
    assert caps == set(BUILD_CAPABILITIES)
    assert not caps & {"CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_PTRACE",
                       "CAP_NET_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_TIME"}  # fmt: skip
    assert settings["ReadWritePaths"] == str(BUILD_TREE)
    assert settings["RestrictNamespaces"].split() == ["mnt", "pid", "ipc", "uts", "net"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateIPC",
                "ProtectKernelModules", "ProtectKernelTunables"):  # fmt: skip
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "strict"
    assert settings["KillMode"] == "control-group"
    assert settings["KillSignal"] == "SIGKILL"
    assert settings["DevicePolicy"] == "closed"
    # sandbox_init names the build's UTS namespace: ProtectHostname= forbids that.
    assert "ProtectHostname" not in settings


def test_kdlabd_unit_is_not_widened_for_builds() -> None:
    unit = unit_settings()
    assert single(unit, "Service", "RestrictNamespaces") == "yes"
    assert "not written" not in UNIT.read_text()


# --- D-Bus bus policy ---------------------------------------------------------


class _DoctypeRecorder(ET.TreeBuilder):
    """A TreeBuilder that also keeps the document's DOCTYPE declaration."""

    doctype_decl: Doctype | None = None

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        self.doctype_decl = (name, pubid, system)


def parse_policy(text: str) -> tuple[ET.Element, Doctype | None]:
    builder = _DoctypeRecorder()
    parser = ET.XMLParser(target=builder)
    parser.feed(text)
    return parser.close(), builder.doctype_decl


def test_policy_is_well_formed_with_doctype() -> None:
    root, doctype = parse_policy(POLICY.read_text())
    assert doctype == POLICY_DOCTYPE
    assert root.tag == "busconfig"
    assert all(child.tag == "policy" for child in root), (
        "only <policy> elements expected"
    )


def test_policy_grants_own_only_to_root() -> None:
    root, _ = parse_policy(POLICY.read_text())
    own_grants = [
        (policy.attrib, rule.attrib)
        for policy in root.iter("policy")
        for rule in policy
        if rule.tag == "allow" and ("own" in rule.attrib or "own_prefix" in rule.attrib)
    ]
    assert own_grants == [({"user": "root"}, {"own": BUS_NAME})]


def test_policy_lets_anyone_call_and_receive() -> None:
    root, _ = parse_policy(POLICY.read_text())
    default_rules = [
        rule.attrib
        for policy in root.iter("policy")
        if policy.attrib == {"context": "default"}
        for rule in policy
        if rule.tag == "allow"
    ]
    assert {"send_destination": BUS_NAME} in default_rules
    assert {"receive_sender": BUS_NAME} in default_rules
    assert not list(root.iter("deny")), "the daemon authorizes calls; the bus must not"


# A private bus whose default policy is the system bus's (system.conf of dbus 1.14):
# calls denied, own denied, replies and signals allowed. Only the included kdlab policy
# can let anyone own the name or call it.
TEST_BUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>kdlab-policy-test</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""

# Owns the name as root on the test bus, says "owned", and keeps it until stdin closes.
# dbus-next answers org.freedesktop.DBus.Peer.Ping by itself.
NAME_HOLDER = """\
import asyncio, sys
from dbus_next.aio import MessageBus
from dbus_next.constants import NameFlag, RequestNameReply

async def main() -> None:
    bus = await MessageBus(bus_address=sys.argv[1]).connect()
    reply = await bus.request_name(sys.argv[2], NameFlag.DO_NOT_QUEUE)
    print("owned" if reply is RequestNameReply.PRIMARY_OWNER else reply, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


def test_dbus_daemon_enforces_policy(tmp_path: Path) -> None:
    """A real dbus-daemon loads the policy: root may own the name, nobody may not, and
    nobody may call the owner."""
    dbus_daemon = require_tool("dbus-daemon", "dbus-daemon")
    dbus_send = require_tool("dbus-send", "dbus-bin")
    setpriv = require_tool("setpriv", "util-linux")
    if os.geteuid() != 0:
        pytest.skip("needs root: owns the name as root and calls as user nobody")
    if importlib.util.find_spec("dbus_next") is None:
        pytest.fail("dbus_next not importable: install the project's dependencies")

    # The socket's directory must be enterable by nobody; pytest's tmp_path is not.
    sock_dir = Path(tempfile.mkdtemp(prefix="kdlab-bus-"))
    sock_dir.chmod(0o711)
    address = f"unix:path={sock_dir / 'bus'}"
    config = tmp_path / "bus.conf"
    config.write_text(TEST_BUS_CONFIG.format(socket=sock_dir / "bus", policy=POLICY))
    daemon = subprocess.Popen(
        [
            dbus_daemon,
            f"--config-file={config}",
            "--nofork",
            "--nopidfile",
            "--print-address=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    holder: subprocess.Popen[str] | None = None
    try:
        if not readline(daemon).startswith("unix:"):
            daemon.kill()
            _, errors = daemon.communicate(timeout=10)
            pytest.fail(f"dbus-daemon rejected the configuration: {errors}")
        as_nobody = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        send = [dbus_send, f"--bus={address}", "--print-reply"]
        request_name = [
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.RequestName",
            f"string:{BUS_NAME}",
            "uint32:4",
        ]

        denied = run(as_nobody + send + request_name)
        assert denied.returncode != 0, f"user nobody could own {BUS_NAME}"
        assert "AccessDenied" in denied.stderr, denied.stderr

        holder = subprocess.Popen(
            [sys.executable, "-c", NAME_HOLDER, address, BUS_NAME],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert readline(holder).strip() == "owned", f"root could not own {BUS_NAME}"

        ping = run(
            as_nobody
            + send
            + [f"--dest={BUS_NAME}", "/", "org.freedesktop.DBus.Peer.Ping"]
        )
        assert ping.returncode == 0, f"nobody could not call {BUS_NAME}: {ping.stderr}"
    finally:
        if holder is not None:
            holder.communicate(input="", timeout=10)
        daemon.terminate()
        daemon.communicate(timeout=10)
        shutil.rmtree(sock_dir, ignore_errors=True)


# --- D-Bus activation file ----------------------------------------------------


def test_activation_file_matches_unit() -> None:
    activation = parse_ini(ACTIVATION.read_text())
    unit = unit_settings()
    assert list(activation) == ["D-BUS Service"]
    assert single(activation, "D-BUS Service", "Name") == single(
        unit, "Service", "BusName"
    )
    assert single(activation, "D-BUS Service", "SystemdService") == UNIT.name
    assert single(activation, "D-BUS Service", "User") == "root"
    assert single(activation, "D-BUS Service", "Exec") == "/bin/false"


# --- sysusers.d ---------------------------------------------------------------


def sysusers_dry_run(tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    sysusers = require_tool("systemd-sysusers", "systemd")
    root = tmp_path / "sysroot"
    root.mkdir()
    return run([sysusers, "--dry-run", f"--root={root}", str(config)])


def test_sysusers_creates_kdlab_group(tmp_path: Path) -> None:
    proc = sysusers_dry_run(tmp_path, SYSUSERS)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Creating group 'kdlab'" in output, output
    assert "Creating user" not in output, "kdlabd runs as root: no user is wanted"


def test_sysusers_rejects_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.sysusers"
    broken.write_text(SYSUSERS.read_text().replace("g kdlab", "g kd:lab"))
    assert sysusers_dry_run(tmp_path, broken).returncode != 0


# --- tmpfiles.d ---------------------------------------------------------------


def tmpfiles_create(
    tmp_path: Path, config: Path
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    tmpfiles = require_tool("systemd-tmpfiles", "systemd")
    root = tmp_path / "tmproot"
    root.mkdir()
    return root, run([tmpfiles, "--create", f"--root={root}", str(config)])


def _only_chown_refused(proc: subprocess.CompletedProcess[str]) -> bool:
    """As non-root, tmpfiles creates everything but cannot chown to root (exit 73)."""
    lines = proc.stderr.strip().splitlines()
    return bool(lines) and all(
        re.fullmatch(r"fchownat\(\) of .* failed: Operation not permitted", line)
        for line in lines
    )


def test_tmpfiles_creates_directories(tmp_path: Path) -> None:
    root, proc = tmpfiles_create(tmp_path, TMPFILES)
    if os.geteuid() == 0:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 0 or _only_chown_refused(proc), proc.stderr
    unit = unit_settings()
    expected_modes = {
        STATE_DIR: single(unit, "Service", "StateDirectoryMode"),
        RUNTIME_DIR: single(unit, "Service", "RuntimeDirectoryMode"),
    }
    for path, unit_mode in expected_modes.items():
        created = root / path.lstrip("/")
        assert created.is_dir(), f"{path} not created"
        mode = created.stat().st_mode & 0o7777
        assert mode == 0o711, f"{path} has mode {mode:04o}"
        # systemd resets the directory to the unit's mode at each start: keep equal.
        assert int(unit_mode, 8) == mode, f"unit says {unit_mode} for {path}"
        if os.geteuid() == 0:
            assert (created.stat().st_uid, created.stat().st_gid) == (0, 0)


def test_tmpfiles_rejects_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tmpfiles"
    broken.write_text(TMPFILES.read_text().replace("d /run/kdlab", "d run/kdlab"))
    _, proc = tmpfiles_create(tmp_path, broken)
    assert proc.returncode != 0, "tmpfiles accepted a relative path"
    assert not _only_chown_refused(proc), proc.stderr


# --- kdlab-notify: the user unit and the autostart file ------------------------------

NOTIFY_UNIT = SYSTEMD_DIR / "user" / "kdlab-notify.service"
AUTOSTART = REPO / "systemd" / "user" / "kdlab-notify.desktop"
KDLABCTL_PATH = "/opt/kdlab/bin/kdlabctl"  # .ci/install's


def verify_user_unit(base: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze --user verify` of *unit_text*, its kdlabctl a stub in *base*.

    A user manager has no --root; it needs only a runtime directory and a home.
    """
    analyze = require_tool("systemd-analyze", "systemd")
    stub = base / "kdlabctl"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = base / NOTIFY_UNIT.name
    unit.write_text(unit_text.replace(KDLABCTL_PATH, str(stub)))
    runtime = base / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(base)}
    return subprocess.run(
        [analyze, "--user", "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=60,
    )


def test_notify_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify_problems(verify_user_unit(tmp_path, NOTIFY_UNIT.read_text())) == ""


def test_verify_rejects_a_broken_notify_unit(tmp_path: Path) -> None:
    broken = NOTIFY_UNIT.read_text().replace("ExecStart=", "ExecStrat=")
    assert verify_problems(verify_user_unit(tmp_path, broken)) != ""


def test_notify_unit_runs_the_installed_kdlabctl_in_the_graphical_session() -> None:
    unit = parse_ini(NOTIFY_UNIT.read_text())
    assert single(unit, "Service", "ExecStart") == f"{KDLABCTL_PATH} notify"
    assert single(unit, "Unit", "PartOf") == "graphical-session.target"
    assert single(unit, "Install", "WantedBy") == "graphical-session.target"
    install = (REPO / ".ci" / "install").read_text()
    prefix = re.search(r"^prefix=(/\S+)$", install, re.MULTILINE)
    assert prefix is not None
    assert f"{prefix[1]}/bin/kdlabctl" == KDLABCTL_PATH


def test_autostart_file_starts_the_agent_where_systemd_does_not() -> None:
    entry = dict(parse_ini(AUTOSTART.read_text())["Desktop Entry"])
    assert entry["Type"] == "Application"
    assert entry["Exec"] == "kdlabctl notify"
    # With systemd the user unit is the way: the generator must not start a
    # second agent from this file.
    assert entry["X-systemd-skip"] == "true"
    assert entry["NoDisplay"] == "true"


def test_ci_install_installs_the_unit_and_the_autostart_file() -> None:
    install = (REPO / ".ci" / "install").read_text()
    assert "systemd/user/kdlab-notify.service" in install
    assert "systemd/user/kdlab-notify.desktop" in install
    assert "/usr/lib/systemd/user" in install
    assert "/etc/xdg/autostart" in install
