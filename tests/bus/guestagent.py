"""kdlab's real guest agent where the bus tier's VMs have no guest.

The test driver runs no QEMU. QEMU's side of a VM's exec channel is a unix
socket it listens on (the virtio-serial port's chardev); here a thread
listens there instead and hands each connection kdlabd makes to the real
agent binary (``kdlab-agent --fd``), run as nobody, as the guest side would
be. So every byte of VM.Exec (kdlabd, the protocol, the agent) is real but
the virtio-serial transport, which the vm tier covers.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from kdlab.agent import build
from kdlab.wire import VM_INTERFACE
from tests.bus.gdbstub import QemuSocket
from tests.support.bus import BusClient
from tests.support.clients import NOBODY, cache_home
from tests.support.testdriver import Lab


def agent_binary(cache: Path) -> Path:
    """The agent, built once per cache directory; readable and runnable by
    nobody (the tests' caches are 0700)."""
    binary = build(cache)
    public = Path("/tmp") / f"kdlab-test-{binary.name}"
    if not public.exists():
        staging = public.with_suffix(f".{os.getpid()}")
        staging.write_bytes(binary.read_bytes())
        staging.chmod(0o755)
        staging.replace(public)
    return public


class GuestAgent(QemuSocket):
    """The guest side of one VM's exec channel at *path*, while it is open."""

    def __init__(self, path: Path, binary: Path) -> None:
        self._binary = binary
        self._agents: list[subprocess.Popen[bytes]] = []
        # QEMU serves one client at a time: the next waits its turn.
        super().__init__(path, backlog=1)

    def serve(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        agent = subprocess.Popen(
            [*NOBODY.setpriv(), str(self._binary), "--fd", str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            cwd="/",
        )
        self._agents.append(agent)
        conn.close()
        agent.wait()

    @property
    def pids(self) -> list[int]:
        """The agents running now."""
        return [a.pid for a in self._agents if a.poll() is None]

    def close(self) -> None:
        super().close()
        for agent in self._agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait(timeout=10)


def running_command(
    client: BusClient, lab: Lab, vm: str = "busy"
) -> tuple[str, GuestAgent]:
    """A command of the caller's (``sleep 600``) running in the running VM
    *vm*, served by the real agent: its object path, and the agent (the
    caller closes it)."""
    agent = GuestAgent(
        lab.layout.agent_socket(vm), agent_binary(cache_home() / "agent")
    )
    reply = client.call(
        client.vm_path(vm), VM_INTERFACE, "Exec", "asa{sv}", [["sleep", "600"], {}]
    )
    assert reply.error_name is None, reply.body
    for fd in reply.unix_fds:
        os.close(fd)
    return str(reply.body[2]), agent
