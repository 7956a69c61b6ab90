"""``org.kdlab.Kdlab1.Process``: one object per command run in a guest."""

# No "from __future__ import annotations": see kdlabd/bus/manager.py.

from typing import Any

from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, signal

from kdlab.wire import PROCESS_INTERFACE
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.boundary import exported
from kdlabd.bus.properties import announce_changes
from kdlabd.core.execs import ExecService, ProcessRecord


def properties(process: ProcessRecord) -> dict[str, Any]:
    """The D-Bus property values of *process*."""
    return {
        "VM": process.vm,
        "Owner": process.owner_uid,
        "Argv": list(process.argv),
        "Pid": process.pid,
        "State": process.state,
        "How": process.how,
        "ExitCode": process.code,
        "ExitSignal": process.signal,
    }


class ProcessInterface(ServiceInterface):
    """A command in a guest; the uid that started it may signal or kill it."""

    def __init__(
        self, process: ProcessRecord, execs: ExecService, authorizer: Authorizer
    ) -> None:
        super().__init__(PROCESS_INTERFACE)
        self._id = process.id
        self._owner = process.owner_uid
        self.execs = execs
        self.authorizer = authorizer
        self._props = properties(process)

    def resource_owner(self) -> int | None:
        """Another uid's command needs manage-others."""
        return self._owner

    def exited(self, process: ProcessRecord) -> None:
        """Take the end of the command: its properties, then Exited."""
        self._props = announce_changes(self, self._props, properties(process))
        self.Exited(process.code, process.signal, process.how)

    @exported(Action.DEBUG_VMS)
    async def Signal(self, caller: Caller, signal: "i") -> None:
        """Send @signal to the command's process group."""
        await self.execs.signal(self._id, signal)

    @exported(Action.DEBUG_VMS)
    async def SetTerminalSize(self, caller: Caller, rows: "q", cols: "q") -> None:
        """Set the size of the command's terminal."""
        await self.execs.resize(self._id, rows, cols)

    @exported(Action.DEBUG_VMS)
    async def Kill(self, caller: Caller) -> None:
        """Kill the command's process group; Exited follows."""
        await self.execs.kill(self._id)

    @signal()
    def Exited(self, code: int, signal: int, how: str) -> "iis":
        return [code, signal, how]

    @dbus_property(access=PropertyAccess.READ)
    def VM(self) -> "s":
        return self._props["VM"]

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self._props["Owner"]

    @dbus_property(access=PropertyAccess.READ)
    def Argv(self) -> "as":
        return self._props["Argv"]

    @dbus_property(access=PropertyAccess.READ)
    def Pid(self) -> "u":
        return self._props["Pid"]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self._props["State"]

    @dbus_property(access=PropertyAccess.READ)
    def How(self) -> "s":
        return self._props["How"]

    @dbus_property(access=PropertyAccess.READ)
    def ExitCode(self) -> "i":
        return self._props["ExitCode"]

    @dbus_property(access=PropertyAccess.READ)
    def ExitSignal(self) -> "i":
        return self._props["ExitSignal"]
