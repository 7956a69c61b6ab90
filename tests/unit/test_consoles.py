"""kdlabd.core.consoles: shared console sessions, their limits and their input bound.

The hub runs on a real event loop with real socket pairs; the hypervisor's
console is the fake's, whose guest takes typed input only when told.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from kdlab.errors import LimitExceeded
from kdlabd.core import consoles
from kdlabd.core.consoles import ConsoleHub
from kdlabd.core.limits import Limits
from kdlabd.host.local import LocalHost
from tests.unit.fake_hypervisor import FakeConsole, FakeHypervisor

T = TypeVar("T")
ROOT, MEMBER, OTHER = 0, 1000, 1001


Scenario = Callable[[ConsoleHub, FakeHypervisor], Coroutine[Any, Any, T]]


def run(scenario: Scenario[T], limits: Limits | None = None) -> T:
    async def main() -> T:
        hv = FakeHypervisor()
        hub = ConsoleHub(hv, LocalHost(), limits)  # type: ignore[arg-type]
        try:
            return await scenario(hub, hv)
        finally:
            await hub.close_all()

    return asyncio.run(main())


def viewer(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_viewers_share_output_and_type_into_one_session() -> None:
    async def scenario(hub: ConsoleHub, hv: FakeHypervisor) -> None:
        a = viewer(await hub.attach("vm1", MEMBER))
        b = viewer(await hub.attach("vm1", MEMBER))
        (console,) = hv.consoles
        console.on_output(b"login: ")
        await settle()
        assert a.recv(100) == b"login: "
        assert b.recv(100) == b"login: "
        a.send(b"root\r")
        await until(lambda: console.backlog == 5)
        console.take()
        assert console.taken == b"root\r"
        a.close()
        b.close()
        await until(lambda: console.closed)
        assert hub.viewers("vm1") == 0

    run(scenario)


def test_viewers_per_vm_are_capped() -> None:
    async def scenario(hub: ConsoleHub, _hv: FakeHypervisor) -> None:
        kept = [await hub.attach("vm1", MEMBER) for _ in range(3)]
        with pytest.raises(LimitExceeded, match="max_console_viewers_per_vm"):
            await hub.attach("vm1", ROOT)
        os.close(kept.pop())
        await until(lambda: hub.viewers("vm1") == 2)
        kept.append(await hub.attach("vm1", ROOT))
        for fd in kept:
            os.close(fd)

    run(scenario, Limits(console_viewers_per_vm=3, console_viewers_per_user=10))


def test_viewers_per_user_are_capped_across_vms() -> None:
    async def scenario(hub: ConsoleHub, _hv: FakeHypervisor) -> None:
        kept = [await hub.attach(vm, MEMBER) for vm in ("vm1", "vm1", "vm2")]
        with pytest.raises(LimitExceeded, match="max_console_viewers_per_user"):
            await hub.attach("vm3", MEMBER)
        kept.append(await hub.attach("vm2", OTHER))  # another user's count
        assert hub.viewers("vm3") == 0, "a refused viewer opens no session"
        for fd in kept:
            os.close(fd)

    run(scenario, Limits(console_viewers_per_vm=5, console_viewers_per_user=3))


def test_input_is_not_read_while_the_guest_takes_none() -> None:
    """A flood stops in the flooding client's socket, not in kdlabd."""
    flood = b"\0" * (consoles.INPUT_BACKLOG_MAX * 3)

    async def scenario(hub: ConsoleHub, hv: FakeHypervisor) -> None:
        sock = viewer(await hub.attach("vm1", MEMBER))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        (console,) = hv.consoles
        sent = 0
        for _ in range(200):
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(flood[sent:])
            await asyncio.sleep(0.005)
        assert console.backlog >= consoles.INPUT_BACKLOG_MAX
        assert console.backlog <= consoles.INPUT_BACKLOG_MAX + 4096
        kept = console.backlog
        await asyncio.sleep(0.1)
        assert console.backlog == kept, "kdlabd stopped reading"
        # The guest catches up: kdlabd reads the rest.
        sock.setblocking(True)
        remaining = flood[sent:]

        async def drain() -> None:
            while len(console.taken) < len(flood):
                console.take()
                await asyncio.sleep(0.005)

        draining = asyncio.ensure_future(drain())
        await asyncio.to_thread(sock.sendall, remaining)
        await asyncio.wait_for(draining, 10)
        assert bytes(console.taken) == flood
        sock.close()

    run(scenario)


def test_a_viewer_that_hangs_up_while_unread_is_dropped() -> None:
    """Detaching from a paused VM ends the viewer (and the session) anyway."""

    async def scenario(hub: ConsoleHub, hv: FakeHypervisor) -> None:
        sock = viewer(await hub.attach("vm1", MEMBER))
        (console,) = hv.consoles
        await asyncio.to_thread(
            sock.sendall, b"x" * (consoles.INPUT_BACKLOG_MAX + 8192)
        )
        await until(lambda: console.backlog >= consoles.INPUT_BACKLOG_MAX)
        sock.close()
        await until(lambda: console.closed, timeout=3 * consoles.HANGUP_CHECK_SECONDS)
        assert hub.viewers("vm1") == 0

    run(scenario)


def test_shutdown_closes_every_session() -> None:
    async def scenario(hub: ConsoleHub, hv: FakeHypervisor) -> list[FakeConsole]:
        fds = [await hub.attach(vm, MEMBER) for vm in ("vm1", "vm2")]
        await hub.close_all()
        for fd in fds:
            assert os.read(fd, 10) == b"", "the viewer sees the end"
            os.close(fd)
        return hv.consoles

    assert all(console.closed for console in run(scenario))


def test_output_end_closes_the_session_and_its_viewers() -> None:
    async def scenario(hub: ConsoleHub, hv: FakeHypervisor) -> None:
        fd = await hub.attach("vm1", MEMBER)
        (console,) = hv.consoles
        console.on_output(b"")
        await until(lambda: console.closed)
        assert os.read(fd, 10) == b""
        os.close(fd)
        again = await hub.attach("vm1", MEMBER)
        assert len(hv.consoles) == 2, "a new session"
        os.close(again)

    run(scenario)
