from __future__ import annotations

from services.common.cache import TtlCache
from tests.unit.conftest import FakeClock


def test_entries_expire_after_their_ttl(clock: FakeClock) -> None:
    cache = TtlCache[str](2.0, 10, clock)
    cache.put("k", "v")
    clock.advance(1.9)
    assert cache.get("k") == "v"
    clock.advance(0.2)
    assert cache.get("k") is None


def test_the_oldest_entries_go_past_the_bound(clock: FakeClock) -> None:
    cache = TtlCache[int](60.0, 3, clock)
    for i in range(5):
        cache.put(i, i)
    assert [cache.get(i) for i in range(5)] == [None, None, 2, 3, 4]


def test_a_zero_ttl_caches_nothing(clock: FakeClock) -> None:
    cache = TtlCache[int](0.0, 3, clock)
    cache.put("k", 1)
    assert cache.get("k") is None


def test_an_entry_counts_from_when_it_was_asked_for(clock: FakeClock) -> None:
    cache = TtlCache[str](2.0, 10, clock)
    asked = cache.now()
    clock.advance(1.5)  # a slow answer
    cache.put("k", "v", since=asked)
    clock.advance(0.6)
    assert cache.get("k") is None
    asked = cache.now()
    clock.advance(2.5)  # slower than the ttl: never cached at all
    cache.put("k", "v", since=asked)
    assert cache.get("k") is None
