"""A small bounded cache whose entries expire, for answers fetched from other services."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TtlCache(Generic[V]):
    """Entries live `ttl` seconds; past `max_entries` the least recently added go first.

    Used from the event loop only (no locking). A ttl of 0 disables it.
    """

    def __init__(
        self, ttl: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        return value

    def now(self) -> float:
        """The cache's clock: read it before asking, and pass it to `put` as `since`."""
        return self._clock()

    def put(self, key: Hashable, value: V, *, since: float | None = None) -> None:
        """Caches `value` for `ttl` seconds from `since` (default: now).

        An answer fetched from another service is only as fresh as the moment it was
        asked for: pass that moment, so a slow answer is not trusted for longer.
        """
        if self._ttl <= 0:
            return
        expires = (self._clock() if since is None else since) + self._ttl
        if expires <= self._clock():
            return
        self._entries[key] = (expires, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
