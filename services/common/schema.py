"""Numbered schema migrations, the same shape on every storage backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One step of a schema; `version` counts up from 1 without gaps."""

    version: int
    sql: str


def check_numbering(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if not versions or versions != list(range(1, len(versions) + 1)):
        raise ValueError("migrations must be numbered 1, 2, 3, ... without gaps")
