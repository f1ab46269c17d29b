"""Encryption at rest: our encrypted store against plain SQLite and SQLCipher, in process.

Same schema (a user row found by id, carrying an alias), same number of point writes
(one transaction each) and point reads, same synchronous=NORMAL WAL settings.

Reads are measured twice for the encrypted store: from the file (blind index, query,
decryption) and as identity's key bundles read an account, through its cache of
decrypted rows. SQLCipher keeps decrypted pages in its page cache and these few rows fit
in it, so its reads are of memory too: the cached pair compares like with like.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import sqlcipher3

from bench.load import Result, percentile
from services.common.audit_events import AuditRecord
from services.common.outbox import SqliteOutbox
from services.common.sqlite import Migration, open_database
from services.identity.cache import CachedIdentityStore
from services.identity.keys import SignedKey
from services.identity.model import NewUser
from services.identity.store import MIGRATIONS as IDENTITY_MIGRATIONS
from services.identity.store import SqliteIdentityStore

SCHEMA = "CREATE TABLE users (id INTEGER PRIMARY KEY, user_key BLOB NOT NULL UNIQUE, alias BLOB)"


def _measure(name: str, ops: int, op: Callable[[int], None]) -> Result:
    latencies = []
    began = time.perf_counter()
    for i in range(ops):
        started = time.perf_counter()
        op(i)
        latencies.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - began
    latencies.sort()
    return Result(name, ops, 0, elapsed, latencies[len(latencies) // 2] * 1000,
                  percentile(latencies, 0.99) * 1000)  # fmt: skip


def _plain_like(conn: sqlite3.Connection, label: str, writes: int, reads: int) -> list[Result]:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(SCHEMA)

    def write(i: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO users (user_key, alias) VALUES (?, ?)",
                     (f"user{i}".encode(), f"Alias number {i}".encode()))  # fmt: skip
        conn.execute("COMMIT")

    def read(i: int) -> None:
        key = f"user{random.randrange(writes)}".encode()
        row = conn.execute("SELECT alias FROM users WHERE user_key = ?", (key,)).fetchone()
        assert row is not None

    return [_measure(f"{label} write", writes, write), _measure(f"{label} read", reads, read)]


def encrypted(path: Path, writes: int, reads: int) -> list[Result]:
    opened = open_database(
        path, service="bench", master_key="bench master key material",
        kdf_iterations=100_000, migrations=[Migration(1, SCHEMA + " STRICT;")],
        synchronous="NORMAL",
    )  # fmt: skip
    db, keyring = opened.database, opened.keyring
    index, alias = keyring.blind_index("users.id"), keyring.field("users", "alias")

    def write(i: int) -> None:
        key = index(f"user{i}")
        with db.write() as conn:
            conn.execute("INSERT INTO users (user_key, alias) VALUES (?, ?)",
                         (key, alias.encrypt_text(f"Alias number {i}", key)))  # fmt: skip

    def read(i: int) -> None:
        key = index(f"user{random.randrange(writes)}")
        with db.read(snapshot=False) as conn:
            row = conn.execute("SELECT alias FROM users WHERE user_key = ?", (key,)).fetchone()
        alias.decrypt_text(row[0], key)

    results = [_measure("encrypted write", writes, write), _measure("encrypted read", reads, read)]
    db.close()
    return results


def cached(path: Path, users: int, reads: int) -> Result:
    """Point reads of accounts as GetKeyBundle makes them: identity's store behind its
    cache of decrypted rows (services/identity/cache.py), every row read once before."""
    opened = open_database(
        path, service="identity", master_key="bench master key material",
        kdf_iterations=100_000, migrations=IDENTITY_MIGRATIONS, synchronous="NORMAL",
    )  # fmt: skip
    db = opened.database
    store = CachedIdentityStore(
        SqliteIdentityStore(db, opened.keyring, SqliteOutbox(db, opened.keyring, "identity"))
    )
    signed, pq = SignedKey(1, bytes(32), bytes(64)), SignedKey(1, bytes(1184), bytes(64))
    for i in range(users):
        user = NewUser(f"user{i}", f"Alias number {i}", {}, bytes(32), bytes(32), signed, pq,
                       [], time.time())  # fmt: skip
        store.add_user(user, AuditRecord("user_registered", user.user_id))
    for i in range(users):
        store.published(f"user{i}")

    def read(i: int) -> None:
        account = store.published(f"user{random.randrange(users)}")
        assert account is not None

    result = _measure("encrypted read, cached rows", reads, read)
    db.close()
    return result


def compare(directory: Path, writes: int = 3000, reads: int = 20000) -> list[Result]:
    directory.mkdir(parents=True, exist_ok=True)
    plain = sqlite3.connect(directory / "plain.db", isolation_level=None)
    cipher = sqlcipher3.connect(str(directory / "sqlcipher.db"), isolation_level=None)
    cipher.execute("PRAGMA key = 'bench master key material'")
    results = encrypted(directory / "encrypted.db", writes, reads)
    results.append(cached(directory / "identity.db", writes, reads))
    results += _plain_like(plain, "plain SQLite", writes, reads)
    results += _plain_like(cipher, "SQLCipher", writes, reads)
    plain.close()
    cipher.close()
    return results
