"""The bus tier's harness: a private bus, kdlabd on libvirt's test driver, and clients.

- :class:`PrivateBus` is a ``dbus-daemon`` whose default policy is the system
  bus's, read from the installed ``system.conf`` (no one may own a name or send
  a method call unless a policy file allows it), plus kdlab's shipped
  ``systemd/org.kdlab.Kdlab1.conf``. So the shipped file alone must let root own
  ``org.kdlab.Kdlab1`` and let any uid call it. (tests.harness.PrivateBus, used
  by the vm tier, allows every method call by default and so cannot show the
  second half.)
- :class:`Lab` runs kdlabd (the shared :class:`tests.harness.Kdlabd`) against
  ``test:///<file>``, a ``<node>`` pre-populated with kdlab domains built by
  kdlabd's own :func:`~kdlabd.virt.domain_xml.build_domain_xml`. The test driver
  cannot upload volumes nor start a domain paused, so a successful CreateVM is
  the vm tier's job; every other call runs here for real.
- :class:`BusClient` is a dbus-next connection driven synchronously, which
  records the signals it receives; :func:`kdlabctl`, :func:`gdbus_call` and
  :func:`run_tool` run command-line clients, optionally as another uid through
  ``setpriv``.

Everything lives below one world-traversable directory: unprivileged clients
must reach the bus socket, and kdlabd checks that the QEMU user could reach
its state and runtime directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest.mock import ANY

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus
from lxml import etree

from kdlab.wire import BUS_NAME, MANAGER_PATH, VM_INTERFACE
from kdlabd.core.models import Accel, DebugSettings, Disk, VMSpec
from kdlabd.core.vms import Layout
from kdlabd.virt.domain_xml import build_domain_xml
from tests import harness as shared

SHIPPED_POLICY = shared.POLICY
PrivateBus = shared.PrivateBus
bus_config = shared.bus_config
SYSTEM_BUS_CONFIG = shared.SYSTEM_BUS_CONFIG
CONTRACT_DIR = shared.REPO / "xml" / "dbus"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"

# What a Python traceback leaks into a message; no reply or CLI output may hold it.
TRACEBACK_MARKERS = ("Traceback", 'File "', '.py"')
STARTUP_TIMEOUT = 15.0
CALL_TIMEOUT = 15.0

T = TypeVar("T")


@dataclass(frozen=True)
class Identity:
    """A uid to run a client as (through setpriv), with its groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def setpriv(self) -> list[str]:
        groups = (
            f"--groups={','.join(map(str, self.groups))}"
            if self.groups
            else "--clear-groups"
        )
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", groups, "--"]


NOBODY = Identity(65534, 65534)


def assert_no_traceback(text: str) -> None:
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, f"Python traceback text {marker!r} leaked:\n{text}"


# --- libvirt's test driver, pre-populated with kdlab domains -------------------

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


class RunState(enum.IntEnum):
    """libvirt's virDomainState values the test driver's ``<test:runstate>`` takes."""

    RUNNING = 1
    PAUSED = 3
    SHUTOFF = 5


# The state kdlab shows for each libvirt state of a pre-populated domain.
# "defined" and "stopped" are both shut off: "stopped" VMs have a console log.
RUNSTATES = {
    "defined": RunState.SHUTOFF,
    "stopped": RunState.SHUTOFF,
    "running": RunState.RUNNING,
    "paused": RunState.PAUSED,
}


@dataclass(frozen=True)
class FakeVM:
    """A kdlab VM written into the test driver file, and what kdlabd must show of it."""

    name: str
    state: str
    owner: int
    cmdline: str
    boots_with: str  # the Cmdline property: the user's plus kdlab's additions
    gdb_stub: str = "unix"
    memory_mib: int = 256
    vcpus: int = 1
    created_usec: int = 1_700_000_000_000_000
    release: str = ""  # what the bzImage announced at creation
    vmlinux: str = ""  # the client's hints, kept in kdlab's metadata
    kernel_path: str = ""
    disk: bool = False  # a blank vda, for a console that diagnoses the root disk

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kdlab-test:{self.name}"))

    @property
    def booted(self) -> bool:
        return self.state != "defined"

    def spec(self, layout: Layout) -> VMSpec:
        port = (
            int(self.gdb_stub.rsplit(":", 1)[1])
            if self.gdb_stub.startswith("tcp:")
            else None
        )
        return VMSpec(
            name=self.name,
            owner_uid=self.owner,
            kernel=layout.state_dir / "boot" / f"{self.name}.kernel",
            initrd=None,
            cmdline=self.cmdline,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            accel=Accel.TCG,
            console_log=layout.console_log(self.name),
            gdb_socket=layout.gdb_socket(self.name),
            debug=DebugSettings(gdb=self.gdb_stub != "off", gdb_tcp_port=port),
            created_usec=self.created_usec,
            release=self.release,
            vmlinux=self.vmlinux,
            kernel_source=self.kernel_path,
            disks=(
                (Disk(layout.state_dir / "boot" / f"{self.name}.vda.qcow2", "vda"),)
                if self.disk
                else ()
            ),
        )

    @property
    def diagnosis(self) -> list[str]:
        """What kdlabd diagnoses from the cmdline alone: KASLR under a gdbstub."""
        if self.gdb_stub != "off" and "kaslr" in self.boots_with.split():
            return ["gdb-kaslr", "warning", ANY, ANY]
        return ["", "", "", ""]

    def properties(self, **changes: Any) -> dict[str, Any]:
        """The org.kdlab.Kdlab1.VM properties kdlabd must export, with *changes*."""
        props = {
            "Name": self.name,
            "UUID": self.uuid,
            "State": self.state,
            "Owner": self.owner,
            "Cmdline": self.boots_with,
            "MemoryMiB": self.memory_mib,
            "VCPUs": self.vcpus,
            "Accel": "tcg",
            "Created": self.created_usec,
            "GdbStub": self.gdb_stub,
            "WaitingForDebugger": False,
            "KernelRelease": self.release,
            "Vmlinux": self.vmlinux,
            "KernelPath": self.kernel_path,
            "Tree": "",
            "Diagnosis": self.diagnosis,
        }
        props.update(changes)
        return props


# The VMs every bus test starts with. Owner 1000 is "somebody else" for the
# unprivileged callers; "booted" belongs to nobody (65534).
FLEET = (
    FakeVM(
        "idle", "defined", 1000, "root=/dev/vda", "root=/dev/vda console=ttyS0 nokaslr"
    ),
    FakeVM(
        "booted",
        "stopped",
        NOBODY.uid,
        "quiet",
        "quiet console=ttyS0 nokaslr",
        memory_mib=512,
        created_usec=1_700_000_000_123_456,
    ),
    FakeVM(
        "busy", "running", 1000, "console=hvc0 kaslr", "console=hvc0 kaslr", vcpus=2
    ),
    FakeVM("frozen", "paused", 1000, "", "console=ttyS0", gdb_stub="off"),
    FakeVM(
        "linux-6.9-rc1",
        "defined",
        0,
        "root=/dev/vda rw",
        "root=/dev/vda rw console=ttyS0 nokaslr",
        gdb_stub="tcp:127.0.0.1:4321",
        memory_mib=1024,
        vcpus=4,
        release="6.9.0-rc1-kdlab",
        vmlinux="/home/dev/linux/vmlinux",
        kernel_path="/home/dev/linux/arch/x86/boot/bzImage",
    ),
)
VMS = {vm.name: vm for vm in FLEET}


def defined_fleet(count: int, prefix: str = "vm") -> list[FakeVM]:
    """*count* defined VMs of root's, for tests and benchmarks of scale."""
    return [
        FakeVM(
            f"{prefix}-{i:04d}",
            "defined",
            0,
            "root=/dev/vda",
            "root=/dev/vda console=ttyS0 nokaslr",
        )
        for i in range(count)
    ]


# Domains that are not kdlab VMs: no prefix, or the prefix without kdlab's metadata.
FOREIGN_DOMAINS = ("plain", "kdlab-impostor")


def _foreign_domain(name: str) -> etree._Element:
    domain = etree.Element("domain", type="test")
    etree.SubElement(domain, "name").text = name
    etree.SubElement(domain, "memory", unit="MiB").text = "64"
    etree.SubElement(etree.SubElement(domain, "os"), "type").text = "hvm"
    return domain


def driver_xml(vms: Iterable[FakeVM], layout: Layout) -> bytes:
    """A test driver ``<node>`` file holding *vms* plus :data:`FOREIGN_DOMAINS`.

    The domains keep kdlab's XML as built (type ``qemu``: libvirt 9's test
    driver accepts it, keeps ``<metadata>`` and drops ``<qemu:commandline>``),
    plus a fixed ``<uuid>`` and the run state in the test driver's namespace
    (a domain in the file runs unless told otherwise).
    """
    node = etree.Element("node", nsmap={"test": TEST_NS})
    for vm in vms:
        domain = etree.fromstring(build_domain_xml(vm.spec(layout)).encode())
        domain.find("name").addnext(etree.Element("uuid"))
        domain.find("uuid").text = vm.uuid
        etree.SubElement(domain, f"{{{TEST_NS}}}runstate").text = str(
            int(RUNSTATES[vm.state])
        )
        node.append(domain)
    for name in FOREIGN_DOMAINS:
        node.append(_foreign_domain(name))
    return etree.tostring(
        node, pretty_print=True, xml_declaration=True, encoding="UTF-8"
    )


# --- kdlabd -------------------------------------------------------------------------


class Lab:
    """kdlabd (the shared :class:`tests.harness.Kdlabd`) on *bus*, serving *vms*
    from a test driver file in *workdir*."""

    def __init__(
        self, bus: PrivateBus, workdir: Path, vms: Iterable[FakeVM] = FLEET
    ) -> None:
        self.vms = tuple(vms)
        self.layout = Layout(workdir / "state", workdir / "run")
        self.driver = workdir / "testdriver.xml"
        self.daemon = shared.Kdlabd(
            address=bus.address,
            libvirt_uri=f"test://{self.driver}",
            state_dir=self.layout.state_dir,
            runtime_dir=self.layout.runtime_dir,
            log_path=workdir / "kdlabd.log",
        )

    def populate(self) -> None:
        """Write the driver file and the host files a real libvirt would have left."""
        self.driver.write_bytes(driver_xml(self.vms, self.layout))
        # libvirtd creates a directory pool's directory when it builds the pool;
        # the test driver keeps pools in memory and creates nothing.
        (self.layout.state_dir / "boot").mkdir(mode=0o711, parents=True, exist_ok=True)
        for vm in self.vms:
            if vm.booted:
                log = self.layout.console_log(vm.name)
                log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                log.write_text(f"console of {vm.name}\n")

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start kdlabd; it is ready when it owns its name (else: fail with its log)."""
        self.daemon.start(timeout=STARTUP_TIMEOUT, env=env)

    @contextlib.contextmanager
    def serving(self, env: dict[str, str] | None = None) -> Iterator[Lab]:
        """kdlabd serving a fresh driver file; stopped cleanly afterwards.

        *env* adds to its environment (KDLAB_TEST_HOLD_AT, ...). A kdlabd that
        does not come up is killed, not left running.
        """
        self.populate()
        try:
            self.start(env)
        except BaseException:
            if self.daemon.running:
                self.daemon.kill()
            raise
        yield self
        self.stop_cleanly()

    def stop_cleanly(self) -> None:
        """SIGTERM kdlabd: it must not have died on its own before, must exit 0
        at once and must never have logged a traceback."""
        self.daemon.stop()
        log = self.daemon.log()
        assert "Traceback" not in log, f"kdlabd logged a traceback:\n{log}"

    def vm_dir(self, name: str) -> Path:
        return self.layout.vm_dir(name)


# --- a synchronous dbus-next client ------------------------------------------------


@dataclass
class BusClient:
    """A dbus-next connection used from synchronous tests.

    Every signal delivered to it is kept in :attr:`signals`; the event loop runs
    only inside calls, so signals queue in the socket in between.
    """

    address: str
    signals: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self.bus = self.run(self._connect())
        self.bus.add_message_handler(self._keep_signal)

    async def _connect(self) -> MessageBus:
        # Created inside the loop: dbus-next binds a bus to the loop running then.
        return await MessageBus(
            bus_address=self.address, negotiate_unix_fd=True
        ).connect()

    def _keep_signal(self, msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL:
            self.signals.append(msg)

    def run(self, awaitable: Awaitable[T], timeout: float = CALL_TIMEOUT) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(awaitable, timeout))

    def sleep(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    def close(self) -> None:
        self.bus.disconnect()
        self.sleep(0)
        self._loop.close()

    def call(
        self,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        *,
        destination: str = BUS_NAME,
        unix_fds: list[int] | None = None,
    ) -> Message:
        """Call a method and return the reply, whether a return or an error."""
        (reply,) = self.call_at_once(
            Message(
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body or [],
                unix_fds=unix_fds or [],
            )
        )
        return reply

    def call_at_once(self, *calls: Message) -> list[Message]:
        """Send every call before awaiting any reply; return the replies in order."""

        async def all_at_once() -> list[Message | None]:
            return await asyncio.gather(*(self.bus.call(msg) for msg in calls))

        replies = self.run(all_at_once())
        assert all(reply is not None for reply in replies)
        return list(replies)

    def ok(self, *args: Any, **kwargs: Any) -> list[Any]:
        """:meth:`call` that must succeed; returns the reply's body."""
        reply = self.call(*args, **kwargs)
        assert reply.message_type is MessageType.METHOD_RETURN, (
            f"{args[2]} failed: {reply.error_name}: {reply.body}"
        )
        return list(reply.body)

    def error(self, *args: Any, **kwargs: Any) -> tuple[str, str]:
        """:meth:`call` that must fail; returns the error name and message."""
        reply = self.call(*args, **kwargs)
        assert reply.message_type is MessageType.ERROR, (
            f"{args[2]} succeeded: {reply.body}"
        )
        text = str(reply.body[0]) if reply.body else ""
        return reply.error_name or "", text

    def add_match(self, **rule: str) -> None:
        text = ",".join(f"{key}='{value}'" for key, value in rule.items())
        self.ok(DBUS_PATH, DBUS_NAME, "AddMatch", "s", [text], destination=DBUS_NAME)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Let signals arrive until *condition* holds (or fail after *timeout* s)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                seen = [(m.path, m.interface, m.member, m.body) for m in self.signals]
                raise AssertionError(
                    f"condition not met within {timeout} s; signals: {seen}"
                )
            self.sleep(0.02)

    def wait_for_signal(self, predicate: Callable[[Message], bool]) -> Message:
        """The first signal received (so far or within 5 s) that matches *predicate*."""
        self.wait_until(lambda: any(predicate(msg) for msg in self.signals))
        return next(msg for msg in self.signals if predicate(msg))

    # kdlabd's objects

    def vm_path(self, name: str) -> str:
        (path,) = self.ok(
            MANAGER_PATH, "org.kdlab.Kdlab1.Manager", "GetVM", "s", [name]
        )
        return str(path)

    def vm_properties(self, name: str) -> dict[str, Any]:
        (props,) = self.ok(
            self.vm_path(name), PROPERTIES, "GetAll", "s", [VM_INTERFACE]
        )
        return {key: variant.value for key, variant in props.items()}

    def managed_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """GetManagedObjects on the manager, variants unwrapped."""
        (objects,) = self.ok(MANAGER_PATH, OBJECT_MANAGER, "GetManagedObjects")
        return {
            path: {
                iface: {key: var.value for key, var in props.items()}
                for iface, props in interfaces.items()
            }
            for path, interfaces in objects.items()
        }

    def vm_names(self) -> set[str]:
        """The names of the VMs kdlabd exports."""
        return {
            props[VM_INTERFACE]["Name"]
            for props in self.managed_objects().values()
            if VM_INTERFACE in props
        }

    def introspect(self, path: str) -> str:
        (xml,) = self.ok(path, INTROSPECTABLE, "Introspect")
        return str(xml)


# --- command-line clients -------------------------------------------------------------


def client_env() -> dict[str, str]:
    """A minimal environment for client programs: nothing of the caller's leaks in."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": "/",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_tool(
    argv: list[str],
    *,
    user: Identity | None = None,
    timeout: float = 30.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client program (as *user*, in *cwd*) and capture its text output;
    never raises."""
    prefix = user.setpriv() if user is not None else []
    return subprocess.run(
        [*prefix, *argv],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
        env=client_env(),
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def kdlabctl_argv(address: str, *args: str) -> list[str]:
    """``kdlabctl --bus ADDRESS ARGS...`` with the interpreter running the tests."""
    return [sys.executable, "-m", "kdlabctl", "--bus", address, *args]


def kdlabctl(
    address: str, *args: str, user: Identity | None = None
) -> subprocess.CompletedProcess[str]:
    """Run kdlabctl (as *user*); its output must hold no traceback."""
    result = run_tool(kdlabctl_argv(address, *args), user=user)
    assert_no_traceback(result.stdout + result.stderr)
    return result


def gdbus_call(
    address: str, path: str, method: str, *args: str, user: Identity | None = None
) -> subprocess.CompletedProcess[str]:
    """``gdbus call`` of kdlabd's *method* (``Interface.Member``) on *path*."""
    return run_tool(
        ["gdbus", "call", "--address", address, "--dest", BUS_NAME,
         "--object-path", path, "--method", method, *args],
        user=user,
    )  # fmt: skip


_GDBUS_ERROR = re.compile(r"GDBus\.Error:([\w.]+): (.*)", re.DOTALL)


def gdbus_error(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """The D-Bus error name and message a failed ``gdbus call`` printed."""
    assert result.returncode != 0, f"gdbus call succeeded: {result.stdout}"
    match = _GDBUS_ERROR.search(result.stderr)
    assert match is not None, result.stderr
    return match[1], match[2]
