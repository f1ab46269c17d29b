"""Identity storage: users and one-time prekeys in an encrypted SQLite file.

What a stolen file shows: public keys, key ids, creation/login/deactivation times and how
many prekeys each row has. User ids, aliases and metadata exist only as ChaCha20-Poly1305
ciphertext bound to their row; rows are found through a blind index (HMAC of the user id).
"""

from __future__ import annotations

import json
import sqlite3

from services.common.audit_events import AuditRecord
from services.common.crypto import Keyring
from services.common.outbox import OUTBOX_TABLE, SqliteOutbox
from services.common.rotation import EncryptedTable, Reindex, Rotatable
from services.common.sqlite import Database, Migration, any_of
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import (
    IdentityCounts,
    NewKeys,
    NewUser,
    NoSuchUser,
    PoolFull,
    PrekeyIdsInUse,
    User,
    UserIdTaken,
)

# Authentication factors (services/identity/factor_store.py): secrets sealed per row,
# recovery codes as HMACs under a sealed per-user key, the last accepted TOTP step and
# the password budget in the clear (needed for atomic conditional updates).
FACTOR_TABLES = """
CREATE TABLE factors (
    user_row              INTEGER PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    row_key               TEXT    NOT NULL UNIQUE,
    code_key_ct           BLOB    NOT NULL,
    totp_secret_ct        BLOB,
    totp_pending_ct       BLOB,
    totp_last_step        INTEGER NOT NULL DEFAULT 0,
    password_ct           BLOB,
    password_failures     INTEGER NOT NULL DEFAULT 0,
    password_window_start REAL
) STRICT;
-- Unknown user ids pay for the same write as known ones (see record_password_failure).
CREATE TABLE password_decoy (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    attempts INTEGER NOT NULL
) STRICT;
INSERT INTO password_decoy (id, attempts) VALUES (1, 0);
CREATE TABLE recovery_codes (
    user_row INTEGER NOT NULL REFERENCES factors (user_row) ON DELETE CASCADE,
    digest   BLOB    NOT NULL,
    PRIMARY KEY (user_row, digest)
) STRICT, WITHOUT ROWID;
"""

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE users (
            id                INTEGER PRIMARY KEY,
            user_index        BLOB    NOT NULL UNIQUE,
            user_id_ct        BLOB    NOT NULL,
            alias_ct          BLOB    NOT NULL,
            metadata_ct       BLOB    NOT NULL,
            identity_key      BLOB    NOT NULL,
            verify_key        BLOB    NOT NULL,
            signed_prekey_id  INTEGER NOT NULL,
            signed_prekey     BLOB    NOT NULL,
            signed_prekey_sig BLOB    NOT NULL,
            pq_prekey_id      INTEGER NOT NULL,
            pq_prekey         BLOB    NOT NULL,
            pq_prekey_sig     BLOB    NOT NULL,
            create_time       REAL    NOT NULL,
            last_login_time   REAL,
            deactivate_time   REAL
        ) STRICT;
        CREATE TABLE one_time_prekeys (
            user_row   INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
            key_id     INTEGER NOT NULL,
            public_key BLOB    NOT NULL,
            PRIMARY KEY (user_row, key_id)
        ) STRICT, WITHOUT ROWID;
        """,
    ),
    Migration(2, OUTBOX_TABLE),
    Migration(3, FACTOR_TABLES),  # used by services/identity/factor_store.py
]


_USER_COLUMNS = """
    id, user_index, user_id_ct, alias_ct, metadata_ct, identity_key, verify_key,
    signed_prekey_id, signed_prekey, signed_prekey_sig, pq_prekey_id, pq_prekey, pq_prekey_sig,
    create_time, last_login_time, deactivate_time,
    (SELECT COUNT(*) FROM one_time_prekeys WHERE user_row = users.id) AS prekeys
"""


class SqliteIdentityStore:
    """`IdentityStore` in SQLite. Every change is written together with its audit event
    (see services.common.outbox)."""

    def __init__(self, db: Database, keyring: Keyring, outbox: SqliteOutbox) -> None:
        self._db = db
        self._outbox = outbox
        self._index = keyring.blind_index("users.user_id")
        # A user's rows match their index under every loaded key version (see rotation).
        self._user_match = f"user_index IN {any_of(range(self._index.versions))}"
        self._user_id = keyring.field("users", "user_id")
        self._alias = keyring.field("users", "alias")
        self._metadata = keyring.field("users", "metadata")

    def add_user(self, user: NewUser, audit: AuditRecord) -> None:
        index = self._index(user.user_id)
        metadata = json.dumps(user.metadata, sort_keys=True, separators=(",", ":"))
        candidates = self._index.candidates(user.user_id)
        with self._db.write() as conn:
            taken = conn.execute(
                f"SELECT 1 FROM users WHERE user_index IN {any_of(candidates)}",  # noqa: S608
                candidates,
            ).fetchone()
            if taken:
                raise UserIdTaken
            try:
                cursor = conn.execute(
                    """INSERT INTO users (user_index, user_id_ct, alias_ct, metadata_ct,
                           identity_key, verify_key, signed_prekey_id, signed_prekey,
                           signed_prekey_sig, pq_prekey_id, pq_prekey, pq_prekey_sig, create_time)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        index,
                        self._user_id.encrypt_text(user.user_id, index),
                        self._alias.encrypt_text(user.alias, index),
                        self._metadata.encrypt_text(metadata, index),
                        user.identity_key,
                        user.verify_key,
                        user.signed_prekey.key_id,
                        user.signed_prekey.public_key,
                        user.signed_prekey.signature,
                        user.pq_prekey.key_id,
                        user.pq_prekey.public_key,
                        user.pq_prekey.signature,
                        user.create_time,
                    ),
                )
            except sqlite3.IntegrityError:
                raise UserIdTaken from None
            conn.executemany(
                "INSERT INTO one_time_prekeys (user_row, key_id, public_key) VALUES (?, ?, ?)",
                [(cursor.lastrowid, k.key_id, k.public_key) for k in user.one_time_prekeys],
            )
            self._outbox.add(conn, audit)

    def get_user(self, user_id: str) -> User | None:
        with self._db.read(snapshot=False) as conn:
            row = conn.execute(
                f"SELECT {_USER_COLUMNS} FROM users WHERE {self._user_match}",  # noqa: S608
                self._index.candidates(user_id),
            ).fetchone()
        return None if row is None else self._decode(row)

    def rotatables(self) -> list[Rotatable]:
        """The tables key rotation re-encrypts (registered by the wiring, see app.py)."""
        users = EncryptedTable(
            self._db,
            "users",
            "id",
            "user_index",
            [
                ("user_id_ct", self._user_id),
                ("alias_ct", self._alias),
                ("metadata_ct", self._metadata),
            ],
            Reindex("user_index", self._index, "user_id_ct"),
        )
        return [users]

    def get_verify_key(self, user_id: str) -> bytes | None:
        """An active user's verify key, without decrypting anything (the login hot path)."""
        with self._db.read(snapshot=False) as conn:
            row = conn.execute(
                f"SELECT verify_key FROM users WHERE {self._user_match}"  # noqa: S608
                " AND deactivate_time IS NULL",
                self._index.candidates(user_id),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def is_active(self, user_id: str) -> bool | None:
        with self._db.read(snapshot=False) as conn:
            row = conn.execute(
                f"SELECT deactivate_time IS NULL FROM users WHERE {self._user_match}",  # noqa: S608
                self._index.candidates(user_id),
            ).fetchone()
        return None if row is None else bool(row[0])

    def _decode(self, row: sqlite3.Row) -> User:
        index = row["user_index"]
        return User(
            user_id=self._user_id.decrypt_text(row["user_id_ct"], index),
            alias=self._alias.decrypt_text(row["alias_ct"], index),
            metadata=json.loads(self._metadata.decrypt_text(row["metadata_ct"], index)),
            identity_key=row["identity_key"],
            verify_key=row["verify_key"],
            signed_prekey=SignedKey(
                row["signed_prekey_id"], row["signed_prekey"], row["signed_prekey_sig"]
            ),
            pq_prekey=SignedKey(row["pq_prekey_id"], row["pq_prekey"], row["pq_prekey_sig"]),
            create_time=row["create_time"],
            last_login_time=row["last_login_time"],
            deactivate_time=row["deactivate_time"],
            one_time_prekey_count=row["prekeys"],
        )

    def _active_row(self, conn: sqlite3.Connection, user_id: str) -> int:
        row = conn.execute(
            f"SELECT id FROM users WHERE {self._user_match} AND deactivate_time IS NULL",  # noqa: S608
            self._index.candidates(user_id),
        ).fetchone()
        if row is None:
            raise NoSuchUser
        return int(row[0])

    def take_one_time_prekey(self, user_id: str) -> OneTimePrekey | None:
        # One statement inside the single-writer transaction: two fetches can never
        # receive the same key.
        with self._db.write() as conn:
            user_row = self._active_row(conn, user_id)
            row = conn.execute(
                """DELETE FROM one_time_prekeys
                   WHERE user_row = ?1 AND key_id =
                       (SELECT MIN(key_id) FROM one_time_prekeys WHERE user_row = ?1)
                   RETURNING key_id, public_key""",
                (user_row,),
            ).fetchone()
        return None if row is None else OneTimePrekey(row[0], row[1])

    def add_one_time_prekeys(
        self, user_id: str, keys: list[OneTimePrekey], cap: int, audit: AuditRecord
    ) -> int:
        with self._db.write() as conn:
            user_row = self._active_row(conn, user_id)
            current = conn.execute(
                "SELECT COUNT(*) FROM one_time_prekeys WHERE user_row = ?", (user_row,)
            ).fetchone()[0]
            if current + len(keys) > cap:
                raise PoolFull(current, cap)
            try:
                conn.executemany(
                    "INSERT INTO one_time_prekeys (user_row, key_id, public_key) VALUES (?, ?, ?)",
                    [(user_row, k.key_id, k.public_key) for k in keys],
                )
            except sqlite3.IntegrityError:
                raise PrekeyIdsInUse from None
            self._outbox.add(conn, audit)
            return int(current) + len(keys)

    def set_prekeys(
        self, user_id: str, signed: SignedKey, pq: SignedKey | None, audit: AuditRecord
    ) -> None:
        with self._db.write() as conn:
            user_row = self._active_row(conn, user_id)
            conn.execute(
                """UPDATE users SET signed_prekey_id = ?, signed_prekey = ?, signed_prekey_sig = ?
                   WHERE id = ?""",
                (signed.key_id, signed.public_key, signed.signature, user_row),
            )
            if pq is not None:
                conn.execute(
                    """UPDATE users SET pq_prekey_id = ?, pq_prekey = ?, pq_prekey_sig = ?
                       WHERE id = ?""",
                    (pq.key_id, pq.public_key, pq.signature, user_row),
                )
            self._outbox.add(conn, audit)

    def record_login(self, user_id: str, when: float) -> None:
        with self._db.write() as conn:
            cursor = conn.execute(
                "UPDATE users SET last_login_time = MAX(COALESCE(last_login_time, 0), ?)"  # noqa: S608
                f" WHERE {self._user_match} AND deactivate_time IS NULL",
                (when, *self._index.candidates(user_id)),
            )
            if cursor.rowcount != 1:
                raise NoSuchUser

    def deactivate(self, user_id: str, when: float, audit: AuditRecord) -> float:
        with self._db.write() as conn:
            row = conn.execute(
                f"SELECT id, deactivate_time FROM users WHERE {self._user_match}",  # noqa: S608
                self._index.candidates(user_id),
            ).fetchone()
            if row is None:
                raise NoSuchUser(active=False)
            user_row, already = row
            if already is not None:
                return float(already)
            conn.execute("UPDATE users SET deactivate_time = ? WHERE id = ?", (when, user_row))
            conn.execute("DELETE FROM one_time_prekeys WHERE user_row = ?", (user_row,))
            # A closed account keeps no secrets (recovery codes go with their row).
            conn.execute("DELETE FROM factors WHERE user_row = ?", (user_row,))
            self._outbox.add(conn, audit)
            return when

    def replace_keys(self, user_id: str, keys: NewKeys, audit: AuditRecord) -> int:
        with self._db.write() as conn:
            user_row = self._active_row(conn, user_id)
            conn.execute(
                """UPDATE users SET identity_key = ?, verify_key = ?, signed_prekey_id = ?,
                       signed_prekey = ?, signed_prekey_sig = ?, pq_prekey_id = ?,
                       pq_prekey = ?, pq_prekey_sig = ?
                   WHERE id = ?""",
                (
                    keys.identity_key,
                    keys.verify_key,
                    keys.signed_prekey.key_id,
                    keys.signed_prekey.public_key,
                    keys.signed_prekey.signature,
                    keys.pq_prekey.key_id,
                    keys.pq_prekey.public_key,
                    keys.pq_prekey.signature,
                    user_row,
                ),
            )
            # The old one-time prekeys belong to the lost device's private keys.
            discarded = conn.execute(
                "DELETE FROM one_time_prekeys WHERE user_row = ?", (user_row,)
            ).rowcount
            try:
                conn.executemany(
                    "INSERT INTO one_time_prekeys (user_row, key_id, public_key) VALUES (?, ?, ?)",
                    [(user_row, k.key_id, k.public_key) for k in keys.one_time_prekeys],
                )
            except sqlite3.IntegrityError:
                raise PrekeyIdsInUse from None
            self._outbox.add(conn, audit)
            return int(discarded)

    def counts(self) -> IdentityCounts:
        with self._db.read() as conn:
            registered, active = conn.execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE deactivate_time IS NULL) FROM users"
            ).fetchone()
            prekeys = conn.execute("SELECT COUNT(*) FROM one_time_prekeys").fetchone()[0]
            without = conn.execute(
                """SELECT COUNT(*) FROM users WHERE deactivate_time IS NULL AND NOT EXISTS
                   (SELECT 1 FROM one_time_prekeys WHERE user_row = users.id)"""
            ).fetchone()[0]
        return IdentityCounts(registered, active, registered - active, prekeys, without)
