"""How a user becomes columns and back: the same bytes on every storage backend.

Both stores (SQLite and PostgreSQL) seal and open users here, so a row copied from one
to the other decrypts unchanged: the same blind index, the same ciphers, the same
associated data (table "users", the column, the row's blind index, the key version).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from services.common.crypto import FieldCipher, Keyring
from services.common.rotation import Reindex
from services.identity.keys import SignedKey
from services.identity.model import NewUser, User

# Columns written at registration, in this order (see `UserSealing.seal`).
INSERT_COLUMNS = (
    "user_index",
    "user_id_ct",
    "alias_ct",
    "metadata_ct",
    "identity_key",
    "verify_key",
    "signed_prekey_id",
    "signed_prekey",
    "signed_prekey_sig",
    "pq_prekey_id",
    "pq_prekey",
    "pq_prekey_sig",
    "create_time",
)


class UserSealing:
    def __init__(self, keyring: Keyring) -> None:
        self.index = keyring.blind_index("users.user_id")
        self.user_id = keyring.field("users", "user_id")
        self.alias = keyring.field("users", "alias")
        self.metadata = keyring.field("users", "metadata")

    def seal(self, user: NewUser) -> tuple[object, ...]:
        """Values for INSERT_COLUMNS: the id, alias and metadata encrypted under the row's
        blind index as row key."""
        index = self.index(user.user_id)
        metadata = json.dumps(user.metadata, sort_keys=True, separators=(",", ":"))
        return (
            index,
            self.user_id.encrypt_text(user.user_id, index),
            self.alias.encrypt_text(user.alias, index),
            self.metadata.encrypt_text(metadata, index),
            user.identity_key,
            user.verify_key,
            user.signed_prekey.key_id,
            user.signed_prekey.public_key,
            user.signed_prekey.signature,
            user.pq_prekey.key_id,
            user.pq_prekey.public_key,
            user.pq_prekey.signature,
            user.create_time,
        )

    def open(self, row: Mapping[str, Any]) -> User:
        """A user from a row with the users columns and `prekeys` (the pool's size)."""
        index = bytes(row["user_index"])
        return User(
            user_id=self.user_id.decrypt_text(bytes(row["user_id_ct"]), index),
            alias=self.alias.decrypt_text(bytes(row["alias_ct"]), index),
            metadata=json.loads(self.metadata.decrypt_text(bytes(row["metadata_ct"]), index)),
            identity_key=bytes(row["identity_key"]),
            verify_key=bytes(row["verify_key"]),
            signed_prekey=SignedKey(
                int(row["signed_prekey_id"]),
                bytes(row["signed_prekey"]),
                bytes(row["signed_prekey_sig"]),
            ),
            pq_prekey=SignedKey(
                int(row["pq_prekey_id"]), bytes(row["pq_prekey"]), bytes(row["pq_prekey_sig"])
            ),
            create_time=float(row["create_time"]),
            last_login_time=row["last_login_time"],
            deactivate_time=row["deactivate_time"],
            one_time_prekey_count=int(row["prekeys"]),
        )

    def encrypted_fields(self) -> list[tuple[str, FieldCipher]]:
        """Encrypted columns, for key rotation."""
        return [
            ("user_id_ct", self.user_id),
            ("alias_ct", self.alias),
            ("metadata_ct", self.metadata),
        ]

    def reindex(self) -> Reindex:
        """The blind index is recomputed (and becomes the new row key) during rotation."""
        return Reindex("user_index", self.index, "user_id_ct")
