"""The domain XML builder: golden files, libvirt's own RelaxNG schema, round trips.

Golden files live in tests/golden/domain-*.xml. After an intended change of the XML,
regenerate them and review the diff::

    KDLAB_REGENERATE_GOLDEN=1 /tmp/v/bin/python -m pytest tests/unit

(virt-manager's tests/utils.py works the same way.) A missing golden file is a
failure, not a silent rewrite, so deleting one cannot make the suite pass.
"""

from __future__ import annotations

import difflib
import functools
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from kdlab import wire
from kdlabd.core import validate
from kdlabd.core.models import Accel, DebugSettings, Share, VMSpec
from kdlabd.virt.domain_xml import (
    GDB_CHARDEV_ID,
    KDLAB_NS,
    QEMU_NS,
    NotKdlabDomain,
    build_domain_xml,
    domain_name,
    parse_domain_xml,
    qemu_option_value,
)
from tests.support import REPO
from tests.support.prereq import require

GOLDEN_DIR = REPO / "tests" / "golden"
REGENERATE = os.environ.get("KDLAB_REGENERATE_GOLDEN", "") == "1"
DOMAIN_RNG = Path("/usr/share/libvirt/schemas/domain.rng")
Q = f"{{{QEMU_NS}}}"

STATE = Path("/var/lib/kdlab")
RUNTIME = Path("/run/kdlab")

# Hypothesis examples must not leave a database in the repository.
PROPERTIES = settings(
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)


def make_spec(name: str = "vm1", **changes: object) -> VMSpec:
    """A spec as VMService would make it for *name*, with *changes* applied."""
    spec = VMSpec(
        name=name,
        owner_uid=1000,
        kernel=STATE / "boot" / f"{name}.kernel",
        initrd=None,
        cmdline="root=/dev/vda rw",
        memory_mib=512,
        vcpus=1,
        accel=Accel.TCG,
        console_log=STATE / "vms" / name / "console.log",
        gdb_socket=RUNTIME / "gdb" / f"{name}.sock",
        debug=DebugSettings(),
        created_usec=1_700_000_000_123_456,
    )
    return spec.replace(**changes)


GOLDEN_SPECS: dict[str, VMSpec] = {
    "tcg-gdb-unix": make_spec(),
    "kvm-initrd": make_spec(
        "linux-6.9-rc1",
        initrd=STATE / "boot" / "linux-6.9-rc1.initrd",
        accel=Accel.KVM,
        memory_mib=2048,
        vcpus=4,
        cmdline="rdinit=/init quiet",
    ),
    "gdb-tcp": make_spec("tcp-stub", debug=DebugSettings(gdb_tcp_port=1234)),
    "gdb-off": make_spec(
        "no-gdb", debug=DebugSettings(gdb=False), cmdline="root=/dev/vda console=hvc0"
    ),
    "shares": make_spec(
        "shared",
        shares=(
            Share("linux", "/home/dev/linux", RUNTIME / "shares" / "shared" / "0.sock"),
            Share("t.1", '/home/dev/a "<&>"', RUNTIME / "shares" / "shared" / "1.sock"),
        ),
    ),
    "escaping": make_spec(
        "esc",
        cmdline="root=/dev/vda dyndbg=\"file <a>.c +p\" x=&y q='1' a>b",
        gdb_socket=Path('/run/kdlab,lab/gdb/"e&s<c>",sock'),
        owner_uid=0,
        created_usec=0,
    ),
}


@functools.cache
def _schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(DOMAIN_RNG)))


def domain_schema() -> etree.RelaxNG:
    """libvirt's own domain schema, or a skip (in CI a failure) naming the package."""
    require(
        DOMAIN_RNG.is_file(),
        f"libvirt's domain schema {DOMAIN_RNG} (apt-get install libvirt0)",
    )
    return _schema()


def assert_schema_valid(xml: str) -> None:
    schema = domain_schema()
    if not schema.validate(etree.fromstring(xml.encode())):
        errors = "\n".join(str(e) for e in schema.error_log)
        pytest.fail(f"domain XML fails libvirt's domain.rng:\n{errors}\n{xml}")


def assert_golden(name: str, actual: str) -> None:
    golden = GOLDEN_DIR / f"domain-{name}.xml"
    if REGENERATE:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(actual)
    if not golden.exists():
        pytest.fail(
            f"{golden} is missing: run with KDLAB_REGENERATE_GOLDEN=1 and review it"
        )
    expected = golden.read_text()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                str(golden),
                "generated",
            )
        )
        pytest.fail(
            f"generated XML differs from {golden.name} "
            f"(KDLAB_REGENERATE_GOLDEN=1 after review):\n{diff}"
        )


def qemu_options(value: str) -> dict[str, str]:
    """Parse QEMU's ``key=value,...`` syntax the way QEMU does: ',,' is a comma."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(value):
        if value.startswith(",,", i):
            current += ","
            i += 2
        elif value[i] == ",":
            parts.append(current)
            current = ""
            i += 1
        else:
            current += value[i]
            i += 1
    parts.append(current)
    options = {}
    for part in parts:
        key, sep, val = part.partition("=")
        options[key] = val if sep else ""
    return options


def qemu_args(root: etree._Element) -> list[str]:
    return [arg.get("value") for arg in root.iterfind(f"{Q}commandline/{Q}arg")]


def gdb_chardev(spec: VMSpec) -> dict[str, str] | None:
    """The gdbstub's -chardev options in the XML of *spec*, None when there is none."""
    args = qemu_args(etree.fromstring(build_domain_xml(spec).encode()))
    if not args:
        return None
    assert args[0] == "-chardev"
    assert args[2:] == ["-gdb", f"chardev:{GDB_CHARDEV_ID}"]
    assert len(args) == 4
    return qemu_options(args[1])


def boot_words(spec: VMSpec) -> list[str]:
    root = etree.fromstring(build_domain_xml(spec).encode())
    text = root.findtext("os/cmdline")
    assert text is not None
    return text.split()


# Golden files and the schema.


@pytest.mark.parametrize("case", sorted(GOLDEN_SPECS))
def test_golden(case: str) -> None:
    assert_golden(case, build_domain_xml(GOLDEN_SPECS[case]))


@pytest.mark.parametrize("case", sorted(GOLDEN_SPECS))
def test_schema_valid(case: str) -> None:
    assert_schema_valid(build_domain_xml(GOLDEN_SPECS[case]))


@pytest.mark.parametrize("case", sorted(GOLDEN_SPECS))
def test_round_trip(case: str) -> None:
    spec = GOLDEN_SPECS[case]
    assert parse_domain_xml(build_domain_xml(spec)) == spec


def test_every_golden_file_has_a_case() -> None:
    """A golden file whose case was removed would otherwise linger unchecked."""
    files = {p.name for p in GOLDEN_DIR.glob("domain-*.xml")}
    assert files == {f"domain-{case}.xml" for case in GOLDEN_SPECS}


def test_schema_rejects_a_broken_domain() -> None:
    """The schema check can fail: a device libvirt does not know is refused."""
    xml = build_domain_xml(make_spec())
    broken = xml.replace('<memballoon model="none"/>', '<memballoon model="bogus"/>')
    assert broken != xml
    assert not domain_schema().validate(etree.fromstring(broken.encode()))


# What the XML must say.


def test_name_title_and_prefix() -> None:
    root = etree.fromstring(build_domain_xml(make_spec("linux-6.9-rc1")).encode())
    assert (
        root.findtext("name") == "kdlab-linux-6.9-rc1" == domain_name("linux-6.9-rc1")
    )
    assert root.findtext(f"metadata/{{{KDLAB_NS}}}vm/{{{KDLAB_NS}}}name") == (
        "linux-6.9-rc1"
    )


def test_a_redefinition_keeps_the_domains_uuid() -> None:
    """libvirt refuses to redefine a name with another UUID (a kernel with a new
    release at start redefines the VM)."""
    uuid = "2f1b8a1e-5c1e-4d8e-9a56-1f0e5b1c2d3e"
    xml = build_domain_xml(make_spec(), uuid)
    assert_schema_valid(xml)
    assert etree.fromstring(xml.encode()).findtext("uuid") == uuid
    assert etree.fromstring(build_domain_xml(make_spec()).encode()).find("uuid") is None


@pytest.mark.parametrize(
    ("accel", "domain_type", "cpu_mode"),
    [(Accel.KVM, "kvm", "host-passthrough"), (Accel.TCG, "qemu", None)],
)
def test_accel(accel: Accel, domain_type: str, cpu_mode: str | None) -> None:
    root = etree.fromstring(build_domain_xml(make_spec(accel=accel)).encode())
    assert root.get("type") == domain_type
    cpu = root.find("cpu")
    assert (None if cpu is None else cpu.get("mode")) == cpu_mode


@pytest.mark.parametrize("initrd", [None, STATE / "boot" / "vm1.initrd"])
def test_direct_kernel_boot(initrd: Path | None) -> None:
    spec = make_spec(initrd=initrd)
    root = etree.fromstring(build_domain_xml(spec).encode())
    assert root.findtext("os/kernel") == str(spec.kernel)
    assert root.findtext("os/initrd") == (None if initrd is None else str(initrd))
    assert root.find("os/boot") is None


def test_devices_are_trimmed() -> None:
    root = etree.fromstring(build_domain_xml(make_spec()).encode())
    devices = root.find("devices")
    assert devices is not None
    assert sorted(child.tag for child in devices) == [
        "console",
        "controller",
        "memballoon",
        "panic",
        "serial",
    ]
    for absent in ("graphics", "video", "sound", "input", "interface", "disk"):
        assert devices.find(absent) is None, f"unexpected <{absent}>"
    controllers = devices.findall("controller")
    assert [(c.get("type"), c.get("model")) for c in controllers] == [("usb", "none")]
    assert devices.find("memballoon").get("model") == "none"
    # ISA pvpanic: Debian 12's libvirt (9.0) has no PCI model="pvpanic" yet.
    assert devices.find("panic").get("model") == "isa"


def test_console_log_is_the_first_serial_port() -> None:
    spec = make_spec()
    root = etree.fromstring(build_domain_xml(spec).encode())
    log = root.find("devices/serial/log")
    assert log is not None
    assert log.get("file") == str(spec.console_log)
    assert log.get("append") == "off"
    assert root.find("devices/serial/target").get("port") == "0"


def test_xml_escaping_of_cmdline() -> None:
    spec = GOLDEN_SPECS["escaping"]
    xml = build_domain_xml(spec)
    assert "&amp;" in xml
    assert "&lt;a&gt;" in xml
    assert "<a>" not in xml
    # The socket path is in an attribute: quotes are escaped there too.
    assert "path=/run/kdlab,,lab/gdb/&quot;e&amp;s&lt;c&gt;&quot;,,sock," in xml
    root = etree.fromstring(xml.encode())
    assert root.findtext("os/cmdline") == spec.effective_cmdline
    assert root.findtext(f"metadata/{{{KDLAB_NS}}}vm/{{{KDLAB_NS}}}cmdline") == (
        spec.cmdline
    )


def test_qemu_comma_escaping_of_socket_path() -> None:
    spec = GOLDEN_SPECS["escaping"]
    assert "," in str(spec.gdb_socket)
    chardev = gdb_chardev(spec)
    assert chardev is not None
    assert chardev["path"] == str(spec.gdb_socket)
    assert chardev["id"] == GDB_CHARDEV_ID
    assert (chardev["server"], chardev["wait"]) == ("on", "off")


@given(st.text(alphabet=string.printable, max_size=60))
@PROPERTIES
def test_qemu_option_value_round_trips(value: str) -> None:
    assert qemu_options(f"path={qemu_option_value(value)},x=y") == {
        "path": value,
        "x": "y",
    }


# Command line properties.


@pytest.mark.parametrize(
    ("cmdline", "gdb", "nokaslr_count"),
    [
        ("root=/dev/vda", True, 1),
        ("root=/dev/vda", False, 0),
        ("root=/dev/vda kaslr", True, 0),
        ("root=/dev/vda nokaslr", True, 1),
        ("nokaslr", False, 1),
        ("kaslrseed=1", True, 1),
        ("", True, 1),
    ],
)
def test_nokaslr(cmdline: str, gdb: bool, nokaslr_count: int) -> None:
    words = boot_words(make_spec(cmdline=cmdline, debug=DebugSettings(gdb=gdb)))
    assert words.count("nokaslr") == nokaslr_count
    assert words[: len(cmdline.split())] == cmdline.split(), "user's words come first"


@pytest.mark.parametrize(
    ("cmdline", "consoles"),
    [
        ("root=/dev/vda", ["console=ttyS0"]),
        ("", ["console=ttyS0"]),
        ("console=hvc0", ["console=hvc0"]),
        ("console=ttyS1,115200n8 quiet", ["console=ttyS1,115200n8"]),
        ("console=tty0 console=ttyS0", ["console=tty0", "console=ttyS0"]),
        ("earlycon=uart8250,io,0x3f8", ["console=ttyS0"]),
    ],
)
def test_serial_console(cmdline: str, consoles: list[str]) -> None:
    words = boot_words(make_spec(cmdline=cmdline))
    assert [w for w in words if w.startswith("console=")] == consoles


def test_additions_go_before_init_arguments() -> None:
    words = boot_words(make_spec(cmdline="root=/dev/vda -- single"))
    kernel_words = words[: words.index("--")]
    assert "console=ttyS0" in kernel_words
    assert "nokaslr" in kernel_words
    assert words[words.index("--") :] == ["--", "single"]


def test_a_vm_with_shares_has_shared_memory_and_a_virtiofs_device_each() -> None:
    spec = GOLDEN_SPECS["shares"]
    root = etree.fromstring(build_domain_xml(spec).encode())
    # vhost-user: the owner's virtiofsd maps the guest's memory.
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    devices = [
        (
            fs.get("type"),
            fs.find("driver").get("type"),
            fs.find("source").get("socket"),
            fs.find("target").get("dir"),
        )
        for fs in root.iterfind("devices/filesystem")
    ]
    assert devices == [
        ("mount", "virtiofs", str(share.socket), share.tag) for share in spec.shares
    ]
    # libvirt starts no virtiofsd of its own (no <binary>), and kdlabd's
    # metadata, not the device, knows the owner's directory.
    assert root.find("devices/filesystem/binary") is None
    assert "/home/dev/linux" not in etree.tostring(root.find("devices")).decode()
    assert boot_words(spec)[-1] == "kdlab.shares=linux,t.1"


def test_a_vm_without_shares_has_private_memory_and_no_share_parameter() -> None:
    root = etree.fromstring(build_domain_xml(make_spec()).encode())
    assert root.find("memoryBacking") is None
    assert root.find("devices/filesystem") is None
    assert not any(w.startswith("kdlab.shares") for w in boot_words(make_spec()))


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("quiet", "quiet console=ttyS0 nokaslr kdlab.shares=a,b"),
        ("kdlab.shares=a quiet", "kdlab.shares=a quiet console=ttyS0 nokaslr"),
        ("quiet -- x", "quiet console=ttyS0 nokaslr kdlab.shares=a,b -- x"),
    ],
)
def test_shares_are_on_the_command_line_unless_the_user_chose(
    cmdline: str, expected: str
) -> None:
    sockets = [RUNTIME / "shares" / "vm1" / f"{i}.sock" for i in range(2)]
    spec = make_spec(
        cmdline=cmdline,
        shares=(Share("a", "/a", sockets[0]), Share("b", "/b", sockets[1])),
    )
    assert spec.effective_cmdline == expected


def test_no_tcp_listener_by_default() -> None:
    chardev = gdb_chardev(make_spec())
    assert chardev is not None
    assert "host" not in chardev
    assert "port" not in chardev
    assert chardev["path"] == str(make_spec().gdb_socket)
    assert "tcp" not in build_domain_xml(make_spec())


def test_tcp_listener_on_loopback_only() -> None:
    chardev = gdb_chardev(make_spec(debug=DebugSettings(gdb_tcp_port=4321)))
    assert chardev is not None
    assert chardev["host"] == "127.0.0.1"
    assert chardev["port"] == "4321"
    assert "path" not in chardev


def test_gdb_off_has_no_qemu_commandline() -> None:
    xml = build_domain_xml(make_spec(debug=DebugSettings(gdb=False, gdb_tcp_port=1234)))
    root = etree.fromstring(xml.encode())
    assert root.find(f"{Q}commandline") is None
    assert "-gdb" not in xml


# Reading back what libvirt returns.


def test_parse_libvirt_normalized_memory() -> None:
    """libvirt reports memory in KiB whatever the defined unit was."""
    xml = build_domain_xml(make_spec(memory_mib=1536))
    normalized = xml.replace(
        '<memory unit="MiB">1536</memory>', "<memory>1572864</memory>"
    )
    assert normalized != xml
    assert parse_domain_xml(normalized).memory_mib == 1536
    gib = xml.replace(
        '<memory unit="MiB">1536</memory>', '<memory unit="GiB">2</memory>'
    )
    assert parse_domain_xml(gib).memory_mib == 2048


def test_parse_refuses_foreign_domain() -> None:
    with pytest.raises(NotKdlabDomain):
        parse_domain_xml(
            "<domain type='kvm'><name>other</name><memory>1024</memory></domain>"
        )


# Properties for any valid input.

NAME_FIRST = string.ascii_letters + string.digits
NAME_REST = NAME_FIRST + "._-"
names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(NAME_FIRST),
    st.text(alphabet=NAME_REST, max_size=validate.NAME_MAX - 1),
)
PRINTABLE_ASCII = "".join(chr(c) for c in range(0x20, 0x7F))
cmdlines = st.one_of(
    st.text(alphabet=PRINTABLE_ASCII, max_size=200),
    st.text(
        alphabet=PRINTABLE_ASCII,
        min_size=validate.CMDLINE_MAX - 10,
        max_size=validate.CMDLINE_MAX,
    ),
    st.lists(
        st.sampled_from(
            [
                "kaslr",
                "nokaslr",
                "console=hvc0",
                "root=/dev/vda",
                "quiet",
                'a="b c"',
                "x=<&>",
                "--",
                "init=/bin/sh",
            ]
        ),
        max_size=6,
    ).map(" ".join),
)
paths = st.text(
    alphabet=string.ascii_letters + string.digits + ",._- ", min_size=1, max_size=40
).map(lambda s: Path("/run") / s / "gdb.sock")


share_tags = st.from_regex(wire.SHARE_TAG, fullmatch=True).filter(
    lambda tag: tag not in (".", "..")
)
# Any printable characters (not only ASCII): a user's directory may have them.
directories = st.text(
    st.characters(
        blacklist_categories=("Cc", "Cf", "Cs", "Cn", "Co", "Zl", "Zp", "Zs"),
        whitelist_characters=" ",
    ),
    max_size=30,
).map(lambda s: "/" + s)


@st.composite
def share_sets(draw: st.DrawFn, name: str) -> tuple[Share, ...]:
    chosen = draw(st.dictionaries(share_tags, directories, max_size=wire.SHARES_MAX))
    pairs = validate.shares(chosen)  # the strategy stays inside what is accepted
    return tuple(
        Share(tag, directory, RUNTIME / "shares" / name / f"{i}.sock")
        for i, (tag, directory) in enumerate(pairs)
    )


@st.composite
def specs(draw: st.DrawFn) -> VMSpec:
    name = draw(names)
    port = draw(st.none() | st.integers(*validate.TCP_PORT_RANGE))
    return make_spec(
        name,
        owner_uid=draw(st.integers(0, 2**32 - 2)),
        initrd=draw(st.none() | st.just(STATE / "boot" / f"{name}.initrd")),
        cmdline=draw(cmdlines),
        memory_mib=draw(st.integers(*validate.MEMORY_MIB_RANGE)),
        vcpus=draw(st.integers(*validate.VCPUS_RANGE)),
        accel=draw(st.sampled_from([Accel.KVM, Accel.TCG])),
        gdb_socket=draw(paths),
        debug=DebugSettings(gdb=draw(st.booleans()), gdb_tcp_port=port),
        created_usec=draw(st.integers(0, 2**63 - 1)),
        shares=draw(share_sets(name)),
    )


@given(specs())
@PROPERTIES
def test_any_valid_spec_is_schema_valid_and_round_trips(spec: VMSpec) -> None:
    # The strategies must stay inside what the validators accept.
    assert validate.name(spec.name) == spec.name
    assert validate.cmdline(spec.cmdline) == spec.cmdline
    xml = build_domain_xml(spec)
    assert_schema_valid(xml)
    assert parse_domain_xml(xml) == spec


@given(specs())
@PROPERTIES
def test_any_spec_debug_properties(spec: VMSpec) -> None:
    user = spec.cmdline.split()
    words = boot_words(spec)
    # Only the words before "--" are the kernel's; the rest go to init.
    kernel_words = user[: user.index("--")] if "--" in user else user
    user_kaslr = any(
        w in ("kaslr", "nokaslr") or w.startswith(("kaslr=", "nokaslr="))
        for w in kernel_words
    )
    added_nokaslr = words.count("nokaslr") - user.count("nokaslr")
    assert added_nokaslr == (1 if spec.debug.gdb and not user_kaslr else 0)
    user_console = any(w.startswith("console=") for w in kernel_words)
    added_console = words.count("console=ttyS0") - user.count("console=ttyS0")
    assert added_console == (0 if user_console else 1)

    chardev = gdb_chardev(spec)
    if not spec.debug.gdb:
        assert chardev is None
    elif spec.debug.gdb_tcp_port is None:
        assert chardev is not None
        assert chardev["path"] == str(spec.gdb_socket)
        assert "host" not in chardev
        assert "port" not in chardev
    else:
        assert chardev is not None
        assert chardev["host"] == "127.0.0.1"
        assert chardev["port"] == str(spec.debug.gdb_tcp_port)
        assert "path" not in chardev
