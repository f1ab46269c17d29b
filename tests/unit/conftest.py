from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client.keys import UserKeys
from services.identity.domain import Registration
from services.identity.servicer import registration_from_request
from tests.support import users
from tests.support.stores import BACKENDS, SQL_BACKENDS, Backend, Place


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


def registration(user_id: str, keys: UserKeys, **overrides: object) -> Registration:
    """A valid registration as the identity domain receives it: the request the SDK
    builds (tests.support.users.registration), converted by the servicer, with domain
    fields replaced by `overrides`."""
    request = users.registration(user_id, keys, alias="Alias", metadata={})
    return dataclasses.replace(registration_from_request(request), **overrides)  # type: ignore[arg-type]


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store implementation in turn (tests/support/stores.py), on fresh storage."""
    with contextlib.ExitStack() as cleanup:
        yield BACKENDS[request.param](Place(tmp_path, cleanup, request.getfixturevalue))


@pytest.fixture(params=SQL_BACKENDS)
def sql_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each store implementation that keeps rows in a database, for tests that edit them."""
    with contextlib.ExitStack() as cleanup:
        yield BACKENDS[request.param](Place(tmp_path, cleanup, request.getfixturevalue))
