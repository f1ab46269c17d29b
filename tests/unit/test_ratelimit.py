from __future__ import annotations

from services.common.ratelimit import SlidingWindowLimiter
from tests.unit.conftest import FakeClock


def test_allows_the_limit_then_says_how_long_to_wait(clock: FakeClock) -> None:
    limiter = SlidingWindowLimiter(3, 60, clock=clock)
    assert [limiter.acquire("k") for _ in range(3)] == [None, None, None]
    clock.advance(10)
    assert limiter.acquire("k") == 50
    assert limiter.acquire("other") is None


def test_the_window_slides(clock: FakeClock) -> None:
    limiter = SlidingWindowLimiter(2, 60, clock=clock)
    limiter.hit("k")
    clock.advance(30)
    limiter.hit("k")
    clock.advance(31)
    assert limiter.retry_after("k") is None  # the first event left the window
    limiter.hit("k")
    assert limiter.retry_after("k") == 29


def test_reset_forgets_a_key(clock: FakeClock) -> None:
    limiter = SlidingWindowLimiter(1, 60, clock=clock)
    limiter.hit("k")
    limiter.reset("k")
    assert limiter.retry_after("k") is None


def test_tracks_at_most_max_keys(clock: FakeClock) -> None:
    limiter = SlidingWindowLimiter(1, 60, max_keys=100, clock=clock)
    for i in range(1000):
        limiter.hit(f"k{i}")
    assert len(limiter._events) == 100
    assert limiter.retry_after("k999") is not None
