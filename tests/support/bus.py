"""A private bus as the system bus would be with kdlab installed, and a client for it.

- :class:`PrivateBus` is a ``dbus-daemon`` whose default policy is the system
  bus's, read from the installed ``system.conf`` (no one may own a name or send
  a method call unless a policy file allows it), plus kdlab's shipped
  ``systemd/org.kdlab.Kdlab1.conf``. So the shipped file alone must let root
  own ``org.kdlab.Kdlab1`` and let any uid call it.
- :class:`SessionBus` is a ``dbus-daemon`` as a desktop session's bus
  (``kdlabctl notify`` sends its notifications there).
- :class:`BusClient` is a dbus-next connection driven synchronously, which
  records the signals it receives.
- :class:`BusMonitor` is ``dbus-monitor``: the method calls clients make.
"""

from __future__ import annotations

import asyncio
import select
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus
from lxml import etree

from kdlab.wire import BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, VM_INTERFACE
from tests.support import REPO
from tests.support.timeouts import CALL_TIMEOUT, STARTUP_TIMEOUT

SHIPPED_POLICY = REPO / "systemd" / "org.kdlab.Kdlab1.conf"
SYSTEM_BUS_CONFIG = Path("/usr/share/dbus-1/system.conf")  # dbus-system-bus-common

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"

T = TypeVar("T")


def bus_config(socket: Path, policy: Path | None) -> bytes:
    """A bus configuration with the system bus's own default policy.

    The ``<policy context="default">`` of the installed ``system.conf`` (deny
    owning names and sending method calls, except to the bus itself) and its
    ``<policy user="root">``, then an include of the *policy* file (kdlab's
    shipped one, normally).
    """
    system = etree.parse(
        str(SYSTEM_BUS_CONFIG), etree.XMLParser(load_dtd=False, no_network=True)
    )
    config = etree.Element("busconfig")
    etree.SubElement(config, "type").text = "system"
    etree.SubElement(config, "listen").text = f"unix:path={socket}"
    etree.SubElement(config, "auth").text = "EXTERNAL"
    config.extend(system.getroot().findall("policy[@context='default']"))
    # Root's own holes, as on the system bus: root may become a monitor
    # (BusMonitor watches what clients call).
    config.extend(system.getroot().findall("policy[@user='root']"))
    if policy is not None:
        etree.SubElement(config, "include").text = str(policy)
    doctype: str = system.docinfo.doctype  # type: ignore[union-attr]
    return etree.tostring(config, doctype=doctype)


class PrivateBus:
    """A dbus-daemon of our own with the system bus's default policy and kdlab's.

    The default policy is the installed system bus's (no one may own a name
    or call a method unless a policy file allows it), so kdlab's shipped
    policy alone must let root own org.kdlab.Kdlab1 and anyone call it.
    """

    def __init__(self, directory: Path, policy: Path | None = SHIPPED_POLICY) -> None:
        self.directory = directory
        self.policy = policy
        self.address = ""
        self._proc: subprocess.Popen[str] | None = None

    def config(self) -> bytes:
        """The bus configuration dbus-daemon runs with."""
        return bus_config(self.directory / "socket", self.policy)

    def start(self) -> PrivateBus:
        self.directory.mkdir(mode=0o755, exist_ok=True)
        config = self.directory / "bus.conf"
        config.write_bytes(self.config())
        stderr = (self.directory / "dbus-daemon.log").open("w")
        with stderr:
            self._proc = subprocess.Popen(
                [
                    "dbus-daemon",
                    f"--config-file={config}",
                    "--print-address",
                    "--nofork",
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], STARTUP_TIMEOUT)
        self.address = self._proc.stdout.readline().strip() if ready else ""
        if not self.address:
            self.stop()
            log = (self.directory / "dbus-daemon.log").read_text()
            raise AssertionError(f"dbus-daemon printed no address:\n{log}")
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


class SessionBus(PrivateBus):
    """A dbus-daemon as a graphical session's bus would be: anything goes,
    for any uid (the test runs as root, the programs on it as their users)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, policy=None)

    def config(self) -> bytes:
        config = etree.Element("busconfig")
        etree.SubElement(config, "type").text = "session"
        etree.SubElement(config, "listen").text = f"unix:path={self.directory}/socket"
        etree.SubElement(config, "auth").text = "EXTERNAL"
        policy = etree.SubElement(config, "policy", context="default")
        etree.SubElement(policy, "allow", user="*")
        etree.SubElement(policy, "allow", own="*")
        etree.SubElement(policy, "allow", send_destination="*")
        etree.SubElement(policy, "allow", receive_sender="*")
        return etree.tostring(config)


def name_has_owner(address: str, name: str) -> bool:
    result = subprocess.run(
        [
            "busctl",
            f"--address={address}",
            "call",
            DBUS_NAME,
            DBUS_PATH,
            DBUS_NAME,
            "NameHasOwner",
            "s",
            name,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() == "b true"


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
            return list(await asyncio.gather(*(self.bus.call(msg) for msg in calls)))

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

    def current_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        """:meth:`managed_objects`, which must say what each object's own
        GetAll says and list the VMs ListVMs lists (kdlabd keeps both answers
        marshalled: a stale one fails here)."""
        objects = self.managed_objects()
        for path, interfaces in objects.items():
            for interface, values in interfaces.items():
                (props,) = self.ok(path, PROPERTIES, "GetAll", "s", [interface])
                own = {key: variant.value for key, variant in props.items()}
                assert values == own, f"GetManagedObjects is stale on {path}"
        vms = {
            props[VM_INTERFACE]["Name"]: path
            for path, props in objects.items()
            if VM_INTERFACE in props
        }
        (listed,) = self.ok(MANAGER_PATH, MANAGER_INTERFACE, "ListVMs")
        assert listed == [vms[name] for name in sorted(vms)], "ListVMs is stale"
        return objects

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


@dataclass(frozen=True)
class Call:
    """A method call the bus routed, as dbus-monitor saw it."""

    sender: str
    destination: str
    path: str
    interface: str
    member: str


class BusMonitor:
    """``dbus-monitor --profile`` on the bus at *address*: every method call on it.

    The bus lets root's connections become monitors (BecomeMonitor); the calls
    are collected by a thread that keeps reading its output.
    """

    def __init__(self, address: str) -> None:
        self._proc = subprocess.Popen(
            ["dbus-monitor", "--address", address, "--profile"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._monitoring = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # The bus takes a new monitor's unique name away (NameLost): from
        # then on every message passes by it.
        if not self._monitoring.wait(STARTUP_TIMEOUT):
            self.close()
            raise AssertionError("dbus-monitor did not become a monitor")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            fields = line.rstrip("\n").split("\t")
            if fields[0] == "sig" and fields[-1] == "NameLost":
                self._monitoring.set()
            elif fields[0] == "mc" and len(fields) == 8:
                with self._lock:
                    self._calls.append(Call(*fields[3:]))

    def calls(self, member: str = "", path: str = "") -> list[Call]:
        """The calls seen so far, of *member* and on *path* if given."""
        with self._lock:
            return [
                call
                for call in self._calls
                if member in ("", call.member) and path in ("", call.path)
            ]

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._reader.join(timeout=5)

    def __enter__(self) -> BusMonitor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
