"""The rules of recordings that need no QEMU: refusals, sidecars, the live XML."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from lxml import etree

from kdlab import wire
from kdlab.errors import HypervisorError, NotRecordable
from kdlab.states import VMState
from kdlabd.core.limits import GIB, Limits
from kdlabd.core.models import (
    Accel,
    Backing,
    BootMark,
    Disk,
    ImageFormat,
    Run,
    RunFiles,
    Share,
    VMRecord,
    VMSpec,
)
from kdlabd.core.recordings import (
    RecordingRecord,
    RecordingService,
    auto_snapshots,
    check_recordable,
    from_sidecar,
    sidecar,
)
from kdlabd.virt.domain_xml import build_domain_xml, parse_boot_mark, parse_domain_xml
from tests.unit.fake_hypervisor import FakeHypervisor
from tests.unit.test_checkpoints import FakePoolHost
from tests.unit.test_vms import new_lab

SPEC = VMSpec(
    name="rr",
    owner_uid=1000,
    kernel=Path("/boot/rr.kernel"),
    initrd=None,
    cmdline="",
    memory_mib=256,
    vcpus=1,
    accel=Accel.TCG,
    console_log=Path("/vms/rr/console.log"),
    gdb_socket=Path("/run/gdb/rr.sock"),
)


def vm(**changes: object) -> VMRecord:
    return VMRecord(SPEC.replace(**changes), "u-u-i-d", VMState.STOPPED)


def test_what_qemu_cannot_record_is_refused_by_name() -> None:
    check_recordable(vm(), single_cpu=False)
    with pytest.raises(NotRecordable, match="KVM"):
        check_recordable(vm(accel=Accel.KVM), single_cpu=False)
    with pytest.raises(NotRecordable, match="--single-cpu"):
        check_recordable(vm(vcpus=2), single_cpu=False)
    check_recordable(vm(vcpus=2), single_cpu=True)
    disk = Disk(Path("/vms/rr/vda.qcow2"), "vda")
    check_recordable(vm(disks=(disk,)), single_cpu=False)
    legacy = Disk(Path("/vms/rr/vda.qcow2"), "vda", base_image="debian")
    with pytest.raises(NotRecordable, match="recreate the VM"):
        check_recordable(vm(disks=(legacy,)), single_cpu=False)
    share = Share("src", "/home/dev/src", Path("/run/shares/rr/0.sock"))
    with pytest.raises(NotRecordable, match="has shares \\(src\\)"):
        check_recordable(vm(shares=(share,)), single_cpu=False)


def test_a_sidecar_reads_back_and_a_torn_one_is_nothing() -> None:
    record = RecordingRecord(
        id="rr-1", vm="rr", vm_uuid="u", owner_uid=1000, kernel_release="6.1",
        cmdline="console=ttyS0", qemu="QEMU 7.2.0", fingerprint=(("kernel", "ab"),),
        created_usec=5, instructions=9, seconds=1.5, ended=wire.RECORDING_ENDED_PANIC,
        state=wire.RECORDING_STATE_COMPLETE,
    )  # fmt: skip
    text = sidecar(record)
    assert from_sidecar(text, 77) == RecordingRecord(**{**record.__dict__, "size": 77})
    assert from_sidecar(text[:-3], 77) is None
    assert from_sidecar(text.replace(b'"rr-1"', b'"../x"'), 1) is None


def test_only_kdlabs_own_snapshots_are_dropped_before_a_replay() -> None:
    info = """List of snapshots present on all disks:
ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT
--        kdlab-start       884 KiB 2026-12-06 11:52:32 00:00:00.000          0
--        kdlab-auto-1      1.2 MiB 2026-12-06 11:52:33 00:00:01.000   10000000
--        kdlab-auto-12     1.2 MiB 2026-12-06 11:52:34 00:00:02.000   20000000
--        mine              1.2 MiB 2026-12-06 11:52:34 00:00:02.000   20000000
"""
    assert auto_snapshots(info) == ["kdlab-auto-1", "kdlab-auto-12"]


def test_the_live_definition_of_a_recording_boot() -> None:
    run = Run(wire.RUN_RECORD, "rr-1")
    files = RunFiles(Path("/rec/rr-1.rr"), Path("/rec/rr-1.state"))
    xml = build_domain_xml(SPEC, "u-u-i-d", run=(run, files), mark=BootMark(7, run=run))
    root = etree.fromstring(xml.encode())
    args = [a.get("value") for a in root.iter("{*}arg")]
    assert "shift=auto,rr=record,rrfile=/rec/rr-1.rr,rrsnapshot=kdlab-start" in args
    assert "file=/rec/rr-1.state,if=none,id=kdlab-rr-state,format=qcow2" in args
    assert args[args.index("-serial") + 1] == "chardev:charserial0"
    assert "apic.vapic=off" in args
    assert root.findtext("uuid") == "u-u-i-d"
    assert parse_boot_mark(xml) == BootMark(7, run=run)
    assert parse_domain_xml(xml) == SPEC
    # No exec channel in a run: a replay with one diverges.
    agent = SPEC.replace(agent_socket=Path("/run/kdlab/gdb/rr.agent"))
    assert (
        etree.fromstring(build_domain_xml(agent).encode()).find("devices/channel")
        is not None
    )
    live = build_domain_xml(agent, "u-u-i-d", run=(run, files))
    assert etree.fromstring(live.encode()).find("devices/channel") is None
    # A disk: blkreplay on the recording's overlay of libvirt's node, the
    # guest device moved onto it.
    base = Backing(Path("/images/debian"), ImageFormat.RAW)
    disks = (
        Disk(Path("/vms/rr.vda.qcow2"), "vda", "debian", base),
        Disk(Path("/vms/rr.vdb.qcow2"), "vdb"),
    )
    overlays = (
        ("vda", Path("/rec/rr-1.vda.qcow2")),
        ("vdb", Path("/rec/rr-1.vdb.qcow2")),
    )
    with_disks = build_domain_xml(
        SPEC.replace(disks=disks),
        "u",
        run=(run, RunFiles(files.log, files.state, overlays)),
    )
    root = etree.fromstring(with_disks.encode())
    args = [a.get("value") or "" for a in root.iter("{*}arg")]
    blockdevs = [
        json.loads(args[i + 1]) for i, a in enumerate(args) if a == "-blockdev"
    ]
    tops = {
        b["node-name"]: b.get("backing") for b in blockdevs if b["driver"] == "qcow2"
    }
    assert tops == {
        "kdlab-rr-vda-top": "libvirt-1-format",
        "kdlab-rr-vdb-top": "libvirt-3-format",
    }
    drives = {
        d.get("alias"): d.find("{*}frontend/{*}property[@name='drive']").get("value")
        for d in root.iter("{*}device")
        if d.get("alias", "").startswith("virtio-disk")
    }
    assert drives == {"virtio-disk0": "kdlab-rr-vda", "virtio-disk1": "kdlab-rr-vdb"}
    plain = build_domain_xml(SPEC, "u-u-i-d")
    assert "-icount" not in plain
    assert "override" not in plain


@pytest.mark.parametrize("full", ["owner", "pool"])
def test_a_recording_that_fills_the_owners_limit_stops_and_is_truncated(
    tmp_path: Path, full: str
) -> None:
    """The run is followed: past max_disk_gib the VM is stopped, and the
    recording ends "limit", truncated, complete (it replays up to there)."""
    hv = FakeHypervisor(recording_dir=tmp_path / "recordings")
    hv.recording_dir.mkdir()
    host = FakePoolHost(hv)
    lab = new_lab(tmp_path, hv, host, Limits(disk_gib=1))
    recordings = RecordingService(
        hv, host=host, vms=lab.service, limits=Limits(disk_gib=1), poll_seconds=0.01
    )

    async def scenario() -> None:
        await lab.create(name="vm1")
        record = await recordings.record("vm1", recording="big")
        assert recordings.get("big").state == wire.RECORDING_STATE_RECORDING
        assert lab.service.get("vm1").boot.run == Run(wire.RUN_RECORD, "big")
        hv.icount = 12345
        if full == "owner":
            # QEMU's log grows past the owner's GiB (a sparse file: no space used).
            with (hv.recording_dir / "big.rr").open("r+b") as log:
                log.truncate(GIB + 1)
        else:  # the pool's filesystem fills (other files, other users)
            hv.recording_free = 1 << 20
        for _ in range(500):
            await asyncio.sleep(0.01)
            if recordings.get("big").state == wire.RECORDING_STATE_COMPLETE:
                break
        done = recordings.get("big")
        assert (done.ended, done.truncated, done.state) == (
            wire.RECORDING_ENDED_LIMIT,
            True,
            wire.RECORDING_STATE_COMPLETE,
        )
        assert done.instructions == 12345
        assert not lab.service.get("vm1").state.active
        assert record.id == "big"
        # The sidecar says so too: a restarted kdlabd finds it complete.
        again = RecordingService(hv, host=host, vms=lab.service)
        await again.load()
        assert again.get("big").truncated
        await recordings.close()

    asyncio.run(scenario())


def test_a_recording_that_does_not_start_leaves_nothing(tmp_path: Path) -> None:
    hv = FakeHypervisor(recording_dir=tmp_path / "recordings")
    hv.recording_dir.mkdir()
    host = FakePoolHost(hv)
    lab = new_lab(tmp_path, hv, host)
    recordings = RecordingService(hv, host=host, vms=lab.service)

    async def scenario() -> None:
        await lab.create(name="vm1")
        # Failing after its files were made: before and when QEMU starts.
        for step in ("emulator", "start_vm"):
            hv.failures[step] = HypervisorError(f"{step} failed")
            with pytest.raises(HypervisorError):
                await recordings.record("vm1", recording="failed")
            assert list(hv.recording_dir.iterdir()) == []
            assert recordings.list() == []
            del hv.failures[step]
        # The name is free again.
        assert (await recordings.record("vm1", recording="failed")).id == "failed"
        await recordings.close()

    asyncio.run(scenario())
