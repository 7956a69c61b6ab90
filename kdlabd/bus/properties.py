"""Properties announced on change: what VM, image and job objects have in common.

Each object computes its property values from its model (a pure function of
it) and keeps the values it last announced; its ``@dbus_property`` getters
read them. A new model is diffed against them and only the changed values go
out, in one ``PropertiesChanged`` signal, so a client never polls.
"""

from __future__ import annotations

from typing import Any

from dbus_next.service import ServiceInterface


def announce_changes(
    interface: ServiceInterface, announced: dict[str, Any], new: dict[str, Any]
) -> dict[str, Any]:
    """Emit PropertiesChanged on *interface* for the values of *new* that differ
    from *announced*; return *new*, the values announced from now on."""
    changed = {name: value for name, value in new.items() if announced[name] != value}
    if changed:
        interface.emit_properties_changed(changed)
    return new
