"""Wall-clock time of each phase of the compose test (cache hits show as short phases)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PHASES: dict[str, float] = {}
# A path between services -> (seconds after every container was healthy until it first
# answered, how many calls it refused before).
FIRST_ANSWERS: dict[str, tuple[float, int]] = {}


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.monotonic() - started
