"""Recovery codes: generated here, shown once, kept by the store only as keyed hashes.

A code is 16 characters of a 32-letter alphabet without look-alikes (80 bits), shown
in four groups of four. People retype them, so case, spaces and dashes are ignored.
"""

from __future__ import annotations

import secrets

COUNT = 10
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1
CHARS = 16
GROUP = 4


def generate(count: int = COUNT) -> list[str]:
    codes = []
    for _ in range(count):
        raw = "".join(secrets.choice(ALPHABET) for _ in range(CHARS))
        codes.append("-".join(raw[i : i + GROUP] for i in range(0, CHARS, GROUP)))
    return codes


def normalize(code: str) -> str | None:
    """The canonical form of a code as typed, or None if it cannot be one."""
    cleaned = "".join(code.split()).replace("-", "").upper()
    if len(cleaned) != CHARS or any(ch not in ALPHABET for ch in cleaned):
        return None
    return cleaned
