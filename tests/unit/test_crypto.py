"""Field encryption: round trip, tampering, misplaced ciphertexts, wrong keys."""

from __future__ import annotations

import pytest

from services.common import crypto
from services.common.errors import IntegrityError


def keyring(secret: str = "correct horse battery staple", version: int = 1) -> crypto.Keyring:  # noqa: S107
    root = crypto.derive_root_key(secret, b"\x00" * 16, 100_000)
    return crypto.Keyring("identity", [crypto.KeyVersion(version, root)], primary=version)


KEYS = keyring()
ALIAS = KEYS.field("users", "alias")


def test_round_trip() -> None:
    blob = ALIAS.encrypt_text("Alice", b"row-1")
    assert ALIAS.decrypt_text(blob, b"row-1") == "Alice"
    assert b"Alice" not in blob


def test_every_encryption_uses_a_fresh_nonce() -> None:
    assert ALIAS.encrypt_text("Alice", b"row-1") != ALIAS.encrypt_text("Alice", b"row-1")


def test_ciphertext_layout_is_format_version_nonce_body() -> None:
    blob = ALIAS.encrypt(b"12345", b"row")
    assert blob[0] == crypto.FORMAT_V1
    assert int.from_bytes(blob[1:5], "big") == 1
    assert len(blob) == crypto.OVERHEAD + 5


@pytest.mark.parametrize("position", [0, 3, 6, 20, -1])
def test_any_flipped_byte_is_an_integrity_error(position: int) -> None:
    blob = bytearray(ALIAS.encrypt_text("Alice", b"row-1"))
    blob[position] ^= 0x01
    with pytest.raises(IntegrityError):
        ALIAS.decrypt(bytes(blob), b"row-1")


def test_a_ciphertext_moved_to_another_row_fails() -> None:
    blob = ALIAS.encrypt_text("Alice", b"row-1")
    with pytest.raises(IntegrityError) as error:
        ALIAS.decrypt(blob, b"row-2")
    assert "authentication failed" in error.value.detail


def test_a_ciphertext_moved_to_another_column_fails() -> None:
    blob = ALIAS.encrypt_text("Alice", b"row-1")
    with pytest.raises(IntegrityError):
        KEYS.field("users", "metadata").decrypt(blob, b"row-1")


def test_another_services_key_cannot_decrypt() -> None:
    root = crypto.derive_root_key("correct horse battery staple", b"\x00" * 16, 100_000)
    session = crypto.Keyring("session", [crypto.KeyVersion(1, root)], primary=1)
    with pytest.raises(IntegrityError):
        session.field("users", "alias").decrypt(ALIAS.encrypt_text("A", b"r"), b"r")


def test_a_wrong_master_key_fails() -> None:
    blob = ALIAS.encrypt_text("Alice", b"row-1")
    with pytest.raises(IntegrityError):
        keyring("another secret entirely").field("users", "alias").decrypt(blob, b"row-1")


def test_an_unknown_key_version_is_reported() -> None:
    blob = keyring(version=7).field("users", "alias").encrypt_text("Alice", b"r")
    with pytest.raises(IntegrityError) as error:
        ALIAS.decrypt(blob, b"r")
    assert "key version 7 is not loaded" in error.value.detail


def test_truncated_ciphertext_fails_cleanly() -> None:
    with pytest.raises(IntegrityError) as error:
        ALIAS.decrypt(b"\x01\x00", b"r")
    assert "too short" in error.value.detail


def test_blind_index_is_deterministic_keyed_and_per_purpose() -> None:
    index = KEYS.blind_index("users.user_id")
    assert index("alice") == index("alice")
    assert index("alice") != index("alicf")
    assert index("alice") != keyring("other secret value").blind_index("users.user_id")("alice")
    assert index("alice") != KEYS.blind_index("sessions.user_id")("alice")


def test_key_check_value_distinguishes_keys() -> None:
    salt = b"\x01" * 16
    right = crypto.derive_root_key("right key material", salt, 100_000)
    wrong = crypto.derive_root_key("wrong key material", salt, 100_000)
    assert crypto.key_check_value(right) == crypto.key_check_value(right)
    assert crypto.key_check_value(right) != crypto.key_check_value(wrong)


ROWS = KEYS.mac("row/users")


def test_a_mac_tag_authenticates_exactly_its_values() -> None:
    tag = ROWS.tag(b"index", b"verify key", 7, None, 1.5)
    ROWS.check(tag, b"index", b"verify key", 7, None, 1.5)
    assert len(tag) == crypto.MAC_TAG_BYTES
    for changed in (
        (b"index", b"other key", 7, None, 1.5),
        (b"index", b"verify key", 8, None, 1.5),
        (b"index", b"verify key", 7, 0.0, 1.5),
        (b"index", b"verify key", 7, None),
        (b"index", b"verify keyy", 7, None, 1.5),
    ):
        with pytest.raises(IntegrityError) as error:
            ROWS.check(tag, *changed)
        assert error.value.detail.startswith("identity.row/users: authentication tag")


def test_mac_values_of_different_types_never_stand_in_for_each_other() -> None:
    assert not ROWS.valid(ROWS.tag(1), "1")
    assert not ROWS.valid(ROWS.tag(1), 1.0)
    assert not ROWS.valid(ROWS.tag(b"ab", b"c"), b"a", b"bc")


def test_a_tag_from_another_purpose_key_or_master_key_is_refused() -> None:
    tag = ROWS.tag(b"row")
    assert not KEYS.mac("row/sessions").valid(tag, b"row")
    assert not keyring("another master secret").mac("row/users").valid(tag, b"row")
    assert not ROWS.valid(None, b"row")
    assert not ROWS.valid(tag[:-1], b"row")


def test_tags_of_an_old_key_version_verify_during_rotation_and_new_ones_use_the_primary() -> None:
    old_root = crypto.derive_root_key("correct horse battery staple", b"\x00" * 16, 100_000)
    new_root = crypto.derive_root_key("a brand new master secret", b"\x01" * 16, 100_000)
    old = crypto.Keyring("identity", [crypto.KeyVersion(1, old_root)], primary=1).mac("p")
    both = crypto.Keyring(
        "identity", [crypto.KeyVersion(1, old_root), crypto.KeyVersion(2, new_root)], primary=2
    ).mac("p")
    old_tag = old.tag(b"v")
    both.check(old_tag, b"v")
    assert crypto.Mac.version_of(old_tag) == 1
    assert crypto.Mac.version_of(both.tag(b"v")) == 2
