"""Shares: a VM's directories of its owner's, served by the owner.

kdlabd's part (VMService on the fake hypervisor and the real LocalHost, on
temporary directories): the shares are kept with the VM, their sockets are
made where only QEMU connects and handed to the owner alone, and a start
refuses a share nobody serves and cannot hang on one. kdlabctl's part: the
``--share`` argument, and the launcher that lets an unprivileged virtiofsd
run (its setgroups made a no-op, in a real user namespace).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdlab import wire
from kdlab.errors import HypervisorError, InvalidArgument, InvalidState, NotAuthorized
from kdlab.states import VMState
from kdlabctl import shares as client_shares
from kdlabd.core import vms
from kdlabd.core.models import Share
from kdlabd.host.facts import QemuUser
from kdlabd.host.local import LocalHost
from tests.support.prereq import require, require_tool
from tests.unit.fake_hypervisor import Call, FakeHypervisor
from tests.unit.test_vms import OWNER, Lab, new_lab, run, settle

SHARES = (("src", "/home/dev/linux"), ("out", "/home/dev/out dir"))


@pytest.fixture
def lab() -> Iterator[Lab]:
    # QEMU's user is nobody here: what is made for QEMU is nobody's, in a
    # directory it can reach (pytest's are 0700, /var/tmp is not).
    require(os.geteuid() == 0, "root (sockets are given to QEMU's user)")
    qemu = QemuUser.lookup("nobody")
    assert qemu is not None
    root = Path(tempfile.mkdtemp(prefix="kdlab-shares-", dir="/var/tmp"))
    root.chmod(0o711)
    try:
        yield new_lab(root, FakeHypervisor(), LocalHost(qemu))
    finally:
        shutil.rmtree(root)


async def created(lab: Lab, name: str = "vm1") -> None:
    await lab.create(name, shares=SHARES)


def test_shares_are_kept_with_the_vm_in_tag_order(lab: Lab) -> None:
    async def scenario() -> None:
        await created(lab)
        await lab.service.load()  # read back from the hypervisor's definition

    run(scenario())
    spec = lab.service.get("vm1").spec
    assert spec.shares == (
        Share("out", "/home/dev/out dir", lab.layout.share_socket("vm1", 0)),
        Share("src", "/home/dev/linux", lab.layout.share_socket("vm1", 1)),
    )
    assert spec.effective_cmdline.split()[-1] == "kdlab.shares=out,src"
    assert lab.hv.domains["vm1"].spec == spec


@pytest.mark.parametrize(
    ("shares", "match"),
    [
        ({"a b": "/x"}, "invalid share tag"),
        ({"..": "/x"}, "invalid share tag"),
        ({"x" * 37: "/x"}, "invalid share tag"),
        ({"x": "relative"}, "absolute path"),
        ({"x": "/a\nb"}, "printable"),
        ({"x": "/" + "a" * 4096}, "at most 4096"),
        ({f"t{i}": "/x" for i in range(wire.SHARES_MAX + 1)}, "at most 8"),
    ],
)
def test_bad_shares_are_refused_before_anything_is_made(
    lab: Lab, shares: dict[str, str], match: str
) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidArgument, match=match):
            await lab.create(shares=tuple(shares.items()))

    run(scenario())
    assert lab.hv.calls == []
    assert lab.service.list() == []


def test_a_name_too_long_for_the_sockets_path_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60)
    deep.mkdir()
    lab = new_lab(deep, FakeHypervisor(), LocalHost())

    async def scenario() -> None:
        with pytest.raises(InvalidArgument, match="shorter VM name"):
            await lab.create("n" * 40, shares=SHARES)

    run(scenario())
    assert lab.hv.calls == []


def test_the_owner_gets_a_listening_socket_per_share_only_qemu_can_reach(
    lab: Lab,
) -> None:
    async def scenario() -> dict[str, int]:
        await created(lab)
        return await lab.service.serve_shares("vm1", OWNER)

    fds = run(scenario())
    try:
        assert sorted(fds) == ["out", "src"]
        for index, tag in enumerate(["out", "src"]):
            path = lab.layout.share_socket("vm1", index)
            listener = socket.socket(fileno=os.dup(fds[tag]))
            with listener:
                assert listener.getsockname() == str(path)
                assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            found = path.stat()
            assert stat.S_ISSOCK(found.st_mode)
            assert (found.st_uid, stat.S_IMODE(found.st_mode)) == (65534, 0o600)
            for directory in (path.parent, path.parent.parent):
                info = directory.stat()
                assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (65534, 0o700)
            # QEMU connects at the path: it reaches the socket the owner holds.
            with socket.socket(socket.AF_UNIX) as qemu:
                qemu.connect(str(path))
                served, _ = socket.socket(fileno=os.dup(fds[tag])).accept()
                served.close()
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.parametrize("uid", [0, OWNER + 1])
def test_only_the_owner_may_serve_the_shares_root_neither(lab: Lab, uid: int) -> None:
    async def scenario() -> None:
        await created(lab)
        with pytest.raises(NotAuthorized, match="only the owner"):
            await lab.service.serve_shares("vm1", uid)

    run(scenario())
    assert not lab.layout.shares_dir("vm1").exists()


def test_serving_needs_shares_and_a_stopped_vm(lab: Lab) -> None:
    async def scenario() -> None:
        await lab.create("plain")
        with pytest.raises(InvalidState, match="has no shares"):
            await lab.service.serve_shares("plain", OWNER)
        await created(lab)
        lab.hv.domains["vm1"].state = VMState.RUNNING
        lab.service.domain_changed("vm1")
        await settle()
        with pytest.raises(InvalidState, match="before it starts"):
            await lab.service.serve_shares("vm1", OWNER)

    run(scenario())


def test_a_start_refuses_shares_never_served(lab: Lab) -> None:
    async def scenario() -> None:
        await created(lab)
        with pytest.raises(InvalidState, match="share 'out' of VM 'vm1' is not served"):
            await lab.service.start("vm1")

    run(scenario())
    assert lab.hv.called("start_vm") == []
    assert lab.service.get("vm1").state is VMState.DEFINED


def test_a_start_refuses_a_share_whose_server_is_gone(lab: Lab) -> None:
    async def scenario() -> None:
        await created(lab)
        fds = await lab.service.serve_shares("vm1", OWNER)
        os.close(fds.pop("src"))  # its virtiofsd exited
        try:
            with pytest.raises(InvalidState, match="nobody serves share 'src'"):
                await lab.service.start("vm1")
        finally:
            os.close(fds["out"])

    run(scenario())
    assert lab.hv.called("start_vm") == []


def test_a_start_refuses_a_socket_replaced_behind_kdlabds_back(lab: Lab) -> None:
    async def scenario() -> None:
        await created(lab)
        fds = await lab.service.serve_shares("vm1", OWNER)
        path = lab.layout.share_socket("vm1", 0)
        path.unlink()
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        other.listen(1)
        try:
            with pytest.raises(InvalidState, match="nobody serves share 'out'"):
                await lab.service.start("vm1")
        finally:
            other.close()
            for fd in fds.values():
                os.close(fd)

    run(scenario())


def test_served_shares_start_once_and_are_served_again_for_the_next(lab: Lab) -> None:
    async def scenario() -> None:
        await created(lab)
        fds = await lab.service.serve_shares("vm1", OWNER)
        try:
            await lab.service.start("vm1")
            assert lab.service.get("vm1").state is VMState.RUNNING
            await lab.service.stop("vm1", force=True)
            # QEMU took the sockets' connections: a new boot needs new ones.
            with pytest.raises(InvalidState, match="is not served"):
                await lab.service.start("vm1")
            for fd in fds.values():
                os.close(fd)
            fds = await lab.service.serve_shares("vm1", OWNER)
            await lab.service.start("vm1")
        finally:
            for fd in fds.values():
                os.close(fd)

    run(scenario())
    assert lab.hv.called("start_vm") == ["vm1", "vm1"]


def test_serving_again_replaces_the_sockets(lab: Lab) -> None:
    async def scenario() -> None:
        await created(lab)
        first = await lab.service.serve_shares("vm1", OWNER)
        second = await lab.service.serve_shares("vm1", OWNER)
        for fd in first.values():  # the first servers give up: nothing changes
            os.close(fd)
        try:
            await lab.service.start("vm1")
        finally:
            for fd in second.values():
                os.close(fd)

    run(scenario())
    assert lab.hv.called("start_vm") == ["vm1"]


def test_a_start_held_by_a_silent_server_is_stopped(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that holds its socket and never answers holds QEMU, and
    libvirt waits for QEMU: kdlabd destroys the VM, which ends the wait."""
    monkeypatch.setattr(vms, "SHARED_START_SECONDS", 0.2)
    held = lab.hv.hold("start_vm")
    lab.hv.fail("start_vm", HypervisorError("libvirt: QEMU was killed"))

    async def destroy(name: str) -> None:
        lab.hv.calls.append(Call("destroy_vm", name))
        held.set()  # QEMU is gone: libvirt's start returns

    monkeypatch.setattr(lab.hv, "destroy_vm", destroy)

    async def scenario() -> None:
        await created(lab)
        fds = await lab.service.serve_shares("vm1", OWNER)
        try:
            with pytest.raises(HypervisorError, match=r"did not start within 0\.2 s"):
                await lab.service.start("vm1")
        finally:
            for fd in fds.values():
                os.close(fd)

    run(scenario())
    assert lab.hv.called("destroy_vm") == ["vm1"]
    assert lab.service.get("vm1").state is VMState.DEFINED


def test_delete_removes_the_shares_sockets(lab: Lab) -> None:
    async def scenario() -> None:
        await created(lab)
        for fd in (await lab.service.serve_shares("vm1", OWNER)).values():
            os.close(fd)
        await lab.service.delete("vm1")

    run(scenario())
    assert not lab.layout.shares_dir("vm1").exists()


def test_listens_follows_the_process_that_holds_the_socket(tmp_path: Path) -> None:
    host = LocalHost()
    path = tmp_path / "shares" / "vm" / "0.sock"
    fd, listener = asyncio.run(host.listen_for_qemu(path, seconds=5, what="test"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=(fd,),
    )
    os.close(fd)
    assert host.listens(listener)  # the holder (a virtiofsd) has it
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait()
    assert not host.listens(listener)


# kdlabctl's part.


@pytest.mark.parametrize(
    ("directory", "tag"),
    [
        ("/home/dev/linux-6.9", "linux-6.9"),
        ("/home/dev/my src (copy)", "my-src-copy"),
        ("/", "share"),
        ("/srv/..", "share"),
        ("/x/" + "é" * 40, "share"),
        ("/x/" + "a" * 50, "a" * 36),
    ],
)
def test_a_shares_default_tag_is_its_directorys_name(directory: str, tag: str) -> None:
    assert client_shares.default_tag(directory) == tag


def test_share_arguments(tmp_path: Path) -> None:
    (tmp_path / "a:b").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "src")
    parse, spec = client_shares.parse, client_shares.ShareSpec
    assert parse(f"{tmp_path}/src") == spec("src", f"{tmp_path}/src")
    # A symbolic link is resolved: the share is what it points at.
    assert parse(f"{tmp_path}/link:t") == spec("t", f"{tmp_path}/src")
    # A colon whose tail is no tag is part of the directory's name.
    assert parse(f"{tmp_path}/a:b:x") == spec("x", f"{tmp_path}/a:b")
    with pytest.raises(client_shares.ShareError, match="not a directory"):
        parse(f"{tmp_path}/missing")
    twice = [parse(f"{tmp_path}/src"), parse(f"{tmp_path}/link")]
    with pytest.raises(client_shares.ShareError, match="tag 'src'"):
        client_shares.shares_option(twice)


def test_virtiofsd_runs_in_a_user_namespace_pivoted_into_the_directory() -> None:
    argv = client_shares.virtiofsd_argv(7, "/home/dev/a b")
    launcher = argv.index(str(client_shares.LAUNCHER))
    assert argv[launcher + 1 : launcher + 5] == [
        "unshare", "--user", "--map-root-user", "--",
    ]  # fmt: skip
    assert "--fd=7" in argv
    assert argv[argv.index("--fd=7") - 1] == str(client_shares.VIRTIOFSD)
    assert {"source=/home/dev/a b", "sandbox=namespace", "no_xattr"} <= set(argv)


SETGROUPS = (
    "import os; g = os.getgroups(); os.setgroups([]); print(os.getgroups() == g)"
)


def test_the_launcher_makes_setgroups_succeed_without_changing_the_groups() -> None:
    """In an unprivileged user namespace setgroups is refused for good (the
    C virtiofsd exits on that); under the launcher it succeeds and drops
    nothing: the server keeps its user's groups."""
    unshare = require_tool("unshare", "util-linux")
    plain = [unshare, "--user", "--map-root-user", sys.executable, "-c", SETGROUPS]
    refused = subprocess.run(plain, capture_output=True, text=True, check=False)
    assert refused.returncode != 0
    assert "PermissionError" in refused.stderr
    launched = [sys.executable, "-I", "-S", str(client_shares.LAUNCHER), *plain]
    done = subprocess.run(launched, capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "")


def test_the_launcher_says_what_it_could_not_run() -> None:
    launched = [sys.executable, "-I", "-S", str(client_shares.LAUNCHER), "/nonexistent"]
    done = subprocess.run(launched, capture_output=True, text=True, check=False)
    assert done.returncode == 127
    assert "/nonexistent" in done.stderr
