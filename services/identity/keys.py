"""Public key bundle checks: lengths, signatures, and the server-side fingerprint.

The signed bytes and the fingerprint are wire protocol (see keys.proto), shared with
clients through services.protocol.signing.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey

from services.common import validation
from services.common.errors import InvalidArgument
from services.protocol import signing
from services.protocol.signing import ED25519_KEY_BYTES, ED25519_SIGNATURE_BYTES, X25519_KEY_BYTES
from services.protocol.signing import MLKEM768_KEY_BYTES as MLKEM768_KEY_BYTES
from services.protocol.signing import fingerprint as fingerprint


@dataclass(frozen=True)
class SignedKey:
    """A prekey signed by the user's verify key (the signed prekey or the PQ prekey)."""

    key_id: int
    public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class OneTimePrekey:
    key_id: int
    public_key: bytes


def check_identity_keys(identity_key: bytes, verify_key: bytes) -> Ed25519PublicKey:
    validation.exact_bytes(identity_key, "identity_key", X25519_KEY_BYTES)
    validation.exact_bytes(verify_key, "verify_key", ED25519_KEY_BYTES)
    try:
        return Ed25519PublicKey.from_public_bytes(verify_key)
    except ValueError:
        raise InvalidArgument("verify_key is not a valid Ed25519 public key") from None


def _verify(verifier: Ed25519PublicKey, signature: bytes, message: bytes, field: str) -> None:
    validation.exact_bytes(signature, f"{field}.signature", ED25519_SIGNATURE_BYTES)
    try:
        verifier.verify(signature, message)
    except InvalidSignature:
        raise InvalidArgument(
            f"{field}.signature does not verify under verify_key (see keys.proto for the "
            "signed bytes)"
        ) from None


def check_signed_prekey(verifier: Ed25519PublicKey, key: SignedKey | None) -> SignedKey:
    if key is None:
        raise InvalidArgument("signed_prekey is required")
    validation.exact_bytes(key.public_key, "signed_prekey.public_key", X25519_KEY_BYTES)
    _verify(
        verifier,
        key.signature,
        signing.signed_prekey_message(key.key_id, key.public_key),
        "signed_prekey",
    )
    return key


def check_pq_prekey(verifier: Ed25519PublicKey, key: SignedKey | None) -> SignedKey:
    if key is None:
        raise InvalidArgument("pq_prekey is required")
    validation.exact_bytes(key.public_key, "pq_prekey.public_key", MLKEM768_KEY_BYTES)
    try:
        MLKEM768PublicKey.from_public_bytes(key.public_key)
    except ValueError:
        raise InvalidArgument("pq_prekey.public_key is not a valid ML-KEM-768 key") from None
    _verify(
        verifier, key.signature, signing.pq_prekey_message(key.key_id, key.public_key), "pq_prekey"
    )
    return key


def check_one_time_prekeys(
    keys: list[OneTimePrekey], *, max_count: int, allow_empty: bool
) -> list[OneTimePrekey]:
    if not keys and not allow_empty:
        raise InvalidArgument("one_time_prekeys must hold at least one key")
    if len(keys) > max_count:
        raise InvalidArgument(
            f"one_time_prekeys holds {len(keys)} keys; at most {max_count} per request"
        )
    seen: set[int] = set()
    for index, key in enumerate(keys):
        validation.exact_bytes(
            key.public_key, f"one_time_prekeys[{index}].public_key", X25519_KEY_BYTES
        )
        if key.key_id in seen:
            raise InvalidArgument(f"one_time_prekeys[{index}].key_id {key.key_id} is repeated")
        seen.add(key.key_id)
    return keys
