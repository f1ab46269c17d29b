"""Known answers: what this release derives and writes must stay readable by the next.

Every stored ciphertext, blind index and audit link depends on exact derivations (PBKDF2,
HKDF labels, associated data, length-prefixed encodings). A change to any of them leaves
every existing file unreadable, and a test that derives and checks with the same changed
code cannot notice. These vectors were computed once by this code; they must never
change (a new format is a new version beside the old one, not an edit).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from services.audit.chain import GENESIS, Chain, ChainedRow, canonical
from services.common.crypto import (
    MAX_SEAL_LEVEL,
    Keyring,
    KeyVersion,
    derive_root_key,
    key_check_value,
)
from services.common.errors import IntegrityError

SALT = bytes(range(16))
ROOT = derive_root_key("known answer master key", SALT, 1000)
OLD_ROOT = derive_root_key("previous master key", SALT, 1000)
KEYRING = Keyring("identity", [KeyVersion(1, OLD_ROOT), KeyVersion(2, ROOT)], 2)
ROW = ChainedRow(
    7, "event-7", "user_login", "session", b"\x01" * 32, b"\x02" * 40, b"\x03" * 50,
    1700000000.25, 1700000001.5,
)  # fmt: skip


def test_the_root_key_and_the_key_check_value() -> None:
    assert ROOT.hex() == "cd50ce79206c917db4dd75f36f23d963e0a71fb068673b9df3dbd66d44133174"
    assert key_check_value(ROOT).hex() == (
        "65d898e700dffac134b9f73e51684b421e1d93bbc1599f80413282443bb6e7d6"
    )
    # Level 1 (rows sealed, before factors rows had MACs) is the value databases already
    # hold; each later level is a value of its own.
    assert key_check_value(ROOT, sealed=1).hex() == (
        "6d86eae0fd698812486e6741b28201d836a4aec24d2675526d2b85d20d023b19"
    )
    levels = {key_check_value(ROOT, sealed=n) for n in range(MAX_SEAL_LEVEL + 1)}
    assert len(levels) == MAX_SEAL_LEVEL + 1


def test_a_ciphertext_written_by_this_release_decrypts() -> None:
    written = bytes.fromhex(
        "0100000001849b2aed0400864fad4b3aea049a93af4be6e84244a3cdc69546e9109a321fc7e1d0a7cfc1"
        "4b480a79"
    )  # identity.users.alias of row key b"row-key", key version 1
    cipher = Keyring("identity", [KeyVersion(1, ROOT)], 1).field("users", "alias")
    assert cipher.decrypt(written, b"row-key") == b"Alice Liddell"
    with pytest.raises(IntegrityError):
        cipher.decrypt(written, b"other-row")
    with pytest.raises(IntegrityError):
        Keyring("session", [KeyVersion(1, ROOT)], 1).field("users", "alias").decrypt(
            written, b"row-key"
        )


def test_blind_indexes_under_every_loaded_version() -> None:
    index = KEYRING.blind_index("users.user_id")
    new = "8f23e4fa871693c730fd1796b734e0de840bf47e71cac271aecdfa5824aeacdc"
    old = "d18bb00aa7b093e612e9e76e4a5ac92571fbb066a861f11ef5262ad49e78da52"
    assert index("alice").hex() == new
    assert [c.hex() for c in index.candidates("alice")] == [new, old]  # primary first
    assert index.versions == 2


def test_chain_keys_and_an_audit_link() -> None:
    keys = KEYRING.chain_keys()
    assert {v: k.hex() for v, k in keys.items()} == {
        1: "8043ae4d8c92b42a8990341e75100f242b6882b4f9b050d2c61b9b0dca7d96ba",
        2: "37c10687c00ad7f71566f06a727e5983648141506a7a6cce40c319c9df2c3f45",
    }
    chain = Chain(keys, 2)
    assert chain.link(GENESIS, ROW).hex() == (
        "3309514c815a92947bebafac219815c9c27040eb92df28045c7d94cdbe586357"
    )
    anonymous = dataclasses.replace(ROW, user_index=None, user_id_ct=None)
    assert chain.link(GENESIS, anonymous).hex() == (
        "4cd676e834fef8fa09b812591f4a4c6c6cffb90b78a691175136447dbd1a75f3"
    )


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ChainedRow)])
def test_every_stored_field_changes_the_link(field: str) -> None:
    value = getattr(ROW, field)
    if value is None:  # a field older rows lack: setting it must change the link too
        changed: Any = 1 if field == "source_sequence" else "0" * 32
    elif isinstance(value, bytes):
        changed = value[:-1] + bytes([value[-1] ^ 1])
    elif isinstance(value, str):
        changed = value + "x"
    else:
        changed = value + 1
    chain = Chain(KEYRING.chain_keys(), 2)
    edited = dataclasses.replace(ROW, **{field: changed})
    assert canonical(edited) != canonical(ROW)
    assert chain.link(GENESIS, edited) != chain.link(GENESIS, ROW)


def test_no_two_rows_encode_alike_when_bytes_move_between_fields() -> None:
    shifted = dataclasses.replace(ROW, event_id="event-", action="7user_login")
    assert canonical(shifted) != canonical(ROW)
    chain = Chain(KEYRING.chain_keys(), 2)
    assert chain.link(GENESIS, shifted) != chain.link(GENESIS, ROW)
    assert chain.link(bytes(31) + b"\x01", ROW) != chain.link(GENESIS, ROW)  # chained on
