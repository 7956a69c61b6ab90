"""PLACEHOLDER of the lead's kdlabctl/bridge.py (issue 19): the interface only.

Branch wp-hostcli carries this file so that kdlabctl.hosts and kdlabctl.cli
import and type-check; the lead's bridge.py (the ssh transport) replaces it
whole. Nothing here reaches a host: :func:`open_session` always fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class Unreachable(Exception):
    """The host could not be reached; str() is one sentence with ssh's error."""


@dataclass(frozen=True)
class RemoteInfo:
    """Who the caller is on the host (the ssh user), and the host's kdlabctl."""

    uid: int
    user: str
    version: str
    hostname: str


class Session:
    """A private bus address on this machine that reaches the host's bus."""

    bus: str
    remote: RemoteInfo

    def close(self) -> None:
        raise NotImplementedError


def open_session(argv: Sequence[str], timeout: float) -> Session:  # noqa: ARG001
    """Run *argv* (ssh ... kdlabctl --bus BUS __bridge) and serve its bus."""
    raise Unreachable(
        f"{' '.join(argv[:1])}: the bridge is not in this build (placeholder)"
    )


def serve(bus: str) -> int:
    """The host's end: ``kdlabctl --bus BUS __bridge``."""
    raise NotImplementedError
