from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client.keys import UserKeys
from services.common.sqlite import Migration, OpenedDatabase, open_database
from services.identity.domain import Registration
from services.identity.keys import OneTimePrekey, SignedKey


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def opened(path: Path, service: str, migrations: list[Migration]) -> OpenedDatabase:
    return open_database(
        path,
        service=service,
        master_key="unit test master key",
        kdf_iterations=100_000,
        migrations=migrations,
        synchronous="NORMAL",
    )


@pytest.fixture
def identity_db(tmp_path: Path) -> Iterator[OpenedDatabase]:
    from services.identity.store import MIGRATIONS

    db = opened(tmp_path / "identity.db", "identity", MIGRATIONS)
    yield db
    db.database.close()


@pytest.fixture
def session_db(tmp_path: Path) -> Iterator[OpenedDatabase]:
    from services.session.store import MIGRATIONS

    db = opened(tmp_path / "session.db", "session", MIGRATIONS)
    yield db
    db.database.close()


def registration(user_id: str, keys: UserKeys, **overrides: object) -> Registration:
    """A valid registration for the identity domain, signed with `keys`."""
    spk, pq = keys.signed_prekey_proto(), keys.pq_prekey_proto()
    fields: dict[str, object] = {
        "user_id": user_id,
        "alias": "Alias",
        "metadata": {},
        "identity_key": keys.identity_public,
        "verify_key": keys.verify_key,
        "signed_prekey": SignedKey(spk.key_id, spk.public_key, spk.signature),
        "pq_prekey": SignedKey(pq.key_id, pq.public_key, pq.signature),
        "one_time_prekeys": [OneTimePrekey(p.key_id, p.public_key) for p in keys.one_time_protos()],
    }
    fields.update(overrides)
    return Registration(**fields)  # type: ignore[arg-type]
