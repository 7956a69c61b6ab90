"""The method call being served: who sent it, what it calls, what came with it.

The bus connection (:class:`kdlabd.bus.dbus_next_patches.KdlabBus`) records
each incoming call in :data:`CURRENT_CALL` before the method runs; the error
boundary (:mod:`kdlabd.bus.boundary`) reads it to authorize the caller, names
it in every log line of the call and closes the call's descriptors.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable
from dataclasses import dataclass, field


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors kdlabd owns, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(frozen=True)
class Call:
    """One incoming method call.

    *method* is ``interface.member``, *path* the object called.
    *fds_lost*: the call came with descriptors that kdlabd could not receive
    (its descriptor table was full): the kernel dropped them.
    """

    sender: str
    method: str = ""
    path: str = ""
    unix_fds: list[int] = field(default_factory=list)
    fds_lost: bool = False

    def close_fds(self) -> None:
        """Close the descriptors that arrived with the call; kdlabd owns them."""
        close_fds(self.unix_fds)

    def log_context(self) -> dict[str, str]:
        """What every log line emitted while serving the call names."""
        return {"sender": self.sender, "method": self.method, "path": self.path}


CURRENT_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "kdlab_current_call", default=None
)
