"""LibvirtHypervisor while its libvirt connection is lost, on libvirt's test driver.

The vm tier restarts the real libvirtd (tests/vm/test_faults.py); here the
logic of waiting is checked on its own: a call made while kdlabd reconnects
waits for the connection instead of failing, and fails with HypervisorError
once the configured bound has passed, or at once when kdlabd stops. libvirt
"going away" is libvirt's close callback, and opens that fail meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import libvirt
import pytest

from kdlab.errors import HypervisorError
from kdlabd.virt import libvirt_backend
from kdlabd.virt.libvirt_backend import LibvirtHypervisor, register_event_loop

WAIT = 1.0


class Libvirtd:
    """Whether "libvirtd" answers: while away, libvirt.open fails as it does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.away = False
        real_open = libvirt.open

        def open_(uri: str) -> libvirt.virConnect:
            if self.away:
                raise libvirt.libvirtError("Failed to connect socket: No such file")
            return real_open(uri)

        monkeypatch.setattr(libvirt_backend.libvirt, "open", open_)

    async def stop(self, hv: LibvirtHypervisor) -> None:
        """Stop it: libvirt tells kdlabd its connection closed (the close
        callback, which hands over to the loop)."""
        self.away = True
        hv._closed(hv._conn, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
        await asyncio.sleep(0)


def scenario(tmp_path: Path, libvirtd: Libvirtd) -> list[str]:
    async def run() -> list[str]:
        register_event_loop()
        driver = tmp_path / "node.xml"
        driver.write_text("<node/>")
        hv = LibvirtHypervisor(
            f"test://{driver}", vm_pool="boot", vm_pool_dir=tmp_path / "boot",
            image_pool="images", image_pool_dir=tmp_path / "images",
            gdb_dir=tmp_path / "gdb", qemu_user="root", reconnect_wait=WAIT,
        )  # fmt: skip
        seen = []
        await hv.connect()
        try:
            # Away for longer than the bound: the call gives up after it.
            await libvirtd.stop(hv)
            started = time.monotonic()
            with pytest.raises(HypervisorError, match=f"not answered for {WAIT:g} s"):
                await hv.list_images()
            assert time.monotonic() - started >= WAIT
            seen.append("gave up after the bound")
            # Back within the bound: the call waits and is served.
            call = asyncio.create_task(hv.list_images())
            await asyncio.sleep(WAIT / 2)
            assert not call.done(), "the call waits for the reconnection"
            libvirtd.away = False
            assert await call == []
            seen.append("served once back")
            # kdlabd stops while a call waits: the call fails at once.
            await libvirtd.stop(hv)
            call = asyncio.create_task(hv.list_images())
            await asyncio.sleep(0)
        finally:
            await hv.close()
        with pytest.raises(HypervisorError, match="kdlabd is stopping"):
            await call
        seen.append("failed at once on close")
        return seen

    return asyncio.run(run())


def test_calls_wait_for_the_reconnection_up_to_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = scenario(tmp_path, Libvirtd(monkeypatch))
    assert seen == [
        "gave up after the bound",
        "served once back",
        "failed at once on close",
    ]
