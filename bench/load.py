"""Closed-loop load: `concurrency` workers each issue one call after another for a while.

Every case in a run uses this same loop, so their numbers compare directly. Cases that
are compared with each other run interleaved (`interleaved`): short slices of each in
turn, so that a burst of load from elsewhere on the machine falls on all of them alike
instead of on whichever case happened to run at that moment.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

Call = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    name: str
    calls: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class _Tally:
    """What one case has measured so far, over all its slices."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    counter: int = 0  # call numbers keep counting across slices (fresh user ids, say)

    def result(self, name: str) -> Result:
        return Result(
            name=name,
            calls=len(self.latencies),
            errors=self.errors,
            seconds=self.seconds,
            p50_ms=statistics.median(self.latencies) * 1000 if self.latencies else 0.0,
            p99_ms=percentile(self.latencies, 0.99) * 1000,
        )


async def _slice(
    call: Call, tally: _Tally, *, concurrency: int, seconds: float, warmup: float
) -> None:
    measuring = False
    stop_at = time.perf_counter() + warmup + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            tally.counter += 1
            started = time.perf_counter()
            try:
                await call(tally.counter)
            except Exception:
                if measuring:
                    tally.errors += 1
                continue
            if measuring:
                tally.latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    began = time.perf_counter()
    await asyncio.gather(*tasks)
    tally.seconds += time.perf_counter() - began


async def run(
    name: str, call: Call, *, concurrency: int, seconds: float, warmup: float = 0.5
) -> Result:
    """Runs `call(i)` (i counts up across workers) for `seconds` after a warm-up."""
    tally = _Tally()
    await _slice(call, tally, concurrency=concurrency, seconds=seconds, warmup=warmup)
    return tally.result(name)


async def interleaved(
    cases: Sequence[tuple[str, Call]],
    *,
    concurrency: int,
    seconds: float,
    rounds: int = 6,
    warmup: float = 0.5,
) -> list[Result]:
    """Each case for `seconds` in all, as `rounds` slices taken in turn (a, b, c, a, b,
    c, ...). Only the first slice of a case has the full warm-up; later ones a tenth
    of it, enough for the calls in flight from the previous case to drain."""
    tallies = [_Tally() for _ in cases]
    for round_number in range(rounds):
        for (_, call), tally in zip(cases, tallies, strict=True):
            await _slice(
                call,
                tally,
                concurrency=concurrency,
                seconds=seconds / rounds,
                warmup=warmup if round_number == 0 else warmup / 10,
            )
    return [tally.result(name) for (name, _), tally in zip(cases, tallies, strict=True)]
