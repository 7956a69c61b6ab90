"""kdlab.kernel.kconfig and ``kdlabctl kernel check``: which configs boot and debug.

The real case is Debian's cloud kernel config (virtio as modules, no gdb scripts,
KASLR); the rest are synthetic configs and fake trees, so nothing here runs a
process.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from kdlab.kernel import guest, kconfig
from kdlab.kernel.findings import Severity, errors
from kdlab.kernel.kconfig import ConfigFinding
from kdlabctl import kernel
from kdlabctl.kconfig import KernelError, Location, locate
from tests.support import debian
from tests.support.prereq import require


def config_text(options: dict[str, bool]) -> str:
    return "".join(
        f"CONFIG_{name}=y\n" if on else f"# CONFIG_{name} is not set\n"
        for name, on in options.items()
    )


def passing() -> dict[str, str]:
    """A config with every option the check wants: what configure aims at."""
    return kconfig.parse(config_text(kconfig.wanted_options()))


def without(option: str, value: str | None = None) -> dict[str, str]:
    config = passing()
    config.pop(f"CONFIG_{option}")
    if value is not None:
        config[f"CONFIG_{option}"] = value
    return config


def by_option(findings: list[ConfigFinding]) -> dict[str, ConfigFinding]:
    return {f.option: f for f in findings}


@pytest.fixture(scope="module")
def debian_config() -> Path:
    try:
        return debian.cloud_kernel().config
    except debian.FixtureError as err:
        require(False, f"Debian's cloud kernel: {err}")
        raise


# parse


def test_parse_reads_values_strings_and_unset_options() -> None:
    text = (
        "#\n# Automatically generated file; DO NOT EDIT.\n#\n"
        "CONFIG_VIRTIO_BLK=m\nCONFIG_EXT4_FS=y\n"
        'CONFIG_CMDLINE="console=ttyS0 \\"quoted\\" back\\\\slash"\n'
        "CONFIG_NR_CPUS=64\nCONFIG_PHYSICAL_START=0x1000000\n"
        "# CONFIG_GDB_SCRIPTS is not set\n"
        'CONFIG_LOCALVERSION=""\n'
        "not a config line\n"
    )
    assert kconfig.parse(text) == {
        "CONFIG_VIRTIO_BLK": "m",
        "CONFIG_EXT4_FS": "y",
        "CONFIG_CMDLINE": 'console=ttyS0 "quoted" back\\slash',
        "CONFIG_NR_CPUS": "64",
        "CONFIG_PHYSICAL_START": "0x1000000",
        "CONFIG_LOCALVERSION": "",
    }


def test_parse_last_line_wins_like_kconfig() -> None:
    text = "CONFIG_A=y\nCONFIG_A=m\nCONFIG_B=y\n# CONFIG_B is not set\n"
    assert kconfig.parse(text) == {"CONFIG_A": "m"}


# check on Debian's real config


def test_debian_cloud_config(debian_config: Path) -> None:
    findings = kconfig.check(kconfig.parse(debian_config.read_text()))
    found = {(f.option, f.severity, f.code) for f in findings}
    expected = {
        ("CONFIG_GDB_SCRIPTS", Severity.ERROR, "no-gdb-scripts"),
        ("CONFIG_VIRTIO_PCI", Severity.WARNING, "module-needs-initramfs"),
        ("CONFIG_VIRTIO_BLK", Severity.WARNING, "module-needs-initramfs"),
        ("CONFIG_CONFIGFS_FS", Severity.WARNING, "fstab-filesystem"),
        ("CONFIG_ACPI_BUTTON", Severity.WARNING, "no-power-button"),
        ("CONFIG_INPUT_EVDEV", Severity.WARNING, "no-power-button"),
        # Dumps: both drivers are modules, which kdlab's initramfs loads.
        ("CONFIG_FW_CFG_SYSFS", Severity.NOTE, "dump-module"),
        ("CONFIG_PVPANIC_MMIO", Severity.NOTE, "dump-module"),
        # exec's port and shares: modules, which kdlab's initramfs loads.
        ("CONFIG_VIRTIO_CONSOLE", Severity.NOTE, "guest-module"),
        ("CONFIG_FUSE_FS", Severity.NOTE, "guest-module"),
        ("CONFIG_VIRTIO_FS", Severity.NOTE, "guest-module"),
        ("CONFIG_RANDOMIZE_BASE", Severity.NOTE, "kaslr"),
    }
    assert found == expected
    # Debian builds full DWARF, ext4 in, a serial console and initrd support.
    assert [f.option for f in errors(findings)] == ["CONFIG_GDB_SCRIPTS"]


def test_findings_come_errors_first(debian_config: Path) -> None:
    findings = kconfig.check(kconfig.parse(debian_config.read_text()))
    order = [list(Severity).index(f.severity) for f in findings]
    assert order == sorted(order)


# check on synthetic configs


def test_passing_config_has_no_findings() -> None:
    assert kconfig.check(passing()) == []


def test_empty_config_fails_with_a_fix_for_everything() -> None:
    findings = kconfig.check({})
    assert errors(findings)
    for finding in findings:
        assert finding.option.startswith("CONFIG_")
        assert finding.problem
        assert finding.fix
        assert "CONFIG_" in finding.fix or "kdlab" in finding.fix


def test_every_finding_has_a_fix(debian_config: Path) -> None:
    worst = {"CONFIG_VIRTIO_BLK": "m", "CONFIG_DEBUG_INFO_REDUCED": "y"}
    configs = [{}, worst, kconfig.parse(debian_config.read_text())]
    for config in configs:
        for finding in kconfig.check(config):
            assert finding.fix.strip(), finding


@pytest.mark.parametrize(
    ("option", "code"),
    [
        ("DEBUG_INFO", "no-debug-info"),
        ("GDB_SCRIPTS", "no-gdb-scripts"),
        ("VIRTIO_PCI", "missing-boot-driver"),
        ("VIRTIO_BLK", "missing-boot-driver"),
        ("EXT4_FS", "missing-boot-driver"),
        ("SERIAL_8250", "no-serial-console"),
        ("SERIAL_8250_CONSOLE", "no-serial-console"),
        ("DEVTMPFS", "no-devtmpfs"),
    ],
)
def test_missing_option_is_an_error(option: str, code: str) -> None:
    findings = kconfig.check(without(option))
    assert [(f.code, f.option, f.severity) for f in findings] == [
        (code, f"CONFIG_{option}", Severity.ERROR)
    ]
    assert f"CONFIG_{option}=y" in findings[0].fix


def test_reduced_debug_info_is_an_error() -> None:
    config = passing() | {"CONFIG_DEBUG_INFO_REDUCED": "y"}
    (finding,) = kconfig.check(config)
    assert (finding.code, finding.severity) == ("debug-info-reduced", Severity.ERROR)


def test_debug_info_fix_depends_on_the_kernel_version() -> None:
    # Since 5.18 DEBUG_INFO is selected by a DWARF choice whose "none" is set.
    new = kconfig.check(without("DEBUG_INFO") | {"CONFIG_DEBUG_INFO_NONE": "y"})
    old = kconfig.check(without("DEBUG_INFO"))
    assert "DWARF_TOOLCHAIN_DEFAULT=y" in by_option(new)["CONFIG_DEBUG_INFO"].fix
    assert "CONFIG_DEBUG_INFO=y" in by_option(old)["CONFIG_DEBUG_INFO"].fix


@pytest.mark.parametrize("option", kconfig.BOOT_DRIVERS)
def test_boot_driver_as_module_needs_an_initramfs(option: str) -> None:
    (finding,) = kconfig.check(without(option, "m"))
    assert finding.severity is Severity.WARNING
    assert "kdlabctl create --modules" in finding.fix
    assert f"CONFIG_{option}=y" in finding.fix


def test_module_without_initrd_support_is_an_error() -> None:
    config = without("VIRTIO_BLK", "m")
    del config["CONFIG_BLK_DEV_INITRD"]
    codes = {(f.code, f.severity) for f in kconfig.check(config)}
    assert ("no-initrd-support", Severity.ERROR) in codes


def test_module_without_gzip_initrd_is_an_error() -> None:
    config = without("VIRTIO_PCI", "m")
    del config["CONFIG_RD_GZIP"]
    assert "no-initrd-gzip" in {f.code for f in kconfig.check(config)}


def test_no_initrd_support_is_fine_when_everything_is_built_in() -> None:
    assert kconfig.check(without("BLK_DEV_INITRD")) == []


@pytest.mark.parametrize("option", kconfig.FSTAB_FILESYSTEMS)
@pytest.mark.parametrize("value", [None, "m"])
def test_fstab_filesystems_off_or_module_warn(option: str, value: str | None) -> None:
    (finding,) = kconfig.check(without(option, value))
    assert (finding.code, finding.severity) == ("fstab-filesystem", Severity.WARNING)


@pytest.mark.parametrize("option", sorted(kconfig.SYSTEMD_NEEDS))
def test_systemd_requirements_warn(option: str) -> None:
    (finding,) = kconfig.check(without(option))
    assert (finding.code, finding.severity) == ("systemd-needs", Severity.WARNING)


def test_kaslr_is_a_note() -> None:
    (finding,) = kconfig.check(passing() | {"CONFIG_RANDOMIZE_BASE": "y"})
    assert (finding.severity, finding.option) == (
        Severity.NOTE,
        "CONFIG_RANDOMIZE_BASE",
    )
    assert "nokaslr" in finding.fix


def test_gdb_scripts_not_built_after_a_build(tmp_path: Path) -> None:
    config = tmp_path / ".config"
    config.write_text(config_text(kconfig.wanted_options()))
    built = Location(config, None, tmp_path)
    assert kernel.check_config(built) == []  # nothing built yet
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    (finding,) = kernel.check_config(built)
    assert (finding.code, finding.severity) == (
        "gdb-scripts-not-built",
        Severity.WARNING,
    )
    assert str(tmp_path / "vmlinux-gdb.py") in finding.problem
    assert "make scripts_gdb" in finding.fix
    (tmp_path / "vmlinux-gdb.py").write_text("")
    assert kernel.check_config(built) == []


def test_unbuilt_gdb_scripts_without_gdb_scripts_is_only_the_missing_option(
    tmp_path: Path,
) -> None:
    config = without("GDB_SCRIPTS")
    (finding,) = kconfig.check(config, unbuilt_gdb_scripts=tmp_path / "x.py")
    assert finding.code == "no-gdb-scripts"


@pytest.mark.parametrize(
    "option", ["FW_CFG_SYSFS", "PVPANIC", "PVPANIC_MMIO", "MAGIC_SYSRQ"]
)
def test_what_a_dump_needs_warns_when_off(option: str) -> None:
    findings = by_option(kconfig.check(without(option)))
    finding = findings.pop(f"CONFIG_{option}")
    assert (finding.severity, finding.code) == (Severity.WARNING, "dump-needs")
    assert finding.fix == f"set CONFIG_{option}=y"
    assert findings == {}


@pytest.mark.parametrize(
    ("option", "module"),
    [("FW_CFG_SYSFS", "qemu_fw_cfg"), ("PVPANIC_MMIO", "pvpanic_mmio")],
)
def test_dump_driver_as_module_is_a_note_naming_kdlabs_initramfs(
    option: str, module: str
) -> None:
    (finding,) = kconfig.check(without(option, "m"))
    assert (finding.severity, finding.code) == (Severity.NOTE, "dump-module")
    assert module in finding.problem
    assert "--modules" in finding.fix


@pytest.mark.parametrize("option", ["VIRTIO_CONSOLE", "FUSE_FS", "VIRTIO_FS"])
def test_what_exec_and_shares_need_warns_when_off(option: str) -> None:
    findings = by_option(kconfig.check(without(option)))
    finding = findings.pop(f"CONFIG_{option}")
    assert (finding.severity, finding.code) == (
        Severity.WARNING,
        "guest-service-needs",
    )
    assert finding.fix == f"set CONFIG_{option}=y"
    assert findings == {}


@pytest.mark.parametrize(
    ("option", "module"),
    [("VIRTIO_CONSOLE", "virtio_console"), ("VIRTIO_FS", "virtiofs")],
)
def test_exec_and_share_drivers_as_modules_are_notes(option: str, module: str) -> None:
    (finding,) = kconfig.check(without(option, "m"))
    assert (finding.severity, finding.code) == (Severity.NOTE, "guest-module")
    assert module in finding.problem
    assert "kdlab's initramfs" in finding.fix


def test_no_vmcoreinfo_in_the_kernel_names_what_selects_it() -> None:
    (finding,) = kconfig.check(without("CRASH_CORE"))
    assert finding.option == "CONFIG_CRASH_CORE"
    assert finding.severity is Severity.WARNING
    assert "CONFIG_PROC_KCORE=y" in finding.fix
    # Linux 6.9 renamed it: VMCORE_INFO does as well.
    assert kconfig.check({**without("CRASH_CORE"), "CONFIG_VMCORE_INFO": "y"}) == []


def test_slob_is_a_note_for_crash() -> None:
    (finding,) = kconfig.check({**passing(), "CONFIG_SLOB": "y"})
    assert (finding.option, finding.severity) == ("CONFIG_SLOB", Severity.NOTE)
    assert "crash" in finding.problem
    assert finding.fix == "set CONFIG_SLUB=y"


def test_dump_modules_are_options_the_check_wants() -> None:
    assert set(guest.DUMP_DRIVERS) <= set(kconfig.wanted_options())
    assert guest.DUMP_CORE[0] in kconfig.wanted_options()


def test_exec_and_share_modules_are_options_the_check_wants() -> None:
    wanted = kconfig.wanted_options()
    assert {*guest.AGENT_DRIVERS, *guest.SHARE_DRIVERS} <= set(wanted)


def test_power_button_modules_are_options_the_check_wants() -> None:
    assert set(guest.POWER_BUTTON_DRIVERS) <= set(kconfig.POWER_BUTTON)


def test_report_shape() -> None:
    findings = kconfig.check(without("GDB_SCRIPTS") | {"CONFIG_RANDOMIZE_BASE": "y"})
    data = json.loads(kconfig.report_json(findings, Path("/k/.config")))
    assert data["ok"] is False
    assert data["config"] == "/k/.config"
    assert data["counts"] == {"error": 1, "warning": 0, "note": 1}
    assert data["findings"][0] == {
        "code": "no-gdb-scripts",
        "severity": "error",
        "option": "CONFIG_GDB_SCRIPTS",
        "problem": findings[0].problem,
        "fix": findings[0].fix,
    }


# locate


def fake_tree(path: Path) -> Path:
    (path / "scripts").mkdir(parents=True)
    for name in ("Kconfig", "Makefile", "scripts/config"):
        (path / name).write_text("")
    return path


def fake_build_dir(path: Path, tree: Path, link: bool = True) -> Path:
    path.mkdir()
    if link:
        (path / "source").symlink_to(tree)
    (path / "Makefile").write_text(
        f"# Automatically generated by {tree}/Makefile: don't edit\n"
        f"include {tree}/Makefile\n"
    )
    (path / ".config").write_text("CONFIG_EXT4_FS=y\n")
    return path


def test_locate_source_tree(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    (tree / ".config").write_text("")
    assert locate(tree) == (tree / ".config", tree, tree)


@pytest.mark.parametrize("link", [True, False], ids=["source-link", "makefile"])
def test_locate_build_directory(tmp_path: Path, link: bool) -> None:
    tree = fake_tree(tmp_path / "linux")
    build = fake_build_dir(tmp_path / "build", tree, link)
    assert locate(build) == (build / ".config", tree, build)


def test_locate_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config-6.1.0-56-cloud-amd64"
    config.write_text("CONFIG_EXT4_FS=y\n")
    assert locate(config) == (config, None, None)


def test_locate_dot_config_in_a_build_directory(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    build = fake_build_dir(tmp_path / "build", tree)
    assert locate(build / ".config") == (build / ".config", tree, build)


def test_locate_unconfigured_tree_says_what_to_run(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    with pytest.raises(KernelError, match="kdlabctl kernel configure") as err:
        locate(tree)
    assert "O=DIR" in str(err.value)


def test_locate_rejects_other_directories(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match="neither a kernel source tree"):
        locate(tmp_path)


# kdlabctl kernel: the fragment, the recipe, artifacts, check's output


def test_minimal_fragment_passes_the_check() -> None:
    assert kconfig.check(kconfig.parse(kernel.MINIMAL_FRAGMENT)) == []


def test_minimal_fragment_agrees_with_what_the_check_wants() -> None:
    fragment = kconfig.parse(kernel.MINIMAL_FRAGMENT)
    for option, on in kconfig.wanted_options().items():
        assert (fragment.get(f"CONFIG_{option}") == "y") == on, option
    assert "CONFIG_RANDOMIZE_BASE" not in fragment
    assert "# CONFIG_RANDOMIZE_BASE is not set" in kernel.MINIMAL_FRAGMENT


def test_fragment_misses_lists_options_that_did_not_stick() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# CONFIG_D is not set\n"
    configured = {"CONFIG_A": "y", "CONFIG_C": "y"}
    assert kernel.fragment_misses(configured, fragment) == ["CONFIG_B", "CONFIG_C"]


def test_recipe_in_tree(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    (tree / "kernel/configs").mkdir(parents=True)
    (tree / "kernel/configs/kvm_guest.config").write_text("")
    steps = kernel.recipe_steps(kernel.Dirs(tree, tree), keep=False)
    targets = [step[-1] for step in steps]
    assert targets[:2] == ["x86_64_defconfig", "kvm_guest.config"]
    assert targets[-1] == "olddefconfig"
    edit = steps[2]
    assert edit[:3] == [str(tree / "scripts/config"), "--file", str(tree / ".config")]
    pairs = set(zip(edit[3::2], edit[4::2], strict=True))
    assert {("-e", "GDB_SCRIPTS"), ("-d", "DEBUG_INFO_REDUCED")} <= pairs
    assert not any(arg.startswith("O=") for step in steps for arg in step)


def test_recipe_out_of_tree_on_an_old_kernel(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")  # no kvm_guest.config: before 5.10
    build = tmp_path / "build"
    steps = kernel.recipe_steps(kernel.Dirs(tree, build), keep=False)
    assert steps[1][-2:] == [f"O={build}", "kvmconfig"]
    assert steps[2][2] == str(build / ".config")


def test_recipe_keeping_the_config_only_edits_it(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    steps = kernel.recipe_steps(kernel.Dirs(tree, tree), keep=True)
    assert [step[-1] for step in steps][-1] == "olddefconfig"
    assert len(steps) == 2


@pytest.mark.parametrize(
    ("config", "targets"),
    [
        ({"CONFIG_MODULES": "y", "CONFIG_VIRTIO_BLK": "m"}, ["modules"]),
        ({"CONFIG_MODULES": "y", "CONFIG_VIRTIO_BLK": "y"}, []),
        ({"CONFIG_VIRTIO_BLK": "y"}, []),
    ],
)
def test_build_targets(config: dict[str, str], targets: list[str]) -> None:
    assert kernel.build_targets(config) == ["bzImage", "scripts_gdb", *targets]


def test_tree_artifacts(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    build = fake_build_dir(tmp_path / "build", tree)
    with pytest.raises(KernelError, match=f"kdlabctl kernel build {build}"):
        kernel.tree_artifacts(build)
    (build / "arch/x86/boot").mkdir(parents=True)
    (build / "arch/x86/boot/bzImage").write_bytes(b"")
    (build / "include/config").mkdir(parents=True)
    (build / "include/config/kernel.release").write_text("6.1.192\n")
    (build / "vmlinux").write_bytes(b"")
    assert kernel.tree_artifacts(build) == kernel.Artifacts(
        bzimage=build / "arch/x86/boot/bzImage",
        vmlinux=build / "vmlinux",
        gdb_script=None,
        release="6.1.192",
    )


def test_tree_artifacts_of_a_tree_built_elsewhere(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "linux")
    with pytest.raises(KernelError, match="O=DIR"):
        kernel.tree_artifacts(tree)


def test_progress_follows_kbuild_steps() -> None:
    progress = kernel.Progress(io.StringIO())
    for line in ["make[1]: Entering directory", "  CC      init/main.o", "x"]:
        progress.feed(line)
    assert (progress.lines, progress.last_step) == (3, "CC init/main.o")


def run_check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = kernel.main(["kernel", "check", *args])
    return status, capsys.readouterr().out


def test_check_command_json(
    capsys: pytest.CaptureFixture[str], debian_config: Path
) -> None:
    status, out = run_check(capsys, str(debian_config), "--json")
    data = json.loads(out)
    assert status == 1
    assert sorted(data) == ["config", "counts", "findings", "ok"]
    assert data["ok"] is False
    assert data["config"] == str(debian_config)
    assert data["counts"]["error"] == 1
    for finding in data["findings"]:
        assert sorted(finding) == ["code", "fix", "option", "problem", "severity"]


def test_check_command_table(
    capsys: pytest.CaptureFixture[str], debian_config: Path
) -> None:
    status, out = run_check(capsys, str(debian_config))
    lines = out.splitlines()
    assert status == 1
    assert lines[0].split() == ["SEVERITY", "OPTION", "PROBLEM"]
    assert lines[1].split()[:2] == ["error", "CONFIG_GDB_SCRIPTS"]
    assert lines[2].strip().startswith("fix: set CONFIG_GDB_SCRIPTS=y")
    assert lines[-1].endswith("1 error, 5 warnings, 6 notes: fails kdlab's check")


def test_check_command_passes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config"
    config.write_text(config_text(kconfig.wanted_options()))
    status, out = run_check(capsys, str(config), "--json")
    assert status == 0
    assert json.loads(out)["ok"] is True


def test_check_command_reports_a_bad_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert kernel.main(["kernel", "check", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("kdlabctl: ")


def test_configure_out_of_a_configured_tree_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tree = fake_tree(tmp_path / "linux")
    (tree / ".config").write_text("")
    argv = ["kernel", "configure", str(tree), "-O", str(tmp_path / "build")]
    assert kernel.main(argv) == 1
    assert "make mrproper" in capsys.readouterr().err


def test_configure_keeping_a_missing_config_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tree = fake_tree(tmp_path / "linux")
    assert kernel.main(["kernel", "configure", "--keep-config", str(tree)]) == 1
    assert "leave out --keep-config" in capsys.readouterr().err


def test_kernel_commands_need_no_daemon() -> None:
    parser = argparse.ArgumentParser()
    kernel.define(parser.add_subparsers().add_parser("kernel"))
    for verb in ("check", "configure", "build"):
        args = parser.parse_args(["kernel", verb, "PATH"])
        assert args.needs_daemon is False
