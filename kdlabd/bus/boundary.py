"""The one error boundary every exported D-Bus method goes through.

dbus-next would send the Python traceback of any unexpected exception to the
caller. Here kdlab errors become their D-Bus names with their message;
anything else becomes ``Error.Internal`` with no detail on the wire and a
full log entry in the journal. Every log line emitted while serving a call
names the caller (``sender``, ``uid``) and the method (``method``, ``path``).
"""

from __future__ import annotations

import errno
import functools
import inspect
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import structlog
from dbus_next import DBusError
from dbus_next.service import method

from kdlab.errors import Internal, KdlabError, out_of_descriptors
from kdlabd.bus.auth import Action, Authorizer, Caller
from kdlabd.bus.calls import CURRENT_CALL
from kdlabd.core.journal import fault_point

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class Guarded(Protocol):
    """An exported interface: it knows its authorizer and whose resource it is."""

    authorizer: Authorizer

    def resource_owner(self) -> int | None: ...


async def _authorize(interface: Guarded, action: Action) -> Caller:
    call = CURRENT_CALL.get()
    if call is None or not call.sender:
        raise KdlabError("the call has no sender")
    return await interface.authorizer.require(
        call.sender, action, interface.resource_owner()
    )


def _known(err: Exception) -> KdlabError | None:
    """The kdlab error a caller gets for *err*; None for a bug."""
    if isinstance(err, KdlabError):
        return err
    # Any call that makes a descriptor (a console socket, a gdb connection, an
    # image's copy of the caller's file) fails so when kdlabd's table is full.
    if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
        log.warning("dbus.out_of_descriptors", error=str(err))
        return out_of_descriptors(err.strerror or str(err))
    return None


def _error_reply(err: Exception) -> DBusError:
    """The error reply for *err*: its D-Bus name, or Internal (logged) for a bug."""
    known = _known(err)
    if known is None:
        incident = uuid.uuid4().hex[:12]
        log.exception("dbus.internal_error", incident=incident)
        known = Internal(f"internal error in kdlabd (incident {incident}); see its log")
    return DBusError(known.dbus_name(), str(known))


def exported(
    action: Action, name: str | None = None
) -> Callable[
    [Callable[Concatenate[Any, Caller, P], Awaitable[R]]],
    Callable[Concatenate[Any, P], Awaitable[R]],
]:
    """Export an async method on D-Bus behind authorization and the error boundary.

    The wrapped method receives the authorized :class:`Caller` after ``self``.
    Descriptors that came with the call are closed when it ends.
    """

    def decorate(
        fn: Callable[Concatenate[Any, Caller, P], Awaitable[R]],
    ) -> Callable[Concatenate[Any, P], Awaitable[R]]:
        @functools.wraps(fn)
        async def guarded(self: Guarded, *args: P.args, **kwargs: P.kwargs) -> R:
            call = CURRENT_CALL.get()
            # Every log line of the call names it. Each call runs in a task of
            # its own; tasks it starts inherit the names (a job's, its starter's).
            context = call.log_context() if call is not None else {}
            with structlog.contextvars.bound_contextvars(**context):
                try:
                    if call is not None and call.fds_lost:
                        raise out_of_descriptors(
                            "the descriptors of this call were lost"
                        )
                    caller = await _authorize(self, action)
                    structlog.contextvars.bind_contextvars(uid=caller.uid)
                    fault_point(f"call.{fn.__name__}")
                    return await fn(self, caller, *args, **kwargs)
                except Exception as err:
                    raise _error_reply(err) from None
                finally:
                    structlog.contextvars.unbind_contextvars("uid")
                    if call is not None:
                        call.close_fds()

        # dbus-next reads the D-Bus signature from the annotations: hide the Caller.
        signature = inspect.signature(fn)
        self_param, _caller, *wire = signature.parameters.values()
        guarded.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_param, *wire]
        )
        return method(name=name or fn.__name__)(guarded)  # type: ignore[no-any-return]

    return decorate
