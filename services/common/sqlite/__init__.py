"""SQLite base for the persistent services: one file, one writer, versioned schema, key
versions in the file. Split by job: `database` (the connection, transactions,
migrations), `keys` (key versions and unlocking), `open` (from the environment to an
unlocked keyring)."""

from services.common.schema import Migration
from services.common.sqlite.database import Database, Synchronous, any_of
from services.common.sqlite.keys import check_unlocks, retire_versions
from services.common.sqlite.open import (
    OpenedDatabase,
    RowSealing,
    open_database,
    open_service_database,
)

__all__ = [
    "Database",
    "Migration",
    "OpenedDatabase",
    "RowSealing",
    "Synchronous",
    "any_of",
    "check_unlocks",
    "open_database",
    "open_service_database",
    "retire_versions",
]
