"""``a{sv}`` options: every key known, every value of the documented D-Bus type."""

from __future__ import annotations

from typing import Any

from dbus_next import Variant

from kdlab.errors import InvalidArgument


def take(options: dict[str, Variant], schema: dict[str, str]) -> dict[str, Any]:
    """Unwrap *options*, refusing unknown keys and values of the wrong type."""
    unknown = sorted(set(options) - set(schema))
    if unknown:
        raise InvalidArgument(
            f"unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(schema))}"
        )
    values: dict[str, Any] = {}
    for key, variant in options.items():
        if variant.signature != schema[key]:
            raise InvalidArgument(
                f"option {key!r} must have D-Bus type {schema[key]!r}, "
                f"not {variant.signature!r}"
            )
        if schema[key] == "h" and variant.value is None:
            # dbus-next gives None for an index with no descriptor behind it.
            raise InvalidArgument(
                f"option {key!r}: no file descriptor came with the call"
            )
        values[key] = variant.value
    return values
