"""kdlabd's descriptor table: a reserve that callers cannot take.

Console viewers, console sessions and gdb connections hold a descriptor in
kdlabd for as long as a caller likes. Without a reserve, callers could fill
the table, and kdlabd itself would then fail where it cannot report it: GLib
aborts the whole process when a new libvirt connection cannot get the pipes
of its main context ("Creating pipes for GWakeup: Too many open files"), and
the kernel silently drops descriptors that come with a D-Bus call. So such
descriptors are refused while fewer than :data:`RESERVE` are free (the host
counts them: :meth:`kdlabd.core.host.Host.free_descriptors`).
"""

from __future__ import annotations

from kdlab.errors import out_of_descriptors

RESERVE = 64


def require(free: int, what: str) -> None:
    """Refuse *what* (LimitExceeded) if it would eat into the reserve, with
    *free* descriptors left."""
    if free < RESERVE:
        raise out_of_descriptors(
            f"{free} left, {RESERVE} are kept for kdlabd itself: {what} refused"
        )
