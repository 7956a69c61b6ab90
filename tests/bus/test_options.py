"""``a{sv}`` options: every documented key with its documented type, and nothing else.

The keys and types come from the contract's documentation, so a key the
daemon accepts but the contract does not describe (or the reverse) fails here
as well as in test_contract. Every method that takes options is covered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_next import Variant

from kdlab.errors import HypervisorError, InvalidArgument
from kdlab.wire import MANAGER_PATH
from tests.bus import contract
from tests.bus.contract import IMAGE, MANAGER, VM
from tests.support.bus import BusClient

pytestmark = pytest.mark.bus

# Each method that takes options: its interface, the object it is called on
# (where the call can succeed), its signature and the arguments before options.
TARGETS: dict[str, tuple[str, str, str, list[Any]]] = {
    "CreateVM": (MANAGER, "manager", "sa{sv}", ["opts"]),
    "CreateImage": (MANAGER, "manager", "sta{sv}", ["opts", 64 << 20]),
    "ImportImage": (MANAGER, "manager", "sha{sv}", ["opts", 0]),
    "BuildImage": (MANAGER, "manager", "sa{sv}", ["opts"]),
    "Start": (VM, "idle", "a{sv}", []),
    "Stop": (VM, "busy", "a{sv}", []),
    "SaveCheckpoint": (VM, "busy", "sa{sv}", ["ready"]),
    "RestoreCheckpoint": (VM, "busy", "sa{sv}", ["ready"]),
    "Resize": (IMAGE, "image", "ta{sv}", [128 << 20]),
}
# A valid value of each D-Bus type for any documented key (h: index in unix_fds;
# an absolute path is both a valid command line and a valid path hint).
VALID = {
    "h": 0,
    "s": "/usr/src/linux/vmlinux",
    "u": 64,
    "b": False,
    "q": 4000,
    "t": 128 << 20,
    "at": [1 << 20],
    "as": [],
    "a{ss}": {"src": "/usr/src/linux"},
}
CASES = [
    (method, key, signature)
    for method, (interface, *_) in TARGETS.items()
    for key, signature in contract.documented_options(interface, method).items()
]


@pytest.fixture
def kernel_fd(kernels: dict[str, Path]) -> Iterator[int]:
    fd = os.open(kernels["bzImage"], os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.fixture
def paths(client: BusClient, image_and_job: tuple[str, str]) -> dict[str, str]:
    """The objects the methods are called on, by TARGETS' names for them."""
    return {
        "manager": MANAGER_PATH,
        "idle": client.vm_path("idle"),
        "busy": client.vm_path("busy"),
        "image": image_and_job[0],
    }


def target_call(
    paths: dict[str, str], method: str, options: dict[str, Variant]
) -> tuple[str, tuple[Any, ...]]:
    """The interface and :meth:`BusClient.call` arguments of *method* with *options*."""
    interface, target, signature, args = TARGETS[method]
    return interface, (paths[target], interface, method, signature, [*args, options])


@pytest.mark.parametrize("method", TARGETS)
def test_unknown_key_is_refused_naming_the_known_keys(
    client: BusClient, kernel_fd: int, paths: dict[str, str], method: str
) -> None:
    interface, args = target_call(paths, method, {"bogus": Variant("b", True)})
    before = client.managed_objects()
    error = client.error(*args, unix_fds=[kernel_fd])
    contract.assert_error_reply(error, InvalidArgument, interface, method)
    for key in contract.documented_options(interface, method):
        assert key in error[1], f"{key!r} is not named in {error[1]!r}"
    assert client.managed_objects() == before


@pytest.mark.parametrize(("method", "key", "signature"), CASES)
def test_value_of_another_type_is_refused(
    client: BusClient, paths: dict[str, str], method: str, key: str, signature: str
) -> None:
    wrong = Variant("u", 1) if signature == "s" else Variant("s", "1")
    interface, args = target_call(paths, method, {key: wrong})
    before = client.managed_objects()
    error = client.error(*args)
    contract.assert_error_reply(error, InvalidArgument, interface, method)
    assert key in error[1]
    assert client.managed_objects() == before


@pytest.mark.parametrize("method", ["CreateVM", "Start", "Stop"])
def test_every_documented_key_is_accepted(
    client: BusClient, kernel_fd: int, paths: dict[str, str], method: str
) -> None:
    interface, *_ = TARGETS[method]
    documented = contract.documented_options(interface, method)
    # A word from a fixed set has its own valid value.
    valid = {"on_panic": "dump-and-keep", "initramfs": "userspace"}
    options = {
        key: Variant(sig, valid.get(key, VALID[sig])) for key, sig in documented.items()
    }
    if method == "CreateVM":
        options["image"] = Variant("s", "base")  # the image option names an image
        options["vcpus"] = Variant("u", 2)  # within the test driver host's 16 CPUs
    _, args = target_call(paths, method, options)
    if "h" in documented.values():
        # Options, name and kernel passed every check: only the upload, which the
        # test driver does not implement, stops it.
        error = client.error(*args, unix_fds=[kernel_fd])
        contract.assert_error_reply(error, HypervisorError, interface, method)
        assert "opts" not in client.vm_names()
    else:
        client.ok(*args)
