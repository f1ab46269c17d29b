"""Field encryption at its edges: empty values, one keyring serving many columns, and
what an integrity failure tells the operator (the log detail and the alert's metric)."""

from __future__ import annotations

import pytest

from services.common import metrics
from services.common.crypto import OVERHEAD, Keyring, KeyVersion, derive_root_key
from services.common.errors import IntegrityError

ROOT = derive_root_key("edge master key", bytes(16), 1000)


def keyring() -> Keyring:
    return Keyring("identity", [KeyVersion(1, ROOT)], 1)


def failures(label: str) -> float:
    return metrics.INTEGRITY_FAILURES.labels(label)._value.get()  # type: ignore[no-any-return]


def test_an_empty_value_round_trips_at_exactly_the_overhead() -> None:
    cipher = keyring().field("users", "alias")
    blob = cipher.encrypt(b"", b"row")
    assert len(blob) == OVERHEAD
    assert cipher.decrypt(blob, b"row") == b""
    assert cipher.decrypt_text(cipher.encrypt_text("", b"row"), b"row") == ""


def test_one_keyring_keeps_a_cipher_per_column_and_binds_each_to_it() -> None:
    ring = keyring()
    alias, metadata = ring.field("users", "alias"), ring.field("users", "metadata")
    assert ring.field("users", "alias") is alias  # derived once
    assert metadata is not alias
    blob = alias.encrypt(b"Alice", b"row")
    with pytest.raises(IntegrityError):
        metadata.decrypt(blob, b"row")
    with pytest.raises(IntegrityError):
        ring.field("sessions", "alias").decrypt(blob, b"row")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda blob: blob[: OVERHEAD - 1], "ciphertext too short"),
        (lambda blob: b"\x02" + blob[1:], "unknown ciphertext format 2"),
        (lambda blob: blob[:1] + b"\x00\x00\x00\x09" + blob[5:], "key version 9 is not loaded"),
        (lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]), "authentication failed"),
    ],
)
def test_a_failure_names_its_column_and_reason_and_raises_the_alert_metric(
    damage: object, reason: str
) -> None:
    cipher = keyring().field("users", "alias")
    blob = cipher.encrypt(b"Alice", b"row")
    before = failures("identity.users.alias")
    with pytest.raises(IntegrityError) as error:
        cipher.decrypt(damage(blob), b"row")  # type: ignore[operator]
    assert error.value.detail.startswith(f"identity.users.alias: {reason}")
    assert "Alice" not in error.value.detail
    assert failures("identity.users.alias") == before + 1


def test_a_keyring_needs_its_primary_version_loaded() -> None:
    with pytest.raises(ValueError, match="primary key version must be among the loaded"):
        Keyring("identity", [KeyVersion(1, ROOT)], 2)


def test_reencrypting_moves_a_value_to_the_primary_version_and_a_new_row_key() -> None:
    old_root = derive_root_key("old edge master key", bytes(16), 1000)
    old = Keyring("identity", [KeyVersion(1, old_root)], 1).field("users", "alias")
    both = Keyring("identity", [KeyVersion(1, old_root), KeyVersion(2, ROOT)], 2)
    moved = both.field("users", "alias").reencrypt(old.encrypt(b"Alice", b"a"), b"a", b"b")
    assert moved[1:5] == b"\x00\x00\x00\x02"
    new_only = Keyring("identity", [KeyVersion(2, ROOT)], 2).field("users", "alias")
    assert new_only.decrypt(moved, b"b") == b"Alice"
    with pytest.raises(IntegrityError):
        new_only.decrypt(moved, b"a")
