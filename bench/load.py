"""Closed-loop load: `concurrency` workers each issue one call after another for a while.

Every case in a run uses this same loop, so their numbers compare directly.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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


async def run(
    name: str, call: Call, *, concurrency: int, seconds: float, warmup: float = 0.5
) -> Result:
    """Runs `call(i)` (i counts up across workers) for `seconds` after a warm-up."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    measuring = False
    stop_at = time.perf_counter() + warmup + seconds

    async def worker() -> None:
        nonlocal counter, errors
        while time.perf_counter() < stop_at:
            counter += 1
            started = time.perf_counter()
            try:
                await call(counter)
            except Exception:
                if measuring:
                    errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    began = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    return Result(
        name=name,
        calls=len(latencies),
        errors=errors,
        seconds=elapsed,
        p50_ms=statistics.median(latencies) * 1000 if latencies else 0.0,
        p99_ms=percentile(latencies, 0.99) * 1000,
    )
