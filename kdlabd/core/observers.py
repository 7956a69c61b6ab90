"""Who is told of a service's changes: observers that subscribe and may leave.

A service takes no observer when it is made: whoever wants to hear of its
changes (the bus exporter) calls its ``subscribe(observer)`` and keeps the
function that ends the subscription.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

ObserverT = TypeVar("ObserverT")


class Observers(Generic[ObserverT]):
    """The observers of one service, told of each change in subscription order."""

    def __init__(self) -> None:
        # By subscription, not by observer: equal observers (two empty
        # recorders) are still two subscriptions, each ended on its own.
        self._observers: dict[object, ObserverT] = {}

    def subscribe(self, observer: ObserverT) -> Callable[[], None]:
        """Tell *observer* of every change from now on.

        Returns the function that ends the subscription.
        """
        subscription = object()
        self._observers[subscription] = observer

        def unsubscribe() -> None:
            self._observers.pop(subscription, None)

        return unsubscribe

    def __iter__(self) -> Iterator[ObserverT]:
        # A copy: an observer may unsubscribe while it is being told.
        return iter(tuple(self._observers.values()))
