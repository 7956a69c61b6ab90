"""kdlabd.bus.properties: only the properties that changed are announced, at once."""

from __future__ import annotations

from typing import Any

from dbus_next.service import ServiceInterface

from kdlabd.bus.properties import announce_changes


class Recorder(ServiceInterface):
    """An interface that keeps what it would emit instead of emitting it."""

    def __init__(self) -> None:
        super().__init__("org.kdlab.Kdlab1.Test")
        self.emitted: list[dict[str, Any]] = []

    def emit_properties_changed(
        self, changed_properties: dict[str, Any], invalidated_properties: Any = None
    ) -> None:
        assert invalidated_properties is None
        self.emitted.append(changed_properties)


def test_only_the_changed_values_go_out_in_one_signal() -> None:
    interface = Recorder()
    old = {"State": "running", "Diagnosis": ["", "", "", ""], "VCPUs": 2}
    new = {"State": "crashed", "Diagnosis": ["panic", "error", "a", "b"], "VCPUs": 2}
    assert announce_changes(interface, old, new) is new
    assert interface.emitted == [
        {"State": "crashed", "Diagnosis": ["panic", "error", "a", "b"]}
    ]


def test_nothing_changed_sends_nothing() -> None:
    interface = Recorder()
    values = {"Progress": 0.5, "Status": "copying"}
    assert announce_changes(interface, values, dict(values)) == values
    assert interface.emitted == []
