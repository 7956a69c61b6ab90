"""A desktop for ``kdlabctl notify``: a session bus, a notification server, a terminal.

- :class:`NotificationServer` implements ``org.freedesktop.Notifications``
  with dbus-next on a :class:`~tests.support.bus.SessionBus`, in a thread of
  its own (it answers while the test waits elsewhere), and records every
  Notify call; :meth:`NotificationServer.invoke` is the user clicking an
  action.
- :class:`Launchers` are ``$TERMINAL`` and ``xdg-open`` of the test's own:
  scripts that record their command line.
- :class:`NotifyAgent` is ``kdlabctl notify`` as a subprocess, as a given
  uid, on both buses; it must exit 0 on SIGTERM.
"""

# No "from __future__ import annotations": dbus-next reads D-Bus type strings
# from the annotations and needs them unevaluated string constants.

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, method
from dbus_next.service import signal as dbus_signal

from tests.support import REPO
from tests.support.bus import SessionBus
from tests.support.clients import Identity, client_env, has_traceback, kdlabctl_argv
from tests.support.timeouts import STARTUP_TIMEOUT, STOP_SECONDS

NOTIFICATIONS = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"


@dataclass(frozen=True)
class Notification:
    """One Notify call, as the server received it."""

    id: int
    app_name: str
    summary: str
    body: str
    actions: tuple[str, ...]
    hints: dict[str, Any]
    expire_timeout: int

    @property
    def action_keys(self) -> tuple[str, ...]:
        return self.actions[::2]


class _Interface(ServiceInterface):
    """org.freedesktop.Notifications, as the specification (1.2) has it."""

    def __init__(self, server: "NotificationServer") -> None:
        super().__init__(NOTIFICATIONS)
        self._server = server

    @method()
    def Notify(  # noqa: PLR0917 (the specification's arguments)
        self,
        app_name: "s",
        replaces_id: "u",
        app_icon: "s",
        summary: "s",
        body: "s",
        actions: "as",
        hints: "a{sv}",
        expire_timeout: "i",
    ) -> "u":
        return self._server.record(
            Notification(
                0,
                app_name,
                summary,
                body,
                tuple(actions),
                {key: value.value for key, value in hints.items()},
                expire_timeout,
            )
        )

    @method()
    def GetCapabilities(self) -> "as":
        return ["actions", "body"]

    @method()
    def GetServerInformation(self) -> "ssss":
        return ["kdlab-tests", "kdlab", "1", "1.2"]

    @method()
    def CloseNotification(self, number: "u") -> None:
        self.NotificationClosed(number, 3)

    @dbus_signal()
    def ActionInvoked(self, number: "u", action_key: "s") -> "us":
        return [number, action_key]

    @dbus_signal()
    def NotificationClosed(self, number: "u", reason: "u") -> "uu":
        return [number, reason]


class NotificationServer:
    """A notification server on the session bus at *address*, recording calls."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._received: list[Notification] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._interface = _Interface(self)
        self._bus: MessageBus | None = None
        self._failure = "no answer"

    def start(self) -> "NotificationServer":
        self._thread.start()
        if not self._ready.wait(STARTUP_TIMEOUT) or self._bus is None:
            raise AssertionError(
                f"no notification server on {self.address}: {self._failure}"
            )
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def up() -> None:
            bus = await MessageBus(bus_address=self.address).connect()
            bus.export(NOTIFICATIONS_PATH, self._interface)
            await bus.request_name(NOTIFICATIONS)
            self._bus = bus

        try:
            self._loop.run_until_complete(up())
        except Exception as err:  # told by start()
            self._failure = repr(err)
            return
        finally:
            self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._bus is not None:
            self._loop.call_soon_threadsafe(self._bus.disconnect)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=STOP_SECONDS)

    def record(self, notification: Notification) -> int:
        """Keep *notification*; the number the server gives it."""
        with self._lock:
            number = len(self._received) + 1
            self._received.append(dataclasses.replace(notification, id=number))
        return number

    @property
    def received(self) -> list[Notification]:
        with self._lock:
            return list(self._received)

    def wait_for(
        self, condition: Callable[[list[Notification]], bool], timeout: float = 30
    ) -> list[Notification]:
        """The notifications once *condition* holds of them (fail after *timeout*)."""
        deadline = time.monotonic() + timeout
        while not condition(self.received):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not received within {timeout} s; received: {self.received}"
                )
            time.sleep(0.05)
        return self.received

    def invoke(self, notification: Notification, action: str) -> None:
        """The user chose *action* of *notification*."""
        self._loop.call_soon_threadsafe(
            self._interface.ActionInvoked, notification.id, action
        )


class Launchers:
    """``$TERMINAL`` and an ``xdg-open`` first on ``$PATH``: scripts in
    *directory* that append their command line (JSON) to ``launched``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log = directory / "launched"
        directory.mkdir(mode=0o755, exist_ok=True)
        self.log.touch(mode=0o666)
        self.log.chmod(0o666)  # written by the agent's uid
        for name in ("terminal", "xdg-open"):
            script = directory / name
            script.write_text(
                "#!/usr/bin/python3\nimport json, sys\n"
                f"with open({str(self.log)!r}, 'a') as log:\n"
                "    log.write(json.dumps(sys.argv) + '\\n')\n"
            )
            script.chmod(0o755)

    @property
    def terminal(self) -> Path:
        return self.directory / "terminal"

    def launched(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def wait_for(self, count: int, timeout: float = 15) -> list[list[str]]:
        deadline = time.monotonic() + timeout
        while len(self.launched()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"launched within {timeout} s: {self.launched()}")
            time.sleep(0.05)
        return self.launched()


class NotifyAgent:
    """``kdlabctl --bus SYSTEM notify`` as *user*, on the session bus at *session*."""

    def __init__(
        self,
        system: str,
        session: str,
        launchers: Launchers,
        *,
        user: Identity | None = None,
        page_url: str = "http://localhost:9999/kdlab",
    ) -> None:
        self.log = launchers.directory / "agent.log"
        env = {
            **client_env(),
            "DBUS_SESSION_BUS_ADDRESS": session,
            "TERMINAL": str(launchers.terminal),
            "PATH": f"{launchers.directory}:{client_env()['PATH']}",
        }
        prefix = user.setpriv() if user is not None else []
        argv = kdlabctl_argv(system, "notify", "--page-url", page_url)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

    def wait_until_following(self) -> None:
        """Until the agent has read kdlabd's objects (or found it not running)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "following kdlabd" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"kdlabctl notify did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM: it must exit 0 at once, having printed no traceback."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            status = self.proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"kdlabctl notify ignored SIGTERM:\n{self.output()}"
            ) from None
        assert status == 0, f"kdlabctl notify exited {status}:\n{self.output()}"
        assert not has_traceback(self.output()), self.output()


def session_bus(directory: Path) -> SessionBus:
    """A started :class:`SessionBus` whose socket every uid may reach."""
    bus = SessionBus(directory).start()
    os.chmod(directory / "socket", 0o777)
    return bus
