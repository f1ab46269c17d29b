"""What the relay keeps in Redis about a message besides its body, sealed.

Redis memory can be read by whoever runs Redis (a `DEBUG`, a core dump, a replica), so
the relay stores no user id there: queue keys and sender counters are HMACs of the ids
(services.common.shared_state.KeyNames), and the sender's id and the sending time travel
sealed with ChaCha20-Poly1305 under the relay's own key, with the queue key and the
message id as associated data (a sealed sender moved to another message or queue fails
to open). Every relay replica has the same `RELAY_STORE_KEY`.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.common import metrics
from services.common.errors import IntegrityError, StartupError

KEY_VARIABLE = "RELAY_STORE_KEY"
MIN_KEY_CHARS = 16
_NONCE = 12
_TIME = struct.Struct(">Q")  # sending time in milliseconds


def _derive(secret: str, purpose: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"securemsg relay store",
        info=purpose.encode("ascii"),
    ).derive(secret.encode("utf-8"))


class RelaySeal:
    """The relay's keys for Redis: one to seal, one to name keys."""

    def __init__(self, secret: str) -> None:
        if len(secret) < MIN_KEY_CHARS:
            raise StartupError(f"{KEY_VARIABLE} must be at least {MIN_KEY_CHARS} characters")
        self._aead = ChaCha20Poly1305(_derive(secret, "seal/v1"))
        self.index_key = _derive(secret, "index/v1")

    def seal(self, sender_id: str, send_time_ms: int, queue: str, message_id: str) -> bytes:
        nonce = os.urandom(_NONCE)
        plain = _TIME.pack(send_time_ms) + sender_id.encode("utf-8")
        return nonce + self._aead.encrypt(nonce, plain, _ad(queue, message_id))

    def open(self, sealed: bytes, queue: str, message_id: str) -> tuple[str, int]:
        """(sender id, sending time in ms), or IntegrityError if it was altered or moved."""
        try:
            plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _ad(queue, message_id))
        except (InvalidTag, ValueError):
            metrics.INTEGRITY_FAILURES.labels("relay.sealed_sender").inc()
            raise IntegrityError(
                "a queued message's sealed sender failed its integrity check"
            ) from None
        return plain[_TIME.size :].decode("utf-8"), _TIME.unpack_from(plain)[0]


def _ad(queue: str, message_id: str) -> bytes:
    return b"securemsg relay message\x00" + queue.encode() + b"\x00" + message_id.encode()
