from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client.keys import UserKeys
from services.common.sqlite import Migration, OpenedDatabase, open_database
from services.identity.domain import Registration
from services.identity.servicer import registration_from_request
from tests.support import users


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
    """A valid registration as the identity domain receives it: the request the SDK
    builds (tests.support.users.registration), converted by the servicer, with domain
    fields replaced by `overrides`."""
    request = users.registration(user_id, keys, alias="Alias", metadata={})
    return dataclasses.replace(registration_from_request(request), **overrides)  # type: ignore[arg-type]
