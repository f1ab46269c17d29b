"""A demonstration of end-to-end encryption for the CLI: sealed boxes to an X25519 key.

Ephemeral X25519 + HKDF-SHA256 + ChaCha20-Poly1305. A real messenger runs X3DH/PQXDH
and the Double Ratchet on the bundles the identity service serves; the backend never
sees plaintext either way, which is what this shows.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"SecureMsg cli sealed box v1"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def seal(recipient_public: bytes, plaintext: bytes) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(*_RAW)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    nonce = os.urandom(12)
    key = _key(shared, ephemeral_public, recipient_public)
    return ephemeral_public + nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, None)


def open_sealed(recipient: X25519PrivateKey, box: bytes) -> bytes | None:
    """The plaintext, or None if the box was not sealed to this key or was altered."""
    if len(box) < 32 + 12 + 16:
        return None
    ephemeral_public, nonce, body = box[:32], box[32:44], box[44:]
    recipient_public = recipient.public_key().public_bytes(*_RAW)
    shared = recipient.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    try:
        return ChaCha20Poly1305(_key(shared, ephemeral_public, recipient_public)).decrypt(
            nonce, body, None
        )
    except InvalidTag:
        return None
