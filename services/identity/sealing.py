"""How a user becomes a row and back: the same bytes and MACs on every storage backend.

Both stores (SQLite and PostgreSQL) build, seal, check and open rows here, so a row copied
from one to the other still opens and its MAC still holds: the same blind index, the same
ciphers and associated data (table, column, the row's blind index as row key, key
version), the same MAC purpose keys over the same values. The layout is SQLite's
(services/identity/store.py): create_time 0, last_login_time NULL and deactivate_time
NULL (active) or 0 (closed) in the clear, the real times sealed in times_ct.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

from services.common.crypto import FieldCipher, Keyring, MacValue
from services.common.rotation import Reindex, RowLike
from services.identity.keys import SignedKey
from services.identity.model import NewUser, User

TIMES = struct.Struct(">ddd")  # creation, last login, deactivation; -1 for none
NONE = -1.0
DEACTIVATED = 0.0  # what deactivate_time holds once an account is closed

USER_COLUMNS = """
    id, user_index, user_id_ct, alias_ct, metadata_ct, identity_key, verify_key,
    signed_prekey_id, signed_prekey, signed_prekey_sig, pq_prekey_id, pq_prekey, pq_prekey_sig,
    create_time, last_login_time, deactivate_time, times_ct, row_mac
"""


def user_values(row: RowLike) -> tuple[MacValue, ...]:
    """What a users row's MAC covers: every column but the MAC."""
    return (
        row["id"],
        row["user_index"],
        row["user_id_ct"],
        row["alias_ct"],
        row["metadata_ct"],
        row["identity_key"],
        row["verify_key"],
        row["signed_prekey_id"],
        row["signed_prekey"],
        row["signed_prekey_sig"],
        row["pq_prekey_id"],
        row["pq_prekey"],
        row["pq_prekey_sig"],
        row["create_time"],
        row["last_login_time"],
        row["deactivate_time"],
        row["times_ct"],
    )


def prekey_values(row: RowLike) -> tuple[MacValue, ...]:
    """What a one-time prekey's MAC covers: its owner's row id, key id and key."""
    return (row["user_row"], row["key_id"], row["public_key"])


def or_none(value: float) -> float | None:
    return None if value == NONE else value


class UserSealing:
    """The ciphers and MACs of identity's rows under one keyring."""

    def __init__(self, keyring: Keyring) -> None:
        self.index = keyring.blind_index("users.user_id")
        self.user_id = keyring.field("users", "user_id")
        self.alias = keyring.field("users", "alias")
        self.metadata = keyring.field("users", "metadata")
        self.times = keyring.field("users", "times")
        self.user_mac = keyring.mac("row/users")
        self.prekey_mac = keyring.mac("row/one_time_prekeys")

    def new_row(self, user: NewUser) -> dict[str, Any]:
        """A registration's users row, all but its id and MAC (the MAC covers the id)."""
        index = self.index(user.user_id)
        metadata = json.dumps(user.metadata, sort_keys=True, separators=(",", ":"))
        row: dict[str, Any] = {
            "user_index": index,
            "user_id_ct": self.user_id.encrypt_text(user.user_id, index),
            "alias_ct": self.alias.encrypt_text(user.alias, index),
            "metadata_ct": self.metadata.encrypt_text(metadata, index),
            "identity_key": user.identity_key,
            "verify_key": user.verify_key,
            "signed_prekey_id": user.signed_prekey.key_id,
            "signed_prekey": user.signed_prekey.public_key,
            "signed_prekey_sig": user.signed_prekey.signature,
            "pq_prekey_id": user.pq_prekey.key_id,
            "pq_prekey": user.pq_prekey.public_key,
            "pq_prekey_sig": user.pq_prekey.signature,
            "create_time": 0.0,
            "last_login_time": None,
            "deactivate_time": None,
        }
        row["times_ct"] = self.seal_times(row, user.create_time, None, None)
        return row

    def tag(self, row: RowLike) -> bytes:
        return self.user_mac.tag(*user_values(row))

    def check(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row as a dict, once its MAC holds; IntegrityError otherwise."""
        values = dict(row)
        self.user_mac.check(values["row_mac"], *user_values(values))
        return values

    def prekey_tag(self, user_row: int, key_id: int, public_key: bytes) -> bytes:
        return self.prekey_mac.tag(user_row, key_id, public_key)

    def times_of(self, row: Mapping[str, Any]) -> tuple[float, float | None, float | None]:
        created, last_login, deactivated = TIMES.unpack(
            self.times.decrypt(row["times_ct"], row["user_index"])
        )
        return created, or_none(last_login), or_none(deactivated)

    def seal_times(
        self, row: Mapping[str, Any], created: float, last: float | None, closed: float | None
    ) -> bytes:
        packed = TIMES.pack(
            created, NONE if last is None else last, NONE if closed is None else closed
        )
        return self.times.encrypt(packed, row["user_index"])

    def open(self, row: Mapping[str, Any], prekeys: int) -> User:
        """The user in a checked row with `prekeys` one-time prekeys in its pool."""
        index = row["user_index"]
        created, last_login, deactivated = self.times_of(row)
        return User(
            user_id=self.user_id.decrypt_text(row["user_id_ct"], index),
            alias=self.alias.decrypt_text(row["alias_ct"], index),
            metadata=json.loads(self.metadata.decrypt_text(row["metadata_ct"], index)),
            identity_key=row["identity_key"],
            verify_key=row["verify_key"],
            signed_prekey=SignedKey(
                row["signed_prekey_id"], row["signed_prekey"], row["signed_prekey_sig"]
            ),
            pq_prekey=SignedKey(row["pq_prekey_id"], row["pq_prekey"], row["pq_prekey_sig"]),
            create_time=created,
            last_login_time=last_login,
            deactivate_time=deactivated,
            one_time_prekey_count=prekeys,
        )

    def encrypted_fields(self) -> list[tuple[str, FieldCipher]]:
        """Encrypted columns of users, for key rotation (all keyed by the blind index)."""
        return [
            ("user_id_ct", self.user_id),
            ("alias_ct", self.alias),
            ("metadata_ct", self.metadata),
            ("times_ct", self.times),
        ]

    def reindex(self) -> Reindex:
        """The blind index is recomputed (and becomes the new row key) during rotation."""
        return Reindex("user_index", self.index, "user_id_ct")
