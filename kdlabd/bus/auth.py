"""Who may do what. Every exported method asks here first, and failure closes the door.

Callers are identified by their unique bus name; the bus daemon tells their
uid and groups (``GetConnectionCredentials``), which a client cannot forge.

With polkit on the bus, every call is a ``CheckAuthorization`` of the
caller's ``system-bus-name`` (never a pid, which can be recycled), for one of
kdlab's actions (systemd/org.kdlab.Kdlab1.policy; a rule grants group
``kdlab``). Any polkit failure denies. Without polkit: anyone may inspect;
root and members of group ``kdlab`` may manage and debug their own VMs and
images; only root may touch VMs and images that belong to someone else.
"""

from __future__ import annotations

import asyncio
import enum
import grp
import os
import pwd
from dataclasses import dataclass

import structlog
from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from kdlab.errors import NotAuthorized

log = structlog.get_logger(__name__)

KDLAB_GROUP = "kdlab"
_CREDENTIALS_CACHE_MAX = 4096


class Action(enum.StrEnum):
    """polkit action ids, also used by the built-in policy."""

    INSPECT = "org.kdlab.Kdlab1.inspect"
    MANAGE_VMS = "org.kdlab.Kdlab1.manage-vms"
    DEBUG_VMS = "org.kdlab.Kdlab1.debug-vms"
    MANAGE_OTHERS = "org.kdlab.Kdlab1.manage-others"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller."""

    bus_name: str
    uid: int
    gids: frozenset[int]


def _group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _user_gids(uid: int) -> frozenset[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


POLKIT_NAME = "org.freedesktop.PolicyKit1"
_POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
_POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
# CheckAuthorization flags: let an authentication agent ask the user (pkttyagent).
_ALLOW_USER_INTERACTION = 1
# A polkit that never answers must not hang kdlabd's callers: deny after this.
POLKIT_TIMEOUT = 25.0


class Authorizer:
    """Checks callers against kdlab's policy: polkit when present, else groups."""

    def __init__(
        self, bus: MessageBus, *, polkit: bool = False, timeout: float = POLKIT_TIMEOUT
    ) -> None:
        self._bus = bus
        self.polkit = polkit
        self._timeout = timeout
        self._callers: dict[str, Caller] = {}

    @classmethod
    async def for_bus(
        cls, bus: MessageBus, timeout: float = POLKIT_TIMEOUT
    ) -> Authorizer:
        """Use polkit if the bus has it (running, or activatable on demand)."""
        names: set[str] = set()
        for member in ("ListNames", "ListActivatableNames"):
            reply = await bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member=member,
                )
            )
            if reply is not None and reply.message_type is MessageType.METHOD_RETURN:
                names.update(reply.body[0])
        authorizer = cls(bus, polkit=POLKIT_NAME in names, timeout=timeout)
        log.info("auth.mode", polkit=authorizer.polkit)
        return authorizer

    async def caller(self, bus_name: str) -> Caller:
        """The uid and groups behind *bus_name*, as the bus daemon reports them."""
        cached = self._callers.get(bus_name)
        if cached is not None:
            return cached
        reply = await self._bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionCredentials",
                signature="s",
                body=[bus_name],
            )
        )
        if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
            raise NotAuthorized("could not identify the caller")
        creds = reply.body[0]
        if "UnixUserID" not in creds:
            raise NotAuthorized("the bus did not tell the caller's uid")
        uid = int(creds["UnixUserID"].value)
        gids = (
            frozenset(creds["UnixGroupIDs"].value)
            if "UnixGroupIDs" in creds
            else _user_gids(uid)
        )
        caller = Caller(bus_name, uid, gids)
        if len(self._callers) >= _CREDENTIALS_CACHE_MAX:
            self._callers.clear()
        # Unique bus names are never reused while the bus runs: caching is safe.
        self._callers[bus_name] = caller
        return caller

    async def require(
        self, bus_name: str, action: Action, owner_uid: int | None = None
    ) -> Caller:
        """Return the caller if it may perform *action* (on a VM or image of
        *owner_uid*)."""
        caller = await self.caller(bus_name)
        if not await self._allowed(caller, action):
            log.info("auth.denied", uid=caller.uid, action=action.value)
            who = "polkit does not allow" if self.polkit else "kdlabd does not allow"
            raise NotAuthorized(
                f"{who} uid {caller.uid} to do this ({action.value}): be root or "
                f"a member of group {KDLAB_GROUP!r} (usermod -aG {KDLAB_GROUP} USER)"
            )
        others = owner_uid is not None and owner_uid != caller.uid
        if (
            others
            and action is not Action.INSPECT
            and not await self._allowed(caller, Action.MANAGE_OTHERS)
        ):
            log.info("auth.denied", uid=caller.uid, action=Action.MANAGE_OTHERS.value)
            raise NotAuthorized(
                f"it belongs to uid {owner_uid}; only its owner, or a user allowed "
                f"{Action.MANAGE_OTHERS.value} (root), may change it"
            )
        return caller

    async def _allowed(self, caller: Caller, action: Action) -> bool:
        if self.polkit:
            return await self._polkit_allows(caller, action)
        return self._group_allows(caller, action)

    async def _polkit_allows(self, caller: Caller, action: Action) -> bool:
        subject = ["system-bus-name", {"name": Variant("s", caller.bus_name)}]
        call = self._bus.call(
            Message(
                destination=POLKIT_NAME,
                path=_POLKIT_PATH,
                interface=_POLKIT_INTERFACE,
                member="CheckAuthorization",
                signature="(sa{sv})sa{ss}us",
                body=[subject, action.value, {}, _ALLOW_USER_INTERACTION, ""],
            )
        )
        try:
            reply = await asyncio.wait_for(call, self._timeout)
        except TimeoutError:
            log.warning("auth.polkit_timeout", action=action.value)
            return False
        if reply is None or reply.message_type is not MessageType.METHOD_RETURN:
            error = reply.error_name if reply is not None else "no reply"
            log.warning("auth.polkit_failed", action=action.value, error=error)
            return False
        authorized, _challenge, _details = reply.body[0]
        return bool(authorized)

    @staticmethod
    def _group_allows(caller: Caller, action: Action) -> bool:
        if caller.uid == 0 or action is Action.INSPECT:
            return True
        if action is Action.MANAGE_OTHERS:
            return False
        gid = _group_gid(KDLAB_GROUP)
        return gid is not None and gid in caller.gids
