"""Closed-loop load: `concurrency` workers each issue one call after another for a while.

Every case in a run uses this same loop, so their numbers compare directly. Cases that
are compared with each other run interleaved (`interleaved`): short slices of each in
turn, so that a burst of load from elsewhere on the machine falls on all of them alike
instead of on whichever case happened to run at that moment.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Call = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class Result:
    name: str
    calls: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    # CPU time per call of each process measured (service, client, peer), microseconds:
    # unlike throughput, hardly moved by other load on the machine.
    cpu_us: dict[str, float] = field(default_factory=dict)

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
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds while measuring
    started_calls: int = 0  # calls made while measuring, finished or not

    def result(self, name: str) -> Result:
        per_call = {
            process: seconds / self.started_calls * 1e6
            for process, seconds in self.cpu.items()
            if self.started_calls
        }
        return Result(
            name=name,
            calls=len(self.latencies),
            errors=self.errors,
            seconds=self.seconds,
            p50_ms=statistics.median(self.latencies) * 1000 if self.latencies else 0.0,
            p99_ms=percentile(self.latencies, 0.99) * 1000,
            cpu_us=per_call,
        )


class Meter:
    """CPU seconds used so far by named processes (Linux /proc; empty elsewhere)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample(self) -> dict[str, float]:
        used = {}
        for name, pid in self.pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            used[name] = (int(fields[11]) + int(fields[12])) / self._tick
        return used


async def _slice(
    call: Call,
    tally: _Tally,
    *,
    concurrency: int,
    seconds: float,
    warmup: float,
    meter: Meter | None = None,
) -> None:
    measuring = False
    stop_at = time.perf_counter() + warmup + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            tally.counter += 1
            if measuring:
                tally.started_calls += 1
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
    before = meter.sample() if meter else {}
    began = time.perf_counter()
    await asyncio.gather(*tasks)
    tally.seconds += time.perf_counter() - began
    for process, used in (meter.sample() if meter else {}).items():
        if process in before:
            tally.cpu[process] = tally.cpu.get(process, 0.0) + used - before[process]


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
    meter: Meter | None = None,
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
                meter=meter,
            )
    return [tally.result(name) for (name, _), tally in zip(cases, tallies, strict=True)]
