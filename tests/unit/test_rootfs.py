"""Root file system builds: specs (kdlabd.core.rootfs, validated by
kdlabd.core.validate), and the host's build (kdlabd.host.rootfs): the
configured tree, progress, cache, cleanup.

Validation, the configure step and progress parsing are pure. The build tests
run the real ``tar`` and ``mke2fs`` around a fake debootstrap (a few lines of
shell that write a tiny tree, fail, or sleep), all in the build's real
sandbox (namespaces and capabilities: they need root), so they take well
under a second each and need no network; the real debootstrap is in
``tests/vm/test_rootfs_build.py``.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import itertools
import os
import stat
import struct
import subprocess
import tarfile
import time
import tomllib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kdlab import agent
from kdlab.errors import BuildFailed, InvalidArgument, KdlabError
from kdlabd.core import validate
from kdlabd.core.rootfs import RootfsSpec
from kdlabd.host import rootfs
from kdlabd.host.builder import LocalBuilder
from kdlabd.host.rootfs import (
    AGENT_BINARY,
    AGENT_UNIT,
    AGENT_WANTS,
    AUTOLOGIN_CONF,
    AUTOLOGIN_DROP_IN,
    FSTAB,
    MASKED_UNITS,
    SSH_HOST_KEYS_CONF,
    SSH_HOST_KEYS_DROP_IN,
    DebootstrapProgress,
    RootfsBuildError,
    build_agent,
    build_rootfs,
    cache_key,
    configure_tree,
    include_packages,
)
from tests.support import REPO, daemon
from tests.support.prereq import require, require_tool

T = TypeVar("T")

RECORDED_LOG = REPO / "tests" / "golden" / "debootstrap-bookworm-minbase.log"
MIB = 1024 * 1024


def run(work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(work, timeout))


def ssh_key(kind: str = "ssh-ed25519", blob_kind: str | None = None) -> str:
    """A well-formed public key line (the blob starts with its type, as OpenSSH's)."""
    name = (blob_kind or kind).encode()
    blob = struct.pack(">I", len(name)) + name + struct.pack(">I", 32) + bytes(32)
    return f"{kind} {base64.b64encode(blob).decode()} dev@example host"


KEY = ssh_key()


# Specs.


def test_spec_defaults() -> None:
    spec = RootfsSpec("bookworm")
    assert spec.size_bytes == 2 * 1024 * MIB
    assert spec.packages == ()
    assert spec.ssh_key == ""
    assert spec.hostname == "kdlab"
    assert spec.mirror == "http://deb.debian.org/debian"


@pytest.mark.parametrize("suite", ["bookworm", "trixie", "sid", "ab", "unstable-1"])
def test_valid_suites(suite: str) -> None:
    assert RootfsSpec(suite).suite == suite


@pytest.mark.parametrize(
    "suite",
    [
        "",
        "b",
        "Bookworm",
        "1bookworm",
        "-bookworm",
        "book worm",
        "bookworm/updates",
        "../../etc",
        "bookworm\n",
        "x" * 32,
        "bookwörm",
        None,
        7,
    ],
)
def test_invalid_suites(suite: Any) -> None:
    with pytest.raises(InvalidArgument, match="suite"):
        RootfsSpec(suite)


@pytest.mark.parametrize(
    "size", [512 * MIB, 513 * MIB, 2 * 1024 * MIB, 1024 * 1024 * MIB]
)
def test_valid_sizes(size: int) -> None:
    assert RootfsSpec("bookworm", size).size_bytes == size


@pytest.mark.parametrize(
    "size",
    [
        0,
        -1,
        511 * MIB,
        512 * MIB - 1,
        512 * MIB + 1,
        1024 * 1024 * MIB + MIB,
        True,
        2.0 * 1024 * MIB,
        "2G",
        None,
    ],
)
def test_invalid_sizes(size: Any) -> None:
    with pytest.raises(InvalidArgument, match="size"):
        RootfsSpec("bookworm", size)


def test_packages_sorted_without_duplicates() -> None:
    spec = RootfsSpec("bookworm", packages=("vim", "gdb", "vim", "g++", "libc6-dbg"))
    assert spec.packages == ("g++", "gdb", "libc6-dbg", "vim")


@pytest.mark.parametrize(
    "package",
    [
        "",
        "a",
        "Vim",
        "-vim",
        "+vim",
        ".vim",
        "vim,gdb",
        "vim gdb",
        "vim\n",
        "vim;rm",
        "vim=2:9.0",
        "vim/bookworm",
        "--include=x",
        "vím",
    ],
)
def test_invalid_package_names(package: str) -> None:
    with pytest.raises(InvalidArgument, match="package"):
        RootfsSpec("bookworm", packages=(package,))


def test_packages_must_be_a_list() -> None:
    with pytest.raises(InvalidArgument, match="list"):
        RootfsSpec("bookworm", packages="vim")  # type: ignore[arg-type]


def test_too_many_packages() -> None:
    many = tuple(f"pkg{n}" for n in range(validate.MAX_PACKAGES + 1))
    with pytest.raises(InvalidArgument, match="at most"):
        RootfsSpec("bookworm", packages=many)
    assert len(RootfsSpec("bookworm", packages=many[:-1]).packages) == len(many) - 1


@pytest.mark.parametrize(
    "kind",
    [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ],
)
def test_valid_ssh_keys(kind: str) -> None:
    key = ssh_key(kind)
    assert RootfsSpec("bookworm", ssh_key=key).ssh_key == key


def test_ssh_key_file_text_loses_its_final_newline() -> None:
    assert RootfsSpec("bookworm", ssh_key=KEY + "\n").ssh_key == KEY


def test_ssh_key_without_comment() -> None:
    key = " ".join(KEY.split()[:2])
    assert RootfsSpec("bookworm", ssh_key=key).ssh_key == key


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (KEY + "\n" + KEY, "single printable line"),
        (KEY + "\n\n", "single printable line"),
        ("\n" + KEY, "single printable line"),
        (KEY.replace(" dev@", "\ndev@"), "single printable line"),
        (KEY + "\r\n", "single printable line"),
        (KEY + "\x00", "single printable line"),
        (KEY + "\t", "single printable line"),
        ('command="/bin/sh" ' + KEY, "not a key type"),
        ("ssh-dss " + KEY.split()[1], "not a key type"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "not a key type"),
        ("ssh-ed25519", "not a ssh-ed25519 key"),
        ("ssh-ed25519 not*base64", "not a ssh-ed25519 key"),
        ("ssh-ed25519 QUFB", "not a ssh-ed25519 key"),
        (ssh_key("ssh-ed25519", blob_kind="ssh-rsa"), "not a ssh-ed25519 key"),
        ("ssh-ed25519  " + KEY.split()[1], "not a ssh-ed25519 key"),
    ],
)
def test_invalid_ssh_keys(key: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        RootfsSpec("bookworm", ssh_key=key)


@pytest.mark.parametrize("hostname", ["kdlab", "a", "vm-1", "x" * 63, "9p"])
def test_valid_hostnames(hostname: str) -> None:
    assert RootfsSpec("bookworm", hostname=hostname).hostname == hostname


@pytest.mark.parametrize(
    "hostname", ["", "-vm", "vm-", "VM", "vm.local", "vm_1", "x" * 64, "vm\n"]
)
def test_invalid_hostnames(hostname: str) -> None:
    with pytest.raises(InvalidArgument, match="hostname"):
        RootfsSpec("bookworm", hostname=hostname)


@pytest.mark.parametrize(
    "mirror",
    [
        "http://deb.debian.org/debian",
        "https://mirror.example.org:8443/debian/",
        "http://127.0.0.1:3142/deb.debian.org/debian",
    ],
)
def test_valid_mirrors(mirror: str) -> None:
    assert RootfsSpec("bookworm", mirror=mirror).mirror == mirror


@pytest.mark.parametrize(
    "mirror",
    [
        "",
        "deb.debian.org/debian",
        "file:///etc",
        "ftp://ftp.debian.org/debian",
        "http://deb.debian.org/debian bookworm",
        "http://deb.debian.org/debian\n",
        "http://user@deb.debian.org/debian",
        "--keyring=/etc/shadow",
    ],
)
def test_invalid_mirrors(mirror: str) -> None:
    with pytest.raises(InvalidArgument, match="mirror"):
        RootfsSpec("bookworm", mirror=mirror)


def test_invalid_argument_is_a_kdlab_error_with_its_name() -> None:
    with pytest.raises(KdlabError) as raised:
        RootfsSpec("Bookworm")
    assert raised.value.dbus_name() == "org.kdlab.Kdlab1.Error.InvalidArgument"
    assert RootfsBuildError.dbus_name() == "org.kdlab.Kdlab1.Error.BuildFailed"


# What debootstrap is told, and the cache key.


def test_include_packages() -> None:
    assert include_packages(RootfsSpec("bookworm")) == ("dbus", "systemd-sysv", "udev")
    with_key = RootfsSpec("bookworm", packages=("gdb", "udev"), ssh_key=KEY)
    assert include_packages(with_key) == (
        "dbus",
        "gdb",
        "openssh-server",
        "systemd-sysv",
        "udev",
    )


def test_debootstrap_argv(tmp_path: Path) -> None:
    spec = RootfsSpec("trixie", packages=("gdb",), mirror="http://127.0.0.1/debian")
    argv = rootfs.debootstrap_argv(spec, tmp_path / "root")
    assert argv == [
        "debootstrap",
        "--force-check-gpg",
        "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
        "--variant=minbase",
        "--include=dbus,gdb,systemd-sysv,udev",
        "trixie",
        str(tmp_path / "root"),
        "http://127.0.0.1/debian",
    ]


def test_mke2fs_argv(tmp_path: Path) -> None:
    argv = rootfs.mke2fs_argv(tmp_path / "root", tmp_path / "img", 512 * MIB)
    assert argv[0] == "mke2fs"
    assert argv[-4:] == ["-d", str(tmp_path / "root"), str(tmp_path / "img"), "524288k"]
    assert argv[argv.index("-L") + 1] == "kdlab-root"
    features = argv[argv.index("-O") + 1].split(",")
    assert features[0] == "none", "the host's mke2fs.conf must not add features"
    assert "orphan_file" not in features
    assert "metadata_csum_seed" not in features


BASE = RootfsSpec("bookworm")


@pytest.mark.parametrize(
    "other",
    [
        RootfsSpec("trixie"),
        RootfsSpec("bookworm", packages=("gdb",)),
        RootfsSpec("bookworm", packages=("gdb", "strace")),
        RootfsSpec("bookworm", mirror="http://127.0.0.1/debian"),
        RootfsSpec("bookworm", ssh_key=KEY),
    ],
    ids=["suite", "package", "packages", "mirror", "ssh"],
)
def test_cache_key_changes(other: RootfsSpec) -> None:
    assert cache_key(other) != cache_key(BASE)


@pytest.mark.parametrize(
    "same",
    [
        RootfsSpec("bookworm", size_bytes=512 * MIB),
        RootfsSpec("bookworm", hostname="other"),
        RootfsSpec("bookworm", packages=("udev",)),  # a default anyway
    ],
    ids=["size", "hostname", "default-package"],
)
def test_cache_key_ignores_what_comes_after_the_cache(same: RootfsSpec) -> None:
    assert cache_key(same) == cache_key(BASE)


def test_cache_key_ignores_which_key_and_package_order() -> None:
    one = RootfsSpec("bookworm", packages=("gdb", "strace"), ssh_key=KEY)
    two = RootfsSpec("bookworm", packages=("strace", "gdb"), ssh_key=ssh_key("ssh-rsa"))
    assert cache_key(one) == cache_key(two)
    assert cache_key(one).startswith("bookworm-")
    assert len(cache_key(one)) == len("bookworm-") + 24


# The configure step, on a fake tree.

HOST_KEYS = ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key")


FAKE_AGENT = b"\x7fELF kdlab's agent, as far as the configure step knows\n"


@pytest.fixture(scope="module")
def fake_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file that stands for kdlab's agent binary (configure copies it)."""
    path = tmp_path_factory.mktemp("agent") / "kdlab-agent-fake"
    path.write_bytes(FAKE_AGENT)
    return path


def fake_tree(root: Path) -> None:
    """The files of a debootstrap tree that configure_tree reads or replaces."""
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/bash\nu:x:1000:1000::/:/bin/sh\n",
        "etc/shadow": "root:*:19000:0:99999:7:::\nuser:$y$hash:19000:0:99999:7:::\n",
        "etc/hostname": "vm\n",
        "etc/resolv.conf": "nameserver 10.255.255.53\n",
        "etc/machine-id": "6cffcf63897746b6a72e1dc7946bc0c0\n",
        "var/lib/dbus/machine-id": "6cffcf63897746b6a72e1dc7946bc0c0\n",
        "etc/fstab": "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n",
        "etc/ssh/sshd_config": "#PermitRootLogin prohibit-password\n",
        **{f"etc/ssh/{name}": "secret\n" for name in HOST_KEYS},
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/machine-id").chmod(0o444)
    (root / "etc/systemd/system/timers.target.wants").mkdir(parents=True)
    (root / "root").mkdir(mode=0o700)


def tree_listing(root: Path) -> dict[str, str]:
    """Every path under *root*: 'dir', 'link -> target' or the file's mode."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = oct(stat.S_IMODE(path.stat().st_mode))
    return found


def test_configure_tree_writes_exactly_these_files(
    tmp_path: Path, fake_agent: Path
) -> None:
    fake_tree(tmp_path)
    before = tree_listing(tmp_path)
    configure_tree(
        tmp_path, RootfsSpec("bookworm", hostname="dbg", ssh_key=KEY), fake_agent
    )
    after = tree_listing(tmp_path)

    masked = {
        f"etc/systemd/system/{unit}": "link -> /dev/null" for unit in MASKED_UNITS
    }
    added = {
        **masked,
        "etc/hosts": "0o644",
        "etc/systemd/system/serial-getty@ttyS0.service.d": "dir",
        AUTOLOGIN_DROP_IN: "0o644",
        "etc/systemd/system/ssh.service.d": "dir",
        SSH_HOST_KEYS_DROP_IN: "0o644",
        "root/.ssh": "dir",
        "root/.ssh/authorized_keys": "0o600",
        "usr": "dir",
        "usr/local": "dir",
        "usr/local/sbin": "dir",
        AGENT_BINARY: "0o755",
        AGENT_UNIT: "0o644",
        "etc/systemd/system/multi-user.target.wants": "dir",
        AGENT_WANTS: "link -> /etc/systemd/system/kdlab-agent.service",
    }
    removed = {
        "etc/resolv.conf",
        "var/lib/dbus/machine-id",
        *(f"etc/ssh/{name}" for name in HOST_KEYS),
    }
    expected = {k: v for k, v in before.items() if k not in removed} | added
    assert after == expected, "no temporary or unexpected file is left"

    assert (tmp_path / "etc/hostname").read_text() == "dbg\n"
    hosts = (tmp_path / "etc/hosts").read_text().splitlines()
    assert "127.0.0.1\tlocalhost" in hosts
    assert "127.0.1.1\tdbg" in hosts
    assert (tmp_path / "etc/fstab").read_text() == FSTAB
    fstab_entries = [
        line.split()
        for line in FSTAB.splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert fstab_entries == [["/dev/vda", "/", "ext4", "errors=remount-ro", "0", "1"]]
    assert (tmp_path / "etc/machine-id").read_text() == ""
    assert (tmp_path / AUTOLOGIN_DROP_IN).read_text() == AUTOLOGIN_CONF
    assert (tmp_path / SSH_HOST_KEYS_DROP_IN).read_text() == SSH_HOST_KEYS_CONF
    assert (tmp_path / "root/.ssh/authorized_keys").read_text() == KEY + "\n"
    assert stat.S_IMODE((tmp_path / "root/.ssh").stat().st_mode) == 0o700
    assert (tmp_path / "etc/passwd").read_text().startswith("root:x:0:0:")
    assert (tmp_path / AGENT_BINARY).read_bytes() == FAKE_AGENT
    assert (tmp_path / AGENT_BINARY).stat().st_uid == os.geteuid(), "kdlabd's: root"
    assert (tmp_path / AGENT_UNIT).read_text() == agent.UNIT.read_text()


def test_the_agents_unit_runs_the_installed_agent_at_boot() -> None:
    """The one unit file: its ExecStart is where the build puts the agent, and
    the build's link is what ``systemctl enable`` makes of its [Install]."""
    unit = configparser.ConfigParser(interpolation=None)
    unit.read_string(agent.UNIT.read_text())
    assert unit["Service"]["ExecStart"] == agent.GUEST_BINARY == f"/{AGENT_BINARY}"
    assert unit["Service"]["Restart"] == "always"
    target = unit["Install"]["WantedBy"]
    wants = f"etc/systemd/system/{target}.wants/kdlab-agent.service"
    assert wants == AGENT_WANTS
    assert AGENT_UNIT == "etc/systemd/system/kdlab-agent.service"
    # kdlabd installed from a wheel (.ci/install) reads it as package data.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = project["tool"]["setuptools"]["package-data"]["kdlab"]
    assert "agent/kdlab-agent.service" in package_data


def test_root_password_emptied_and_nothing_else(
    tmp_path: Path, fake_agent: Path
) -> None:
    fake_tree(tmp_path)
    shadow = tmp_path / "etc/shadow"
    owner = shadow.stat()
    configure_tree(tmp_path, BASE, fake_agent)
    assert shadow.read_text() == (
        "root::19000:0:99999:7:::\nuser:$y$hash:19000:0:99999:7:::\n"
    )
    now = shadow.stat()
    assert stat.S_IMODE(now.st_mode) == 0o640, "shadow keeps its mode"
    assert (now.st_uid, now.st_gid) == (owner.st_uid, owner.st_gid)


def test_autologin_drop_in_resets_exec_start() -> None:
    lines = AUTOLOGIN_CONF.splitlines()
    assert lines.index("ExecStart=") < lines.index(
        "ExecStart=-/sbin/agetty --autologin root --keep-baud "
        "115200,57600,38400,9600 %I $TERM"
    )
    assert "[Service]" in lines
    assert AUTOLOGIN_DROP_IN == (
        "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
    )


def test_masked_units_cover_what_stalls_without_network() -> None:
    for unit in (
        "systemd-networkd-wait-online.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "e2scrub_reap.service",
        "systemd-firstboot.service",
    ):
        assert unit in MASKED_UNITS


def test_without_ssh_key_no_authorized_keys(tmp_path: Path, fake_agent: Path) -> None:
    fake_tree(tmp_path)
    configure_tree(tmp_path, BASE, fake_agent)
    assert not (tmp_path / "root/.ssh").exists()
    # openssh-server may come as a package: its host keys are still per VM.
    assert sorted(os.listdir(tmp_path / "etc/ssh")) == ["sshd_config"]
    assert (tmp_path / SSH_HOST_KEYS_DROP_IN).read_text() == SSH_HOST_KEYS_CONF


def test_without_openssh_no_ssh_changes(tmp_path: Path, fake_agent: Path) -> None:
    fake_tree(tmp_path)
    for name in HOST_KEYS:
        (tmp_path / "etc/ssh" / name).unlink()
    configure_tree(tmp_path, BASE, fake_agent)
    assert not (tmp_path / "etc/systemd/system/ssh.service.d").exists()
    (tmp_path / "etc/ssh/sshd_config").unlink()
    (tmp_path / "etc/ssh").rmdir()
    configure_tree(tmp_path, BASE, fake_agent)
    assert not (tmp_path / "etc/ssh").exists()


def test_configure_is_idempotent(tmp_path: Path, fake_agent: Path) -> None:
    fake_tree(tmp_path)
    spec = RootfsSpec("bookworm", ssh_key=KEY)
    configure_tree(tmp_path, spec, fake_agent)
    once = tree_listing(tmp_path)
    configure_tree(tmp_path, spec, fake_agent)
    assert tree_listing(tmp_path) == once


def test_symlink_in_tree_is_replaced_not_followed(
    tmp_path: Path, fake_agent: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "host-hostname"
    root.mkdir()
    fake_tree(root)
    outside.write_text("host\n")
    (root / "etc/hostname").unlink()
    (root / "etc/hostname").symlink_to(outside)
    (root / "etc/hosts").symlink_to("/etc/hosts")
    host_hosts = Path("/etc/hosts").read_text()
    configure_tree(root, BASE, fake_agent)
    assert outside.read_text() == "host\n"
    assert Path("/etc/hosts").read_text() == host_hosts
    assert not (root / "etc/hostname").is_symlink()
    assert (root / "etc/hostname").read_text() == "kdlab\n"


def test_symlinked_directory_is_refused(tmp_path: Path, fake_agent: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    fake_tree(root)
    (root / "etc/ssh").rename(elsewhere)
    (root / "etc/ssh").symlink_to(elsewhere)
    with pytest.raises(RootfsBuildError, match="/etc/ssh is not a directory"):
        configure_tree(root, RootfsSpec("bookworm", ssh_key=KEY), fake_agent)
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(
        ("sshd_config", *HOST_KEYS)
    ), "nothing removed through the symlink"


def test_shadow_without_root(tmp_path: Path, fake_agent: Path) -> None:
    fake_tree(tmp_path)
    (tmp_path / "etc/shadow").write_text("user:*:19000:0:99999:7:::\n")
    with pytest.raises(RootfsBuildError, match="no root entry"):
        configure_tree(tmp_path, BASE, fake_agent)


# Progress.


def recorded_lines() -> list[str]:
    return RECORDED_LOG.read_text().splitlines()


def test_progress_from_recorded_debootstrap() -> None:
    parser = DebootstrapProgress(
        rootfs.expected_packages(RootfsSpec("bookworm", ssh_key=KEY))
    )
    reports = [r for r in map(parser.feed, recorded_lines()) if r is not None]
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions), "progress never goes back"
    assert fractions[0] == 0.0
    assert reports[-1] == (1.0, "base system installed")
    statuses = [status for _, status in reports]
    assert "downloading adduser (1/125)" in statuses
    assert any(s.startswith("extracting ") for s in statuses)
    assert statuses[-2] == "configuring libc-bin (26/26)"
    # Each phase's marker lands at its share of the run.
    at = {status: fraction for fraction, status in reports}
    assert at["Unpacking required packages"] == pytest.approx(0.59)
    assert at["Configuring the base system"] == pytest.approx(0.97)
    # No big jumps: a smooth bar (largest step is the end of the download estimate).
    steps = [b - a for a, b in itertools.pairwise(fractions)]
    assert max(steps) < 0.1


def assert_report(got: tuple[float, str] | None, fraction: float, status: str) -> None:
    assert got is not None
    assert got[0] == pytest.approx(fraction)
    assert got[1] == status


def test_progress_counts_downloads_then_what_was_seen() -> None:
    parser = DebootstrapProgress(4)
    lines = [
        "I: Retrieving InRelease ",
        "I: Validating Packages ",
        "I: Retrieving a 1.0",
        "I: Validating a 1.0",
        "I: Retrieving b 1.0",
        "I: Retrieving c 1.0",
        "I: Chosen extractor for .deb packages: dpkg-deb",
        "I: Extracting a...",
        "I: Extracting b...",
        "I: Installing core packages...",
        "I: Unpacking required packages...",
        "I: Unpacking a...",
        "I: Unpacking b:amd64...",
        "I: Configuring required packages...",
        "I: Configuring b:amd64...",
        "I: Unpacking the base system...",
        "I: Unpacking c...",
        "W: Failure trying to run: chroot /x dpkg",
        "E: boom",
        "I: Configuring the base system...",
        "I: Configuring c...",
        "I: Base system installed successfully.",
    ]
    got = [parser.feed(line) for line in lines]
    assert got[1] is None, "validation lines tell nothing"
    assert got[3] is None
    assert got[17] is None, "only I: lines count"
    assert got[18] is None
    assert_report(got[2], 0.15 + 0.33 / 4, "downloading a (1/4)")
    assert_report(got[5], 0.15 + 0.33 * 3 / 4, "downloading c (3/4)")
    assert_report(got[8], 0.48 + 0.07 * 2 / 3, "extracting b (2/3)")
    assert_report(got[12], 0.74, "unpacking b:amd64 (2/2)")
    assert_report(got[14], 0.74 + 0.05 / 2, "configuring b:amd64 (1/2)")
    assert_report(got[16], 0.97, "unpacking c (1/1)")
    assert_report(got[-1], 1.0, "base system installed")


def test_progress_estimate_overrun_does_not_pass_the_phase() -> None:
    parser = DebootstrapProgress(2)
    for n in range(10):
        fraction, status = parser.feed(f"I: Retrieving p{n} 1") or (0.0, "")
        assert fraction <= 0.48
    assert status == "downloading p9 (10/10)"


def test_stages_never_go_back() -> None:
    seen: list[float] = []
    stages = rootfs._Stages(lambda f, _s: seen.append(f), [("a", 1.0), ("b", 3.0)])
    stages.report("a", 0.5, "")
    stages.report("b", 0.5, "")
    stages.replan([("a", 3.0), ("b", 1.0)])
    stages.report("a", 0.5, "")
    stages.report("b", 1.0, "")
    assert seen == [0.125, 0.625, 0.625, 1.0]


# Builds with a fake debootstrap (real tar and mke2fs).

FAKE_DEBOOTSTRAP = r"""
set -e
t="$1"
mkdir -p "$t/etc/systemd/system" "$t/root" "$t/var/lib/dbus" "$t/debootstrap"
printf 'root:x:0:0:root:/root:/bin/bash\n' > "$t/etc/passwd"
printf 'root:*:19000:0:99999:7:::\n' > "$t/etc/shadow"
chmod 640 "$t/etc/shadow"
echo vm > "$t/etc/hostname"
echo 0123456789abcdef0123456789abcdef > "$t/etc/machine-id"
head -c 300000 /dev/urandom > "$t/root/blob"
echo 'I: Retrieving InRelease '
echo 'I: Retrieving udev 252'
echo 'I: Chosen extractor for .deb packages: dpkg-deb'
echo 'I: Extracting udev...'
echo 'I: Base system installed successfully.'
"""


@dataclass
class Builds:
    """Paths and hooks of build tests: a fake debootstrap, what progress said."""

    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    scratch: Path
    cache: Path
    output: Path
    agent: Path
    reports: list[tuple[float, str]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # of every build, kept

    def fake_debootstrap(self, script: str = FAKE_DEBOOTSTRAP) -> None:
        def argv(_spec: RootfsSpec, target: Path) -> list[str]:
            return ["sh", "-c", script, "fake-debootstrap", str(target)]

        self.monkeypatch.setattr(rootfs, "debootstrap_argv", argv)

    def debootstrap_runs(self) -> int:
        """How many builds ran debootstrap (the fake can write only its tree)."""
        return self.statuses.count("debootstrap bookworm")

    def progress(self, fraction: float, status: str) -> None:
        self.reports.append((fraction, status))
        self.statuses.append(status)

    async def build(self, spec: RootfsSpec = BASE, output: Path | None = None) -> None:
        await build_rootfs(
            spec,
            self.scratch,
            self.cache,
            output or self.output,
            self.progress,
            agent_binary=self.agent,
        )

    def leftovers(self) -> list[str]:
        """Whatever a build may leave besides the image and a complete cache entry."""
        found = [str(p) for p in self.tmp.rglob("*") if ".partial" in p.name]
        found += [str(p) for p in self.cache.glob(".*")]  # partial entries
        if self.scratch.exists():
            found.append(str(self.scratch))
        return found

    def cache_entries(self) -> list[str]:
        if not self.cache.exists():
            return []
        return sorted(
            p.name for p in self.cache.iterdir() if not p.name.endswith(".lock")
        )


@pytest.fixture
def builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_agent: Path) -> Builds:
    require(os.geteuid() == 0, "root (builds run in namespaces, setpriv, unshare)")
    require_tool("mke2fs", "e2fsprogs")
    require_tool("tar", "tar")
    scripts = tmp_path / "debootstrap-scripts"
    scripts.mkdir()
    (scripts / "bookworm").touch()
    monkeypatch.setattr(rootfs, "DEBOOTSTRAP_SCRIPTS", scripts)
    out = tmp_path / "out"
    out.mkdir()
    builds = Builds(
        tmp=tmp_path,
        monkeypatch=monkeypatch,
        scratch=tmp_path / "scratch",
        cache=tmp_path / "cache",
        output=out / "image.raw",
        agent=fake_agent,
    )
    builds.fake_debootstrap()
    return builds


def debugfs_cat(image: Path, path: str) -> str:
    debugfs = require_tool("debugfs", "e2fsprogs")
    done = subprocess.run(
        [debugfs, "-R", f"cat {path}", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_build_makes_an_ext4_image_and_caches_the_pristine_tree(builds: Builds) -> None:
    spec = RootfsSpec("bookworm", size_bytes=512 * MIB, hostname="fake")
    run(builds.build(spec))

    assert builds.output.stat().st_size == 512 * MIB
    assert stat.S_IMODE(builds.output.stat().st_mode) == 0o600
    assert debugfs_cat(builds.output, "/etc/hostname") == "fake\n"
    assert debugfs_cat(builds.output, "/etc/fstab") == FSTAB
    assert debugfs_cat(builds.output, "/etc/shadow").startswith("root::19000:")
    assert debugfs_cat(builds.output, "/" + AUTOLOGIN_DROP_IN) == AUTOLOGIN_CONF
    label = subprocess.run(
        ["e2label", str(builds.output)], capture_output=True, text=True, check=True
    )
    assert label.stdout.strip() == "kdlab-root"
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(builds.output)], capture_output=True, check=False
    )
    assert fsck.returncode == 0, fsck.stdout

    assert builds.debootstrap_runs() == 1
    assert builds.leftovers() == [], "scratch_dir was made here, so it is removed"
    entry = builds.cache / f"{cache_key(spec)}.tar"
    assert builds.cache_entries() == [entry.name]
    with tarfile.open(entry) as tar:
        hostname = tar.extractfile("./etc/hostname")
        assert hostname is not None
        assert hostname.read() == b"vm\n", "the cache holds the pristine tree"

    fractions = [f for f, _ in builds.reports]
    assert fractions == sorted(fractions)
    assert builds.reports[-1] == (1.0, "built image.raw")
    statuses = [s for _, s in builds.reports]
    assert "debootstrap bookworm" in statuses
    assert "downloading udev (1/102)" in statuses
    assert "storing the base in the cache" in statuses


def test_second_build_uses_the_cache(builds: Builds) -> None:
    run(builds.build())
    assert debugfs_cat(builds.output, f"/{AGENT_BINARY}").encode() == FAKE_AGENT
    builds.fake_debootstrap("echo should not run; exit 9")
    builds.reports.clear()
    # The cache holds the base as debootstrap left it, before the configure
    # step: an image built from it gets the agent of its own build, never one
    # (or none) from when the base was cached.
    builds.agent = builds.tmp / "kdlab-agent-new"
    builds.agent.write_bytes(b"a newer agent\n")
    second = builds.output.with_name("second.raw")
    run(builds.build(RootfsSpec("bookworm", hostname="two"), second))
    assert debugfs_cat(second, "/etc/hostname") == "two\n"
    assert debugfs_cat(second, f"/{AGENT_BINARY}") == "a newer agent\n"
    statuses = [s for _, s in builds.reports]
    assert statuses[0] == "unpacking the cached bookworm base"
    assert not any("debootstrap" in s for s in statuses)
    assert builds.leftovers() == []


def test_the_agent_is_compiled_into_the_cache(tmp_path: Path) -> None:
    require_tool("cc", "gcc")
    built = run(build_agent(tmp_path / "cache"))
    assert built.parent == tmp_path / "cache" / "agent"
    assert stat.S_IMODE(built.stat().st_mode) == 0o755
    assert built.read_bytes().startswith(b"\x7fELF")
    assert run(build_agent(tmp_path / "cache")) == built, "kept, not built again"


def test_without_a_compiler_a_build_fails_first_saying_what_to_install(
    builds: Builds, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kdlabd's own build (LocalBuilder) compiles the agent first: a host
    without cc fails at once, not after a long debootstrap, with BuildFailed."""
    monkeypatch.setattr(agent, "CC", "kdlab-no-such-cc")
    build = LocalBuilder(builds.scratch, builds.cache).rootfs("img", BASE)
    with pytest.raises(BuildFailed, match="install gcc and libc6-dev") as failed:
        run(build.run(builds.progress))
    assert "exec agent" in str(failed.value)
    assert builds.reports == [], "nothing ran"
    assert not (builds.cache / "agent").exists()
    run(build.remove())
    assert list(builds.scratch.iterdir()) == [], "the ImageService's job removes it"


def test_scratch_dir_given_is_kept(builds: Builds) -> None:
    builds.scratch.mkdir()
    (builds.scratch / "mine").touch()
    run(builds.build())
    assert sorted(p.name for p in builds.scratch.iterdir()) == ["mine"]


def test_stale_cache_is_bootstrapped_again(builds: Builds) -> None:
    run(builds.build())
    (entry,) = builds.cache.glob("*.tar")
    old = time.time() - rootfs.CACHE_MAX_AGE - 60
    os.utime(entry, (old, old))
    run(builds.build())
    assert builds.debootstrap_runs() == 2
    assert entry.stat().st_mtime > old
    assert builds.leftovers() == []


def test_unreadable_cache_entry_is_replaced(builds: Builds) -> None:
    run(builds.build())
    (entry,) = builds.cache.glob("*.tar")
    entry.write_bytes(b"not a tar file" * 1000)
    run(builds.build())
    assert builds.debootstrap_runs() == 2
    assert tarfile.is_tarfile(entry)
    assert builds.leftovers() == []


def test_concurrent_builds_of_one_base_bootstrap_once(builds: Builds) -> None:
    builds.fake_debootstrap("sleep 0.5\n" + FAKE_DEBOOTSTRAP)

    async def both() -> None:
        await asyncio.gather(
            build_rootfs(
                BASE,
                builds.tmp / "s1",
                builds.cache,
                builds.tmp / "one.raw",
                builds.progress,
                agent_binary=builds.agent,
            ),
            build_rootfs(
                BASE,
                builds.tmp / "s2",
                builds.cache,
                builds.tmp / "two.raw",
                builds.progress,
                agent_binary=builds.agent,
            ),
        )

    run(both())
    assert builds.debootstrap_runs() == 1
    assert debugfs_cat(builds.tmp / "two.raw", "/etc/hostname") == "kdlab\n"
    assert not (builds.tmp / "s1").exists()
    assert not (builds.tmp / "s2").exists()


def assert_nothing_left(builds: Builds) -> None:
    assert builds.leftovers() == []
    assert not builds.output.exists()
    assert builds.cache_entries() == []


def test_tool_failure_reports_its_last_20_lines(builds: Builds) -> None:
    builds.fake_debootstrap(
        'mkdir -p "$1/etc"; for i in $(seq 1 30); do echo "line $i"; done; exit 3'
    )
    with pytest.raises(RootfsBuildError) as raised:
        run(builds.build())
    message = str(raised.value)
    assert message.startswith("debootstrap failed (exit status 3): check the suite")
    assert "http://deb.debian.org/debian" in message
    shown = [line.strip() for line in message.splitlines() if "line " in line]
    assert shown == [f"line {n}" for n in range(11, 31)]
    assert_nothing_left(builds)


def test_debootstrap_log_tail_is_added(builds: Builds) -> None:
    builds.fake_debootstrap(
        'mkdir -p "$1/debootstrap"\n'
        'seq 1 50 | sed "s/^/log /" > "$1/debootstrap/debootstrap.log"\n'
        "echo 'W: Failure trying to run: chroot dpkg'\n"
        "echo 'W: See debootstrap/debootstrap.log for details'; exit 1"
    )
    with pytest.raises(RootfsBuildError) as raised:
        run(builds.build())
    message = str(raised.value)
    assert "W: Failure trying to run: chroot dpkg" in message
    tail = message.split("The end of debootstrap.log:\n")[1].split("\n")
    assert [line.strip() for line in tail] == [f"log {n}" for n in range(31, 51)]
    assert_nothing_left(builds)


def test_missing_tool(builds: Builds) -> None:
    builds.monkeypatch.setattr(
        rootfs, "debootstrap_argv", lambda _spec, _target: ["kdlab-no-such-tool"]
    )
    with pytest.raises(RootfsBuildError, match="kdlab-no-such-tool is not installed"):
        run(builds.build())
    assert_nothing_left(builds)


def test_mke2fs_failure_removes_the_partial_image(builds: Builds) -> None:
    builds.output.write_text("the previous image")
    builds.monkeypatch.setattr(
        rootfs,
        "mke2fs_argv",
        lambda _tree, image, _size: [
            "sh",
            "-c",
            f"echo data > {image}; echo 'Could not allocate block'; exit 1",
        ],
    )
    with pytest.raises(RootfsBuildError, match=r"mke2fs failed .*size above 2048 MiB"):
        run(builds.build())
    assert builds.output.read_text() == "the previous image", "replaced only on success"
    assert builds.leftovers() == []
    assert len(builds.cache_entries()) == 1, "the base itself was fine: kept"


def test_unknown_suite_refused_before_anything(builds: Builds) -> None:
    with pytest.raises(InvalidArgument, match="knows no suite 'trixie'"):
        run(builds.build(RootfsSpec("trixie")))
    assert builds.debootstrap_runs() == 0
    assert not builds.scratch.exists()
    assert not builds.cache.exists()


def test_output_directory_must_exist(builds: Builds) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        run(builds.build(output=builds.tmp / "nowhere" / "image.raw"))
    assert not builds.scratch.exists()


def test_busy_scratch_root_is_left_alone(builds: Builds) -> None:
    (builds.scratch / "root").mkdir(parents=True)
    (builds.scratch / "root" / "theirs").touch()
    with pytest.raises(RootfsBuildError, match="root exists"):
        run(builds.build())
    assert (builds.scratch / "root" / "theirs").exists()
    assert builds.debootstrap_runs() == 0


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie waiting for a reaper counts as dead)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] not in ("Z", "X")


def slow_debootstrap(marker: str) -> str:
    """A debootstrap that waits for a child in the background, both named by
    *marker* in their command lines (their PIDs inside the build's PID
    namespace mean nothing on the host)."""
    return (
        'mkdir -p "$1/etc"\n'
        f"sleep {marker} &\n"
        "echo 'I: Retrieving InRelease '\n"
        "wait\n"
    )


@pytest.fixture
def marker() -> str:
    """A sleep time of 30 s that no other process on the host has."""
    return f"30.{os.getpid()}{time.time_ns() % 10**6:06d}"


def processes_with(marker: str) -> list[int]:
    """The host PIDs of live processes with *marker* in their command line."""
    return [int(process.split()[0]) for process in daemon.processes_with(marker)]


def started(builds: Builds) -> Callable[[], bool]:
    return lambda: any(s == "Retrieving InRelease" for _, s in builds.reports)


async def wait_for(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_cancel_kills_every_process_of_the_build_and_removes_everything(
    builds: Builds, marker: str
) -> None:
    builds.fake_debootstrap(slow_debootstrap(marker))
    builds.scratch.mkdir()

    async def cancel_midway() -> list[int]:
        task = asyncio.create_task(builds.build())
        await wait_for(started(builds))
        running = processes_with(marker)
        # setpriv-unshare, the shell (init of the PID namespace), sleep
        assert len(running) == 3, running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return running

    begun = time.monotonic()
    running = run(cancel_midway())
    assert time.monotonic() - begun < 10, "did not wait for sleep 30"
    assert not any(alive(pid) for pid in running), "shell and its child are killed"
    assert processes_with(marker) == []
    assert list(builds.scratch.iterdir()) == [], "the tree and the chroot shim"
    assert not builds.output.exists()
    assert builds.cache_entries() == []
    assert list(builds.tmp.rglob("*.partial")) == []


def test_progress_that_raises_stops_the_build(builds: Builds, marker: str) -> None:
    builds.fake_debootstrap(slow_debootstrap(marker))

    class Stop(Exception):
        pass

    seen: list[str] = []

    def progress(_fraction: float, status: str) -> None:
        seen.append(status)
        if status == "Retrieving InRelease":
            raise Stop

    scratch = builds.scratch
    scratch.mkdir()
    with pytest.raises(Stop):
        run(
            build_rootfs(
                BASE,
                scratch,
                builds.cache,
                builds.output,
                progress,
                agent_binary=builds.agent,
            )
        )
    assert processes_with(marker) == []
    assert not (scratch / "root").exists()
    assert not builds.output.exists()


def test_cancel_while_storing_leaves_no_partial_cache_entry(builds: Builds) -> None:
    real_run = rootfs._run

    async def slow_tar(argv: list[str], what: str, *args: Any, **kwargs: Any) -> None:
        if "--create" in argv:
            argv = ["sh", "-c", 'echo partial > "$1"; sleep 30', "sh", argv[2][7:]]
        await real_run(argv, what, *args, **kwargs)

    builds.monkeypatch.setattr(rootfs, "_run", slow_tar)

    async def cancel_while_storing() -> None:
        task = asyncio.create_task(builds.build())
        await wait_for(lambda: bool(list(builds.cache.glob(".*.tmp"))))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_while_storing())
    assert_nothing_left(builds)
