"""Byte layouts that clients sign and servers verify or hash (see keys.proto, session.proto).

Clients in every language build the same bytes; a change here is a wire-protocol change.
"""

from __future__ import annotations

import hashlib
import struct

X25519_KEY_BYTES = 32
ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
MLKEM768_KEY_BYTES = 1184

LOGIN_CONTEXT = b"SecureMsg login v1\x00"
SIGNED_PREKEY_CONTEXT = b"SecureMsg signed prekey v1\x00"
PQ_PREKEY_CONTEXT = b"SecureMsg pq prekey v1\x00"
FINGERPRINT_CONTEXT = b"SecureMsg fingerprint v1\x00"


def login_message(user_id: str, challenge: bytes) -> bytes:
    """What the verify key signs to log in: context || user_id (UTF-8) || 0x00 || challenge."""
    return LOGIN_CONTEXT + user_id.encode("utf-8") + b"\x00" + challenge


def signed_prekey_message(key_id: int, public_key: bytes) -> bytes:
    """What the verify key signs for the signed prekey: context || key_id (u32 BE) || key."""
    return SIGNED_PREKEY_CONTEXT + struct.pack(">I", key_id) + public_key


def pq_prekey_message(key_id: int, public_key: bytes) -> bytes:
    """What the verify key signs for the post-quantum prekey (same shape, own context)."""
    return PQ_PREKEY_CONTEXT + struct.pack(">I", key_id) + public_key


def fingerprint(identity_key: bytes, verify_key: bytes) -> str:
    """SHA-256 of the two public keys, upper-case hex in groups of four joined by ':'."""
    digest = hashlib.sha256(FINGERPRINT_CONTEXT + identity_key + verify_key).hexdigest().upper()
    return ":".join(digest[i : i + 4] for i in range(0, len(digest), 4))
