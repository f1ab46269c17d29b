"""Which key versions a set of master keys unlocks: the rules every storage backend
shares (no SQL here; each backend reads and writes its own `key_versions` and
`key_retirements` tables).

A database records one row per generation of its master key (salt, PBKDF2 iterations,
key-check value). The primary key either matches a row or is new (then the caller adds
a version); every version not retired must be unlocked by the primary or an old key.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from services.common import crypto
from services.common.errors import StartupError

KeyRow = tuple[int, bytes, int, bytes]  # version, salt, iterations, key-check value


class Derivations:
    """One master key's PBKDF2 results, cached so a pre-check and the real open derive
    only once per salt."""

    def __init__(self, master_key: str) -> None:
        self._master = master_key
        self._cache: dict[tuple[bytes, int], bytes] = {}

    def root(self, salt: bytes, iterations: int) -> bytes:
        key = (salt, iterations)
        if key not in self._cache:
            self._cache[key] = crypto.derive_root_key(self._master, salt, iterations)
        return self._cache[key]

    def unlocks(self, salt: bytes, iterations: int, check: bytes) -> bool:
        """Whether this key matches the version's check value (any sealing level)."""
        return self.sealed_level(salt, iterations, check) is not None

    def sealed_level(self, salt: bytes, iterations: int, check: bytes) -> int | None:
        """The sealing level the check value records, or None when it is not this key's."""
        root = self.root(salt, iterations)
        for level in range(crypto.MAX_SEAL_LEVEL + 1):
            if hmac.compare_digest(crypto.key_check_value(root, sealed=level), check):
                return level
        return None


def sealed_level(rows: Sequence[KeyRow], loaded: dict[int, crypto.KeyVersion]) -> int:
    """How many row-MAC upgrades the loaded versions' check values say are sealed (the
    highest any records: a version added later copies the level it was added at)."""
    by_version = {version: check for version, _, _, check in rows}
    levels = [
        level
        for version, key in loaded.items()
        if version in by_version
        for level in range(crypto.MAX_SEAL_LEVEL + 1)
        if hmac.compare_digest(
            crypto.key_check_value(key.root_key, sealed=level), by_version[version]
        )
    ]
    return max(levels, default=0)


def plan_unlock(
    name: str,
    rows: Sequence[KeyRow],
    retired: set[int],
    primary: Derivations,
    olds: Sequence[Derivations],
) -> tuple[crypto.KeyVersion | None, dict[int, crypto.KeyVersion]]:
    """(the primary key's version if recorded, every version unlocked); raises
    StartupError, naming `name`, when a retired key is primary or keys are missing."""

    def unlock(derived: Derivations) -> crypto.KeyVersion | None:
        for version, salt, iterations, check in rows:
            if derived.unlocks(salt, iterations, check):
                return crypto.KeyVersion(version, derived.root(salt, iterations))
        return None

    primary_version = unlock(primary)
    if primary_version is not None and primary_version.version in retired:
        raise StartupError(
            f"DB_ENCRYPTION_KEY unlocks only retired key version {primary_version.version} of "
            f"{name}: its data was re-encrypted under a newer key. Use that key"
        )
    loaded = {v.version: v for v in map(unlock, olds) if v is not None and v.version not in retired}
    if primary_version is None and not loaded:
        raise StartupError(
            f"DB_ENCRYPTION_KEY does not unlock {name}: it was encrypted under another "
            "key. Refusing to start; nothing was modified. (Rotating keys? Put the "
            "previous key in DB_ENCRYPTION_OLD_KEYS.)"
        )
    if primary_version is not None:
        loaded[primary_version.version] = primary_version
    missing = sorted({row[0] for row in rows} - retired - set(loaded))
    if missing:
        raise StartupError(
            f"key version(s) {', '.join(map(str, missing))} of {name} still protect data: "
            "give their keys in DB_ENCRYPTION_OLD_KEYS until re-encryption retires them"
        )
    return primary_version, loaded
