"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer, running_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the whole run, started on first use (about a
    second) and deleted at the end; or TEST_POSTGRES_URL's server. Tests take their own
    database and role from it (`postgres.service_database(name)`)."""
    with running_server() as server:
        yield server
