"""kdlabd.config: defaults in code, then the TOML file, then the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.errors import InvalidArgument
from kdlabd import config
from kdlabd.config import Config, from_args, load
from kdlabd.core.models import Accel


@pytest.fixture(autouse=True)
def no_host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read the host's /etc/kdlab/kdlabd.toml."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent" / "kdlabd.toml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kdlabd.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    loaded = load(None, {})
    assert loaded == Config()
    assert loaded.bus == "system"
    assert loaded.libvirt_uri == "qemu:///system"
    assert loaded.state_dir == Path("/var/lib/kdlab")
    assert loaded.runtime_dir == Path("/run/kdlab")
    assert loaded.accel is Accel.AUTO
    assert loaded.qemu_user == "libvirt-qemu"
    assert loaded.boot_pool == "kdlab-boot"
    assert loaded.log_format == "auto"
    assert loaded.reconnect_wait == 15.0
    assert loaded.vm_pool_dir == Path("/var/lib/kdlab/boot")


def test_defaults_from_empty_command_line() -> None:
    assert from_args([]) == Config()


def test_default_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", write(tmp_path, 'accel = "tcg"\n'))
    assert load(None, {}).accel is Accel.TCG


def test_file_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
# kdlabd's configuration
bus = "session"
libvirt_uri = "test:///default"
state_dir = "/srv/kdlab"
runtime_dir = "/run/kdlab-test"
accel = "kvm"
qemu_user = "qemu"
boot_pool = "boot"
log_format = "json"
""",
    )
    assert load(path, {}) == Config(
        bus="session",
        libvirt_uri="test:///default",
        state_dir=Path("/srv/kdlab"),
        runtime_dir=Path("/run/kdlab-test"),
        accel=Accel.KVM,
        qemu_user="qemu",
        boot_pool="boot",
        log_format="json",
    )
    assert load(path, {}).vm_pool_dir == Path("/srv/kdlab/boot")


@pytest.mark.parametrize("key", ["polkit_timeout", "reconnect_wait"])
def test_seconds(tmp_path: Path, key: str) -> None:
    assert getattr(load(write(tmp_path, f"{key} = 2\n"), {}), key) == 2.0
    assert getattr(load(write(tmp_path, f"{key} = 0.5\n"), {}), key) == 0.5
    for bad in ("0", "-1", "true", '"5"'):
        with pytest.raises(InvalidArgument, match=f"{key} must be a positive number"):
            load(write(tmp_path, f"{key} = {bad}\n"), {})


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, 'libvirt_uri = "qemu+ssh://box/system"\n'), {})
    assert loaded == Config(libvirt_uri="qemu+ssh://box/system")


def test_command_line_wins(tmp_path: Path) -> None:
    path = write(tmp_path, 'accel = "kvm"\nstate_dir = "/srv/kdlab"\nbus = "session"\n')
    loaded = from_args(
        [
            "--config",
            str(path),
            "--accel",
            "tcg",
            "--state-dir",
            "/tmp/k",
            "--log-format",
            "console",
        ]
    )
    assert loaded.accel is Accel.TCG
    assert loaded.state_dir == Path("/tmp/k")
    assert loaded.log_format == "console"
    assert loaded.bus == "session", (
        "values the command line does not give stay the file's"
    )


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, 'accel = "kvm"\n')
    assert load(path, {"accel": None, "bus": None}).accel is Accel.KVM


@pytest.mark.parametrize(
    "argv",
    [
        ["--bus", "unix:path=/tmp/bus"],
        ["--libvirt-uri", "test:///x.xml"],
        ["--runtime-dir", "/tmp/run"],
    ],
)
def test_each_option_maps_to_its_key(argv: list[str]) -> None:
    loaded = from_args(argv)
    key = argv[0].removeprefix("--").replace("-", "_")
    assert str(getattr(loaded, key)) == argv[1]


def test_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        load(write(tmp_path, 'libvirt-uri = "qemu:///system"\n'), {})
    message = str(err.value)
    assert "unknown configuration key 'libvirt-uri'" in message
    assert "libvirt_uri" in message, "the message lists the known keys"


def test_bad_accel(tmp_path: Path) -> None:
    with pytest.raises(
        InvalidArgument, match=r"accel must be one of auto, kvm, tcg, not 'hvf'"
    ):
        load(write(tmp_path, 'accel = "hvf"\n'), {})


def test_bad_log_format(tmp_path: Path) -> None:
    with pytest.raises(
        InvalidArgument, match="log_format must be auto, json or console"
    ):
        load(write(tmp_path, 'log_format = "xml"\n'), {})


@pytest.mark.parametrize(
    "line",
    ["state_dir = 5", "accel = true", 'bus = ["system"]', "[libvirt_uri]\nx = 1"],
)
def test_values_must_be_strings(tmp_path: Path, line: str) -> None:
    key = line.split(maxsplit=1)[0].strip("[]")
    with pytest.raises(InvalidArgument, match=f"'{key}' must be a string"):
        load(write(tmp_path, line + "\n"), {})


def test_missing_explicit_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(
        InvalidArgument, match=f"configuration file {missing} does not exist"
    ):
        load(missing, {})


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, 'accel = "tcg"\nbus = \n')
    with pytest.raises(InvalidArgument) as err:
        load(path, {})
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert "line 2" in message


def test_config_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=str(tmp_path)):
        load(tmp_path, {})


def test_kdlabd_reports_bad_config_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdlabd import daemon

    assert daemon.main(["--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdlabd: configuration file")
    assert "Traceback" not in err
