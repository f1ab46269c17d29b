"""A demonstration of end-to-end encryption for the CLI: signed, sealed boxes.

Ephemeral X25519 + HKDF-SHA256 + ChaCha20-Poly1305 to the recipient's identity key, and
inside it an Ed25519 signature by the sender's verify key over who sent it, to which
key, under which ephemeral key, and the text. The recipient checks the signature
against the sender's verify key (the one it pinned), so a box cannot claim a sender it
does not come from, and cannot be re-sealed to someone else with the signature intact.

A real messenger runs X3DH/PQXDH and the Double Ratchet on the bundles the identity
service serves; the backend never sees plaintext either way, which is what this shows.

    box = 0x02 | ephemeral public key (32) | nonce (12) | AEAD(signature (64) | text)

The header is the AEAD's associated data. Anything wrong with a box (short, another
version, a low-order ephemeral key, a bad tag or signature) makes `open_sealed` return
None: an undecryptable message is data to report, never a crash.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 0x02
_INFO = b"SecureMsg cli sealed box v2"
_SIGNED = b"SecureMsg cli sealed box v2 sender\x00"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_HEADER = 1 + 32 + 12
_SIGNATURE = 64


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def _signed(sender_id: str, recipient: bytes, ephemeral: bytes, text: bytes) -> bytes:
    sender = sender_id.encode("utf-8")
    return _SIGNED + struct.pack(">I", len(sender)) + sender + recipient + ephemeral + text


def seal(
    recipient_public: bytes, sender_id: str, sender_signing: Ed25519PrivateKey, plaintext: bytes
) -> bytes:
    """A box only the holder of `recipient_public`'s private key opens, signed by the sender."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(*_RAW)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    signature = sender_signing.sign(
        _signed(sender_id, recipient_public, ephemeral_public, plaintext)
    )
    nonce = os.urandom(12)
    header = bytes([VERSION]) + ephemeral_public + nonce
    key = _key(shared, ephemeral_public, recipient_public)
    return header + ChaCha20Poly1305(key).encrypt(nonce, signature + plaintext, header)


def open_sealed(
    recipient: X25519PrivateKey, box: bytes, sender_id: str, sender_verify_key: bytes
) -> bytes | None:
    """The text if the box was sealed to this key and signed by `sender_id`'s verify key;
    None for anything else."""
    if len(box) < _HEADER + _SIGNATURE + 16 or box[0] != VERSION:
        return None
    header, ephemeral_public, nonce = box[:_HEADER], box[1:33], box[33:_HEADER]
    recipient_public = recipient.public_key().public_bytes(*_RAW)
    try:
        # A low-order ephemeral key makes the exchange all zeros, which raises.
        shared = recipient.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        inner = ChaCha20Poly1305(_key(shared, ephemeral_public, recipient_public)).decrypt(
            nonce, box[_HEADER:], header
        )
        signature, text = inner[:_SIGNATURE], inner[_SIGNATURE:]
        Ed25519PublicKey.from_public_bytes(sender_verify_key).verify(
            signature, _signed(sender_id, recipient_public, ephemeral_public, text)
        )
    except (ValueError, InvalidTag, InvalidSignature):
        return None
    return text
