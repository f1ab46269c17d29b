"""Wall-clock time of each phase of the compose test (cache hits show as short phases)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PHASES: dict[str, float] = {}


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        PHASES[name] = PHASES.get(name, 0.0) + time.monotonic() - started
