"""kdlabctl as a user runs it: output, state changes, and exit codes for each error.

Every kdlabctl run is checked for leaked Python tracebacks
(tests.support.clients.kdlabctl).
"""

from __future__ import annotations

import contextlib
import json
import pwd
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from dbus_next import Variant

from kdlab.errors import (
    EXIT_FAILURE,
    EXIT_UNAVAILABLE,
    HypervisorError,
    InvalidArgument,
    InvalidState,
    KdlabError,
    NoSuchVM,
    VMExists,
)
from kdlab.wire import JOB_INTERFACE, JOB_PATH_PREFIX, VM_INTERFACE
from kdlabctl import output
from kdlabd.core.journal import HOLD_ENV
from tests.bus.conftest import Ctl
from tests.support.bus import PROPERTIES, BusClient, BusMonitor, Call, PrivateBus
from tests.support.clients import (
    assert_no_traceback,
    client_env,
    kdlabctl,
    kdlabctl_argv,
    read_until,
)
from tests.support.testdriver import FLEET, VMS, Lab
from tests.support.timeouts import CALL_TIMEOUT

pytestmark = pytest.mark.bus

# `list --json` and `show --json` keys: the D-Bus property names in snake_case.
JSON_KEYS = {
    "Name": "name",
    "State": "state",
    "UUID": "uuid",
    "Owner": "owner",
    "Cmdline": "cmdline",
    "MemoryMiB": "memory_mib",
    "VCPUs": "vcpus",
    "Accel": "accel",
    "Created": "created",
    "GdbStub": "gdb_stub",
    "WaitingForDebugger": "waiting_for_debugger",
    "KernelRelease": "kernel_release",
    "Vmlinux": "vmlinux",
    "KernelPath": "kernel_path",
    "Tree": "tree",
    "Diagnosis": "diagnosis",
    "Booted": "booted",
    "LastStop": "last_stop",
    "OnPanic": "on_panic",
    "LatestDump": "latest_dump",
    "Checkpoints": "checkpoints",
    "Run": "run",
    "RunRecording": "run_recording",
    "Shares": "shares",
    "Initramfs": "initramfs",
}


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def state_of(ctl: Ctl, name: str) -> str:
    result = ctl("show", name, "--json")
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["state"])


def assert_fails(result: CompletedProcess[str], expected: type[KdlabError]) -> str:
    """kdlabctl failed with *expected*'s exit code and one clean message; returns it."""
    assert result.returncode == expected.exit_code, (
        f"exit {result.returncode}, want {expected.exit_code} ({expected.reason}): "
        f"{result.stderr}"
    )
    assert result.stderr.startswith("kdlabctl: "), result.stderr
    return result.stderr


# --- listing and showing ------------------------------------------------------------


@pytest.mark.usefixtures("kdlabd")
def test_list_prints_a_table_of_every_vm(ctl: Ctl) -> None:
    result = ctl("list")
    assert result.returncode == 0, result.stderr
    header, *rows = [line.split() for line in result.stdout.splitlines()]
    assert header == ["NAME", "STATE", "MEMORY", "CPUS", "ACCEL", "GDB", "OWNER"]
    assert rows == [
        [
            vm.name,
            vm.state,
            f"{vm.memory_mib}M",
            str(vm.vcpus),
            "tcg",
            vm.gdb_stub,
            user_name(vm.owner),
        ]
        for vm in sorted(FLEET, key=lambda vm: vm.name)
    ]


@pytest.mark.usefixtures("kdlabd")
def test_list_json_is_one_object_per_vm(ctl: Ctl) -> None:
    result = ctl("list", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [(vm["name"], vm["state"], vm["uuid"], vm["owner"]) for vm in listed] == [
        (vm.name, vm.state, vm.uuid, vm.owner)
        for vm in sorted(FLEET, key=lambda vm: vm.name)
    ]


@pytest.mark.parametrize("command", [("list", "--json"), ("show", "busy", "--json")])
@pytest.mark.usefixtures("kdlabd")
def test_json_keys_are_the_properties_in_snake_case(
    ctl: Ctl, command: tuple[str, ...]
) -> None:
    result = ctl(*command)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    entries = shown if isinstance(shown, list) else [shown]
    expected = [
        {
            JSON_KEYS[key]: output.diagnosis(value) if key == "Diagnosis" else value
            for key, value in vm.properties().items()
        }
        for vm in sorted(FLEET, key=lambda vm: vm.name)
        if isinstance(shown, list) or vm.name == "busy"
    ]
    assert entries == expected


@pytest.mark.usefixtures("kdlabd")
@pytest.mark.parametrize("name", ["booted", "linux-6.9-rc1", "frozen"])
def test_show_prints_every_property(ctl: Ctl, name: str) -> None:
    vm = VMS[name]
    result = ctl("show", vm.name)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    created = datetime.fromtimestamp(vm.created_usec / 1e6, UTC)
    assert {key: value.strip() for key, value in fields.items()} == {
        "Name": vm.name,
        "State": vm.state,
        "UUID": vm.uuid,
        "Owner": f"{user_name(vm.owner)} ({vm.owner})",
        "Cmdline": vm.boots_with,
        "Memory": f"{vm.memory_mib} MiB",
        "vCPUs": str(vm.vcpus),
        "Accel": "tcg",
        "gdbstub": vm.gdb_stub,
        "Waiting": "no",
        "Kernel": f"{vm.kernel_path or '-'} ({vm.release or '?'})",
        "vmlinux": vm.vmlinux or "-",
        "Created": created.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "Checkpoints": "-",
        # Only a VM with shares has the line: "frozen" (src=/home/somebody/src).
        **({"Shares": "src=/home/somebody/src"} if vm.shares else {}),
    }


@pytest.mark.usefixtures("kdlabd")
def test_show_json_is_the_vms_properties(ctl: Ctl) -> None:
    result = ctl("show", "linux-6.9-rc1", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    vm = VMS["linux-6.9-rc1"]
    assert (shown["name"], shown["gdb_stub"], shown["cmdline"]) == (
        vm.name,
        vm.gdb_stub,
        vm.boots_with,
    )


# --- lifecycle ----------------------------------------------------------------------


def test_start_stop_delete(ctl: Ctl, kdlabd: Lab, client: BusClient) -> None:
    name = "booted"
    assert state_of(ctl, name) == "stopped"
    assert ctl("start", name).returncode == 0
    assert state_of(ctl, name) == "running"
    assert ctl("stop", "--force", name).returncode == 0
    assert state_of(ctl, name) == "stopped"
    assert kdlabd.vm_dir(name).is_dir()
    assert ctl("delete", name).returncode == 0
    assert_fails(ctl("show", name), NoSuchVM)
    assert client.vm_names() == {vm.name for vm in FLEET} - {name}
    assert not kdlabd.vm_dir(name).exists()  # its console logs went with it


@pytest.mark.parametrize(
    "args",
    [
        # ACPI first; the test driver's guest powers off at once when asked.
        ("--timeout", "5", "busy"),
        ("--force", "frozen"),  # a paused VM
        ("--timeout", "0", "busy"),  # no waiting: at once
    ],
    ids=["acpi", "paused", "timeout-0"],
)
@pytest.mark.usefixtures("kdlabd")
def test_stop_powers_the_vm_off(ctl: Ctl, args: tuple[str, ...]) -> None:
    assert ctl("stop", *args).returncode == 0
    assert state_of(ctl, args[-1]) == "stopped"


@pytest.mark.usefixtures("kdlabd")
def test_delete_force_stops_a_running_vm_first(ctl: Ctl, client: BusClient) -> None:
    assert ctl("delete", "--force", "busy").returncode == 0
    assert "busy" not in client.vm_names()


@pytest.mark.usefixtures("kdlabd")
@pytest.mark.parametrize("follow", [[], ["-f"]])
def test_logs_print_the_console_log(ctl: Ctl, follow: list[str]) -> None:
    # "booted" is stopped: following its last boot ends at once.
    result = ctl("logs", *follow, "booted")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "console of booted\n"


# --- listening, not polling ---------------------------------------------------------

# How long the tests below watch kdlabctl follow something that does not change:
# a client that polled would call kdlabd many times in it (the old one: every
# 0.2 s for a job, every second for a log).
QUIET_SECONDS = 3.0


def follower(address: str, *args: str) -> subprocess.Popen[bytes]:
    """kdlabctl *args* running in the background, its output on pipes."""
    return subprocess.Popen(
        kdlabctl_argv(address, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=client_env(),
    )


def ended(process: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    """Wait for *process* to end by itself: (status, stdout, stderr)."""
    try:
        out, err = process.communicate(timeout=CALL_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = out.decode(errors="replace"), err.decode(errors="replace")
    assert_no_traceback("".join(text))
    return process.returncode, *text


def test_logs_follow_opens_the_log_once_and_reads_on_until_the_vm_stops(
    kdlabd: Lab, client: BusClient, bus: PrivateBus
) -> None:
    """``logs -f`` on a running VM: one OpenConsoleLog and one read of the VM
    over seconds of following; what the boot writes later is printed; the
    VM's PropertiesChanged (State stopped) ends it."""
    log = kdlabd.layout.console_log("busy")
    with BusMonitor(bus.address) as monitor:
        logs = follower(bus.address, "logs", "-f", "busy")
        try:
            assert logs.stdout is not None
            read = read_until(logs.stdout.fileno(), "console of busy\n", CALL_TIMEOUT)
            time.sleep(QUIET_SECONDS)
            with log.open("a") as boot:
                boot.write("later line\n")
            read += read_until(logs.stdout.fileno(), "later line\n", CALL_TIMEOUT)
            path = client.vm_path("busy")
            stop = {"force": Variant("b", True)}
            client.ok(path, VM_INTERFACE, "Stop", "a{sv}", [stop])
            status, rest, errors = ended(logs)
        finally:
            if logs.poll() is None:
                logs.kill()
                logs.wait()
        opened = monitor.calls("OpenConsoleLog")
        assert len(opened) == 1, opened
        reads = [
            call
            for call in monitor.calls(path=path)
            if call.sender == opened[0].sender and call.interface == PROPERTIES
        ]
    assert status == 0, errors
    assert read + rest == "console of busy\nlater line\n"
    assert [call.member for call in reads] == ["GetAll"]


def test_a_job_is_followed_by_its_signals(
    bus: PrivateBus, workdir: Path, client: BusClient, kernels: dict[str, Path]
) -> None:
    """``image import`` reads its job once, then shows it from its signals
    until it ends (here: cancelled while its upload is held)."""
    lab = Lab(bus, workdir)
    with (
        lab.serving({HOLD_ENV: "image.upload-started"}),
        BusMonitor(bus.address) as monitor,
    ):
        imports = follower(bus.address, "image", "import", "held", str(kernels["text"]))
        try:

            def job_read() -> list[Call]:
                return [
                    call
                    for call in monitor.calls("GetAll")
                    if call.path.startswith(JOB_PATH_PREFIX)
                ]

            client.wait_until(lambda: bool(job_read()), CALL_TIMEOUT)
            importer, job = job_read()[0].sender, job_read()[0].path
            time.sleep(QUIET_SECONDS)
            client.ok(job, JOB_INTERFACE, "Cancel")
            status, _, errors = ended(imports)
        finally:
            if imports.poll() is None:
                imports.kill()
                imports.wait()
        reads = [
            call.member
            for call in monitor.calls(path=job)
            if call.sender == importer and call.interface == PROPERTIES
        ]
    assert status == EXIT_FAILURE, errors
    assert errors.endswith("kdlabctl: import of held cancelled: cancelled\n"), errors
    assert reads == ["GetAll"]


# --- errors -------------------------------------------------------------------------


Unchanged = Callable[[str], AbstractContextManager[None]]


@pytest.fixture
def unchanged(client: BusClient, kdlabd: Lab) -> Unchanged:
    """``with unchanged(NAME):`` the block changes no VM, nor the files of VM NAME."""

    @contextmanager
    def check(name: str) -> Iterator[None]:
        before = client.managed_objects()
        had_files = kdlabd.vm_dir(name).exists()
        yield
        assert client.managed_objects() == before
        assert kdlabd.vm_dir(name).exists() == had_files

    return check


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("show", "nope"), NoSuchVM),
        (("start", "nope"), NoSuchVM),
        (("stop", "nope"), NoSuchVM),
        (("delete", "nope"), NoSuchVM),
        (("logs", "nope"), NoSuchVM),
        (("start", "busy"), InvalidState),
        (("start", "frozen"), InvalidState),
        (("delete", "busy"), InvalidState),
        (("stop", "idle"), InvalidState),
        (("logs", "idle"), InvalidState),  # never booted: no console log yet
        (("attach", "nope"), NoSuchVM),
        (("attach", "booted"), InvalidState),
        (("attach", "idle", "--console"), InvalidState),
        (("start", "--attach", "busy"), InvalidState),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else None,
)
def test_refused_operation_changes_nothing(
    ctl: Ctl, unchanged: Unchanged, args: tuple[str, ...], expected: type[KdlabError]
) -> None:
    with unchanged(args[1]):
        assert_fails(ctl(*args), expected)


@pytest.mark.parametrize(
    ("name", "state"), [("idle", "defined"), ("booted", "stopped")]
)
@pytest.mark.parametrize("console", [[], ["--console"]], ids=["gdb", "console"])
@pytest.mark.usefixtures("kdlabd")
def test_attach_to_a_vm_that_is_off_says_how_to_start_it(
    ctl: Ctl, name: str, state: str, console: list[str]
) -> None:
    """kdlabctl refuses it before asking for a stream (no gdb starts), with
    InvalidState's exit code and both ways to start the VM."""
    stderr = assert_fails(ctl("attach", name, *console), InvalidState)
    assert stderr == (
        f"kdlabctl: VM {name} is {state}: start it first (kdlabctl start {name}), "
        f"or start it and attach in one step (kdlabctl start --attach {name}; "
        "with --paused gdb comes before the first instruction)\n"
    )


@pytest.mark.parametrize("option", [["--console"], ["--vmlinux", "/vmlinux"]])
@pytest.mark.usefixtures("kdlabd")
def test_start_options_of_attach_need_attach(ctl: Ctl, option: list[str]) -> None:
    stderr = assert_fails(ctl("start", *option, "booted"), InvalidArgument)
    assert "go with --attach" in stderr
    assert state_of(ctl, "booted") == "stopped"


@pytest.mark.usefixtures("kdlabd")
def test_gdb_arguments_only_where_gdb_runs(ctl: Ctl) -> None:
    for args in (["start", "booted"], ["attach", "busy", "--console"]):
        result = ctl(*args, "--", "--batch")
        assert result.returncode == InvalidArgument.exit_code, result.stderr
        assert "unrecognized arguments: --batch" in result.stderr
    assert state_of(ctl, "booted") == "stopped"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("bad name!", "bzImage"), InvalidArgument),
        ((".hidden", "bzImage"), InvalidArgument),
        (("x" * 64, "bzImage"), InvalidArgument),
        (("new", "directory"), InvalidArgument),
        (("new", "device"), InvalidArgument),
        (("new", "empty"), InvalidArgument),
        (("new", "text"), InvalidArgument),
        (("new", "vmlinux"), InvalidArgument),
        (("new", "bzImage", "--memory", "16"), InvalidArgument),
        (("new", "bzImage", "--cpus", "0"), InvalidArgument),
        (("new", "bzImage", "--gdb-tcp", "80"), InvalidArgument),
        (
            ("new", "bzImage", "--cmdline", "root=/dev/vda\ninit=/bin/sh"),
            InvalidArgument,
        ),
        (("idle", "bzImage"), VMExists),
        (("busy", "bzImage"), VMExists),
        # Valid: refused only because the test driver cannot upload volumes.
        (("new", "bzImage"), HypervisorError),
    ],
)
def test_rejected_create_leaves_nothing_behind(
    ctl: Ctl,
    unchanged: Unchanged,
    kernels: dict[str, Path],
    args: tuple[str, ...],
    expected: type[KdlabError],
) -> None:
    name, kernel, *options = args
    with unchanged(name):
        assert_fails(
            ctl("create", name, "--kernel", str(kernels[kernel]), *options), expected
        )


def test_create_names_a_kernel_it_cannot_open(
    ctl: Ctl, unchanged: Unchanged, kernels: dict[str, Path]
) -> None:
    with unchanged("new"):
        stderr = assert_fails(
            ctl("create", "new", "--kernel", str(kernels["missing"])), InvalidArgument
        )
    assert str(kernels["missing"]) in stderr


@pytest.mark.usefixtures("kdlabd")
def test_libvirt_failure_is_a_hypervisor_error(ctl: Ctl) -> None:
    # libvirt's test driver cannot start a domain paused; libvirt's words come through.
    stderr = assert_fails(ctl("start", "--paused", "idle"), HypervisorError)
    assert "libvirt" in stderr


@pytest.mark.usefixtures("kdlabd")
def test_failed_start_restores_the_state(ctl: Ctl) -> None:
    assert_fails(ctl("start", "--paused", "idle"), HypervisorError)
    assert state_of(ctl, "idle") == "defined"


def test_start_says_the_boot_pool_directory_is_gone(
    bus: PrivateBus, workdir: Path, ctl: Ctl
) -> None:
    # Its own daemon: Error.Internal logs a traceback, which the kdlabd fixture's
    # teardown would report as an error rather than as this test's failure.
    lab = Lab(bus, workdir)
    lab.populate()
    lab.start()
    try:
        shutil.rmtree(lab.layout.state_dir / "boot")
        stderr = assert_fails(ctl("start", "booted"), HypervisorError)
        assert str(lab.layout.state_dir / "boot") in stderr
    finally:
        lab.stop_cleanly()


@pytest.mark.usefixtures("kdlabd")
def test_create_says_why_a_vmlinux_is_not_a_kernel(
    ctl: Ctl, kernels: dict[str, Path]
) -> None:
    stderr = assert_fails(
        ctl("create", "new", "--kernel", str(kernels["vmlinux"])), InvalidArgument
    )
    assert "bzImage" in stderr


@pytest.mark.parametrize(
    "args",
    [
        ("create", "new", "--kernel", "{bzImage}", "--memory", "-1"),
        ("create", "new", "--kernel", "{bzImage}", "--gdb-tcp", "70000"),
        ("stop", "--timeout", "-5", "busy"),
    ],
    ids=["memory-negative", "port-too-large", "timeout-negative"],
)
@pytest.mark.usefixtures("kdlabd")
def test_out_of_range_numbers_are_usage_errors(
    ctl: Ctl, kernels: dict[str, Path], args: tuple[str, ...]
) -> None:
    # Caught by kdlabctl's argument parser: they do not fit their D-Bus types.
    # (ctl also asserts that no traceback leaks.)
    result = ctl(*(arg.format(bzImage=kernels["bzImage"]) for arg in args))
    assert result.returncode == InvalidArgument.exit_code, result.stderr
    assert "is not between" in result.stderr


def test_no_kdlabd_on_the_bus(ctl: Ctl) -> None:
    result = ctl("list")
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    assert "is kdlabd running?" in result.stderr


def test_nothing_listening_at_the_address(public_dir: Path) -> None:
    result = kdlabctl(f"unix:path={public_dir}/nothing-here", "list")
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr


@contextmanager
def refusing_bus(tmp_path: Path, answer: bytes | None) -> Iterator[str]:
    """A unix socket that plays a bus refusing its client: it closes at once
    (*answer* None) or answers the authentication with *answer*, then closes."""
    import socket
    import threading

    path = tmp_path / "refusing.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    server.settimeout(30)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                if answer is not None:
                    conn.recv(4096)
                    conn.sendall(answer)
                    conn.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"unix:path={path}"
    finally:
        server.close()
        thread.join(5)


@pytest.mark.parametrize(
    "answer",
    [None, b"REJECTED EXTERNAL\r\n", b"ERROR\r\n"],
    ids=["closed", "auth-rejected", "auth-error"],
)
def test_a_bus_that_refuses_the_connection_is_exit_69_in_one_sentence(
    tmp_path: Path, answer: bytes | None
) -> None:
    with refusing_bus(tmp_path, answer) as address:
        result = kdlabctl(address, "list")
    assert result.returncode == EXIT_UNAVAILABLE, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kdlabctl: cannot connect to the {address} bus: ")
