"""Who the caller is to kdlabd: this machine's user, or the ssh user on a host.

With ``--host`` kdlabd runs on another machine and sees the ssh user's uid
there (:class:`kdlabctl.bridge.RemoteInfo`), not ours: the owner of a VM is
compared with that uid, and a uid kdlabd reports is named by that host's
user, not by this machine's passwd (which names other people, or nobody).
kdlabctl's checks of its own files (who may change a vmlinux-gdb.py, a cache
directory) stay with :func:`os.getuid`.

The remote identity is a context variable: :func:`on_host` sets it for the
command kdlabctl runs (asyncio's tasks inherit it). Nothing heavy is imported
here: ``kdlabctl list`` names its owners through :func:`user_name`.
"""

from __future__ import annotations

import os
import pwd
from contextlib import contextmanager
from contextvars import ContextVar

TYPE_CHECKING = False  # importing typing costs more than a listing
if TYPE_CHECKING:
    from collections.abc import Iterator

    from kdlabctl.bridge import RemoteInfo

_REMOTE: ContextVar[RemoteInfo | None] = ContextVar("kdlab_remote", default=None)


def remote() -> RemoteInfo | None:
    """The host kdlabctl's command talks to (None: this machine's kdlabd)."""
    return _REMOTE.get()


@contextmanager
def on_host(info: RemoteInfo) -> Iterator[None]:
    """Within: the caller is *info*'s user on its host."""
    token = _REMOTE.set(info)
    try:
        yield
    finally:
        _REMOTE.reset(token)


def uid() -> int:
    """The caller's uid as kdlabd sees it (owner checks against its VMs)."""
    info = remote()
    return os.getuid() if info is None else info.uid


def user_name(uid: int) -> str:
    """The name of *uid*, a uid kdlabd reported, for people."""
    return user_name_on(remote(), uid)


def user_name_on(info: RemoteInfo | None, uid: int) -> str:
    """The name of *uid* on *info*'s host (None: this machine): only the ssh
    user's own uid has a name known there; any other is its number."""
    if info is not None:
        return info.user if uid == info.uid else str(uid)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
