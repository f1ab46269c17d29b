"""Identity storage: users and one-time prekeys in an encrypted SQLite file.

What a stolen file shows: public keys, key ids, whether each account is active and how
many prekeys each row has. User ids, aliases, metadata and the creation, last-login and
deactivation times exist only as ChaCha20-Poly1305 ciphertext bound to their row (the
times would otherwise equal audit events' times and tie each row to its user's events
in audit.db); rows are found through a blind index (HMAC of the user id).

Every users row carries a MAC (purpose key `mac/row/users`) over all its columns, and
every one-time prekey one (`mac/row/one_time_prekeys`) over its owner's row id, key id
and key: a verify key copied from another account, a prekey swapped in, an account
reactivated or any edited column makes the row fail with IntegrityError (DATA_LOSS)
wherever it is read, and writes check a row before changing it. Each registration also
writes the account's sealed factors row (factor_sealing.py), so that a deleted one is
noticed. Not covered: a whole row deleted, or put back from an older copy of the file.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Mapping
from typing import Any

from services.common.audit_events import AuditRecord
from services.common.crypto import Keyring
from services.common.errors import IntegrityError
from services.common.outbox import OUTBOX_NUMBERING_TABLE, OUTBOX_TABLE, SqliteOutbox
from services.common.rotation import EncryptedTable, Reindex, Rotatable, RowMac
from services.common.sqlite import Database, Migration, RowSealing, any_of
from services.identity.factor_sealing import FactorSealing
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import (
    IdentityCounts,
    NewKeys,
    NewUser,
    NoSuchUser,
    PendingRevocation,
    PoolFull,
    PrekeyIdsInUse,
    User,
    UserIdTaken,
)
from services.identity.sealing import (
    DEACTIVATED,
    NONE,
    TIMES,
    USER_COLUMNS,
    UserSealing,
    prekey_values,
    user_values,
)

# Authentication factors (services/identity/factor_store.py): secrets sealed per row,
# recovery codes as HMACs under a sealed per-user key, the last accepted TOTP step and
# the password budget in the clear; since FACTOR_MACS_SINCE all under the row's MAC.
ROW_MACS_SINCE = 4
FACTOR_MACS_SINCE = 7

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
    # Row MACs, and the times sealed (see SEALING, which upgrades older rows once). From
    # then on create_time holds 0, last_login_time NULL, and deactivate_time only says
    # whether the account is active (NULL) or not (0); the real times are in times_ct.
    Migration(
        ROW_MACS_SINCE,
        """
        ALTER TABLE users ADD COLUMN times_ct BLOB;
        ALTER TABLE users ADD COLUMN row_mac BLOB;
        ALTER TABLE one_time_prekeys ADD COLUMN row_mac BLOB;
        """,
    ),
    # Revocations owed to deactivated accounts, written with the deactivation and retried
    # until the session service has done them (services.identity.domain).
    Migration(
        5,
        """
        CREATE TABLE pending_revocations (
            id         INTEGER PRIMARY KEY,
            row_key    TEXT    NOT NULL,
            user_id_ct BLOB    NOT NULL
        ) STRICT;
        """,
    ),
    Migration(6, OUTBOX_NUMBERING_TABLE),
    # Factors row MACs (see services/identity/factor_sealing.py): every column of a
    # factors row, and the set of its recovery codes, under one MAC; rows from before are
    # sealed, and active accounts without a row given an empty one, by SEALING.
    Migration(
        FACTOR_MACS_SINCE,
        """
        ALTER TABLE factors ADD COLUMN recovery_set BLOB;
        ALTER TABLE factors ADD COLUMN row_mac BLOB;
        """,
    ),
]


def _row(row: sqlite3.Row) -> dict[str, Any]:
    return {key: row[key] for key in row.keys()}  # noqa: SIM118 - a Row, not a dict


def _seal_legacy(conn: sqlite3.Connection, keyring: Keyring) -> int:
    """Rows from before row MACs: times move into times_ct (the plaintext columns keep
    only whether the account is active), then each row and prekey gets its MAC."""
    times = keyring.field("users", "times")
    users = keyring.mac("row/users")
    prekeys = keyring.mac("row/one_time_prekeys")
    rows = conn.execute("SELECT * FROM users WHERE row_mac IS NULL").fetchall()
    for legacy in rows:
        row = _row(legacy)
        sealed = TIMES.pack(
            row["create_time"],
            NONE if row["last_login_time"] is None else row["last_login_time"],
            NONE if row["deactivate_time"] is None else row["deactivate_time"],
        )
        row["times_ct"] = times.encrypt(sealed, row["user_index"])
        row["create_time"], row["last_login_time"] = 0.0, None
        if row["deactivate_time"] is not None:
            row["deactivate_time"] = DEACTIVATED
        row["row_mac"] = users.tag(*user_values(row))
        conn.execute(
            """UPDATE users SET times_ct = :times_ct, create_time = :create_time,
                   last_login_time = :last_login_time, deactivate_time = :deactivate_time,
                   row_mac = :row_mac WHERE id = :id""",
            row,
        )
    keys = conn.execute("SELECT * FROM one_time_prekeys WHERE row_mac IS NULL").fetchall()
    conn.executemany(
        "UPDATE one_time_prekeys SET row_mac = ? WHERE user_row = ? AND key_id = ?",
        [(prekeys.tag(*prekey_values(k)), k["user_row"], k["key_id"]) for k in keys],
    )
    return len(rows) + len(keys)


def _insert_factors(conn: sqlite3.Connection, row: Mapping[str, Any]) -> None:
    """Writes a new account's sealed factors row (FactorSealing.new_row)."""
    columns = ", ".join(row)
    values = ", ".join(f":{column}" for column in row)
    conn.execute(f"INSERT INTO factors ({columns}) VALUES ({values})", row)  # noqa: S608


def _seal_legacy_factors(conn: sqlite3.Connection, keyring: Keyring) -> int:
    """Factors rows from before their MACs get one, as they are, and every active account
    without a row gets an empty one (once, at the upgrade: see SEALING)."""
    sealing = FactorSealing(keyring)
    rows = conn.execute("SELECT * FROM factors WHERE row_mac IS NULL").fetchall()
    for row in rows:
        digests = conn.execute(
            "SELECT digest FROM recovery_codes WHERE user_row = ?", (row["user_row"],)
        ).fetchall()
        sealed = sealing.legacy(_row(row), [bytes(d[0]) for d in digests])
        conn.execute(
            "UPDATE factors SET recovery_set = :recovery_set, row_mac = :row_mac"
            " WHERE user_row = :user_row",
            sealed,
        )
    missing = conn.execute(
        "SELECT id FROM users WHERE deactivate_time IS NULL"
        " AND id NOT IN (SELECT user_row FROM factors)"
    ).fetchall()
    for (user_row,) in missing:
        _insert_factors(conn, sealing.new_row(int(user_row)))
    return len(rows) + len(missing)


SEALING = RowSealing(
    ROW_MACS_SINCE,
    _seal_legacy,
    later=[RowSealing(FACTOR_MACS_SINCE, _seal_legacy_factors)],
)


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
        self._times = keyring.field("users", "times")
        self._sealing = UserSealing(keyring)  # the row format, shared with PostgreSQL
        self._factors = FactorSealing(keyring)
        self._revoke_user = keyring.field("pending_revocations", "user_id")
        self._user_mac = keyring.mac("row/users")
        self._prekey_mac = keyring.mac("row/one_time_prekeys")

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
                ("times_ct", self._times),
            ],
            Reindex("user_index", self._index, "user_id_ct"),
            RowMac("row_mac", self._user_mac, user_values),
        )
        revocations = EncryptedTable(
            self._db,
            "pending_revocations",
            "id",
            "row_key",
            [("user_id_ct", self._revoke_user)],
        )
        prekeys = EncryptedTable(
            self._db,
            "one_time_prekeys",
            "user_row",
            "user_row",
            [],
            row_mac=RowMac("row_mac", self._prekey_mac, prekey_values),
            key_columns=("user_row", "key_id"),
        )
        return [users, prekeys, revocations]

    # Reading rows: every row's MAC is checked before anything in it is used.

    def _checked(self, row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        values = _row(row)
        self._user_mac.check(values["row_mac"], *user_values(values))
        return values

    def _find(
        self, conn: sqlite3.Connection, user_id: str, *, active: bool
    ) -> dict[str, Any] | None:
        query = f"SELECT {USER_COLUMNS} FROM users WHERE {self._user_match}"  # noqa: S608
        if active:
            query += " AND deactivate_time IS NULL"
        return self._checked(conn.execute(query, self._index.candidates(user_id)).fetchone())

    def _active_row(self, conn: sqlite3.Connection, user_id: str) -> dict[str, Any]:
        row = self._find(conn, user_id, active=True)
        if row is None:
            raise NoSuchUser
        return row

    def _rewrite(
        self, conn: sqlite3.Connection, current: dict[str, Any], change: dict[str, Any]
    ) -> dict[str, Any]:
        """Writes `change` into a checked row and seals the row again."""
        row = {**current, **change}
        row["row_mac"] = self._user_mac.tag(*user_values(row))
        assignments = ", ".join(f"{column} = :{column}" for column in (*change, "row_mac"))
        conn.execute(f"UPDATE users SET {assignments} WHERE id = :id", row)  # noqa: S608
        return row

    def _insert_prekeys(
        self, conn: sqlite3.Connection, user_row: int, keys: list[OneTimePrekey]
    ) -> None:
        rows = [
            {"user_row": user_row, "key_id": k.key_id, "public_key": k.public_key} for k in keys
        ]
        try:
            conn.executemany(
                """INSERT INTO one_time_prekeys (user_row, key_id, public_key, row_mac)
                   VALUES (?, ?, ?, ?)""",
                [
                    (r["user_row"], r["key_id"], r["public_key"],
                     self._prekey_mac.tag(*prekey_values(r)))
                    for r in rows
                ],
            )  # fmt: skip
        except sqlite3.IntegrityError:
            raise PrekeyIdsInUse from None

    def add_user(self, user: NewUser, audit: AuditRecord) -> None:
        candidates = self._index.candidates(user.user_id)
        row = self._sealing.new_row(user)
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
                           signed_prekey_sig, pq_prekey_id, pq_prekey, pq_prekey_sig,
                           create_time, last_login_time, deactivate_time, times_ct)
                       VALUES (:user_index, :user_id_ct, :alias_ct, :metadata_ct,
                           :identity_key, :verify_key, :signed_prekey_id, :signed_prekey,
                           :signed_prekey_sig, :pq_prekey_id, :pq_prekey, :pq_prekey_sig,
                           :create_time, :last_login_time, :deactivate_time, :times_ct)""",
                    row,
                )
            except sqlite3.IntegrityError:
                raise UserIdTaken from None
            # The MAC covers the row id, known only once the row is in.
            row["id"] = cursor.lastrowid
            conn.execute(
                "UPDATE users SET row_mac = ? WHERE id = ?",
                (self._user_mac.tag(*user_values(row)), row["id"]),
            )
            self._insert_prekeys(conn, int(row["id"]), user.one_time_prekeys)
            # Every active account has its factors row, so deleting one is noticed.
            _insert_factors(conn, self._factors.new_row(int(row["id"])))
            self._outbox.add(conn, audit)

    def get_user(self, user_id: str) -> User | None:
        with self._db.read() as conn:
            row = self._find(conn, user_id, active=False)
            if row is None:
                return None
            prekeys = conn.execute(
                "SELECT COUNT(*) FROM one_time_prekeys WHERE user_row = ?", (row["id"],)
            ).fetchone()[0]
        return self._sealing.open(row, int(prekeys))

    def get_verify_key(self, user_id: str) -> bytes | None:
        """An active user's verify key, once its row's MAC holds (the login hot path).

        An unknown user costs the same: another row is read and its MAC checked (and
        ignored), so that the login's timing does not tell the two apart.
        """
        with self._db.read(snapshot=False) as conn:
            row = self._find(conn, user_id, active=True)
            if row is None:
                decoy = conn.execute(f"SELECT {USER_COLUMNS} FROM users LIMIT 1").fetchone()  # noqa: S608
                if decoy is not None:
                    values = _row(decoy)
                    self._user_mac.valid(values["row_mac"], *user_values(values))
                return None
        return bytes(row["verify_key"])

    def is_active(self, user_id: str) -> bool | None:
        with self._db.read(snapshot=False) as conn:
            row = self._find(conn, user_id, active=False)
        return None if row is None else row["deactivate_time"] is None

    def take_one_time_prekey(self, user_id: str) -> OneTimePrekey | None:
        # One statement inside the single-writer transaction: two fetches can never
        # receive the same key. A key whose MAC fails rolls the deletion back.
        with self._db.write() as conn:
            user_row = self._active_row(conn, user_id)["id"]
            row = conn.execute(
                """DELETE FROM one_time_prekeys
                   WHERE user_row = ?1 AND key_id =
                       (SELECT MIN(key_id) FROM one_time_prekeys WHERE user_row = ?1)
                   RETURNING user_row, key_id, public_key, row_mac""",
                (user_row,),
            ).fetchone()
            if row is not None:
                self._prekey_mac.check(row["row_mac"], *prekey_values(row))
        return None if row is None else OneTimePrekey(row["key_id"], row["public_key"])

    def add_one_time_prekeys(
        self, user_id: str, keys: list[OneTimePrekey], cap: int, audit: AuditRecord
    ) -> int:
        with self._db.write() as conn:
            user_row = int(self._active_row(conn, user_id)["id"])
            current = conn.execute(
                "SELECT COUNT(*) FROM one_time_prekeys WHERE user_row = ?", (user_row,)
            ).fetchone()[0]
            if current + len(keys) > cap:
                raise PoolFull(current, cap)
            self._insert_prekeys(conn, user_row, keys)
            self._outbox.add(conn, audit)
            return int(current) + len(keys)

    def set_prekeys(
        self, user_id: str, signed: SignedKey, pq: SignedKey | None, audit: AuditRecord
    ) -> None:
        change: dict[str, Any] = {
            "signed_prekey_id": signed.key_id,
            "signed_prekey": signed.public_key,
            "signed_prekey_sig": signed.signature,
        }
        if pq is not None:
            change |= {
                "pq_prekey_id": pq.key_id,
                "pq_prekey": pq.public_key,
                "pq_prekey_sig": pq.signature,
            }
        with self._db.write() as conn:
            self._rewrite(conn, self._active_row(conn, user_id), change)
            self._outbox.add(conn, audit)

    def record_login(self, user_id: str, when: float) -> None:
        with self._db.write() as conn:
            row = self._active_row(conn, user_id)
            created, last_login, _ = self._sealing.times_of(row)
            latest = max(last_login or 0.0, when)
            self._rewrite(
                conn, row, {"times_ct": self._sealing.seal_times(row, created, latest, None)}
            )

    def deactivate(self, user_id: str, when: float, audit: AuditRecord) -> float:
        with self._db.write() as conn:
            row = self._find(conn, user_id, active=False)
            if row is None:
                raise NoSuchUser(active=False)
            created, last_login, already = self._sealing.times_of(row)
            if row["deactivate_time"] is not None:
                if already is None:
                    raise IntegrityError("identity.users: deactivated without a time")
                return already
            self._rewrite(
                conn,
                row,
                {
                    "deactivate_time": DEACTIVATED,
                    "times_ct": self._sealing.seal_times(row, created, last_login, when),
                },
            )
            conn.execute("DELETE FROM one_time_prekeys WHERE user_row = ?", (row["id"],))
            # A closed account keeps no secrets (recovery codes go with their row).
            conn.execute("DELETE FROM factors WHERE user_row = ?", (row["id"],))
            row_key = secrets.token_hex(16)
            conn.execute(
                "INSERT INTO pending_revocations (row_key, user_id_ct) VALUES (?, ?)",
                (row_key, self._revoke_user.encrypt_text(user_id, row_key.encode())),
            )
            self._outbox.add(conn, audit)
            return when

    def pending_revocations(self, limit: int) -> list[PendingRevocation]:
        with self._db.read() as conn:
            rows = conn.execute(
                "SELECT id, row_key, user_id_ct FROM pending_revocations ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            PendingRevocation(
                int(row["id"]),
                self._revoke_user.decrypt_text(row["user_id_ct"], row["row_key"].encode()),
            )
            for row in rows
        ]

    def revocation_done(self, revocation_id: int) -> None:
        with self._db.write() as conn:
            conn.execute("DELETE FROM pending_revocations WHERE id = ?", (revocation_id,))

    def replace_keys(self, user_id: str, keys: NewKeys, audit: AuditRecord) -> int:
        change = {
            "identity_key": keys.identity_key,
            "verify_key": keys.verify_key,
            "signed_prekey_id": keys.signed_prekey.key_id,
            "signed_prekey": keys.signed_prekey.public_key,
            "signed_prekey_sig": keys.signed_prekey.signature,
            "pq_prekey_id": keys.pq_prekey.key_id,
            "pq_prekey": keys.pq_prekey.public_key,
            "pq_prekey_sig": keys.pq_prekey.signature,
        }
        with self._db.write() as conn:
            row = self._rewrite(conn, self._active_row(conn, user_id), change)
            # The old one-time prekeys belong to the lost device's private keys.
            discarded = conn.execute(
                "DELETE FROM one_time_prekeys WHERE user_row = ?", (row["id"],)
            ).rowcount
            self._insert_prekeys(conn, int(row["id"]), keys.one_time_prekeys)
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
