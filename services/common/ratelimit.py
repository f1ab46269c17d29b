"""In-memory sliding-window limits (failed logins, message sends).

Bounded: at most `max_keys` keys are tracked, the least recently used forgotten first,
so a flood of distinct keys costs memory proportional to the cap, not to the flood.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol


class SlidingWindowLimiter:
    """Allows at most `limit` events per key within any `window` seconds."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._max_keys = max_keys
        self._clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.RLock()

    def _recent(self, key: str, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def retry_after(self, key: str) -> float | None:
        """Seconds until `key` may act again, or None if it may act now."""
        with self._lock:
            now = self._clock()
            events = self._recent(key, now)
            if events is None or len(events) < self.limit:
                return None
            return events[0] + self.window - now

    def hit(self, key: str) -> None:
        with self._lock:
            now = self._clock()
            events = self._recent(key, now)
            if events is None:
                events = deque(maxlen=self.limit)
                self._events[key] = events
                if len(self._events) > self._max_keys:
                    self._events.popitem(last=False)
            self._events.move_to_end(key)
            events.append(now)

    def acquire(self, key: str) -> float | None:
        """Records an event if allowed; otherwise returns the seconds to wait."""
        with self._lock:
            wait = self.retry_after(key)
            if wait is None:
                self.hit(key)
            return wait

    def reset(self, key: str) -> None:
        with self._lock:
            self._events.pop(key, None)


class WindowCounter(Protocol):
    """A sliding-window limit for synchronous rules that run in worker threads
    (identity's): this process's `SlidingWindowLimiter`, or Redis shared by replicas
    (services.common.shared_state.ThreadWindow)."""

    limit: int
    window: float

    def retry_after(self, key: str) -> float | None: ...
    def hit(self, key: str) -> None: ...
    def acquire(self, key: str) -> float | None: ...
    def reset(self, key: str) -> None: ...


# Builds a named limit: (name, events allowed, window seconds). The name tells shared
# limits apart in Redis; a local limit ignores it.
CounterFactory = Callable[[str, int, float], WindowCounter]


def local_counters(clock: Callable[[], float] = time.monotonic) -> CounterFactory:
    return lambda _name, limit, window: SlidingWindowLimiter(limit, window, clock=clock)


class WindowLimit(Protocol):
    """A sliding-window limit as the rules see it, awaited: this process's memory
    (`LocalWindowLimit`) or Redis shared by replicas
    (services.common.shared_state.SharedWindowLimiter)."""

    limit: int
    window: float

    async def retry_after(self, key: str) -> float | None: ...
    async def hit(self, key: str) -> None: ...
    async def acquire(self, key: str) -> float | None: ...
    async def reset(self, key: str) -> None: ...


# Builds a named limit: (name, events allowed, window seconds).
WindowFactory = Callable[[str, int, float], WindowLimit]


class LocalWindowLimit:
    """`SlidingWindowLimiter` behind the awaited `WindowLimit` interface."""

    def __init__(
        self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limiter = SlidingWindowLimiter(limit, window, clock=clock)
        self.limit = limit
        self.window = window

    async def retry_after(self, key: str) -> float | None:
        return self._limiter.retry_after(key)

    async def hit(self, key: str) -> None:
        self._limiter.hit(key)

    async def acquire(self, key: str) -> float | None:
        return self._limiter.acquire(key)

    async def reset(self, key: str) -> None:
        self._limiter.reset(key)


def local_windows(clock: Callable[[], float] = time.monotonic) -> WindowFactory:
    return lambda _name, limit, window: LocalWindowLimit(limit, window, clock=clock)
