"""Client-side key material: what a messenger app generates and keeps on the device.

Private keys never leave the client; the server only ever sees the public halves and
signatures made with the verify key.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from securemsg.identity.v1 import keys_pb2

from services.protocol.signing import login_message, pq_prekey_message, signed_prekey_message

_RAW = serialization.Encoding.Raw


def _x25519_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def _x25519_private(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


@dataclass
class UserKeys:
    """A user's private keys; `public_*` helpers build what the server receives."""

    identity: X25519PrivateKey
    signing: Ed25519PrivateKey
    signed_prekey: X25519PrivateKey
    signed_prekey_id: int
    pq_prekey: MLKEM768PrivateKey
    pq_prekey_id: int
    one_time: dict[int, X25519PrivateKey] = field(default_factory=dict)

    @classmethod
    def generate(cls, one_time_count: int = 10) -> UserKeys:
        keys = cls(
            identity=X25519PrivateKey.generate(),
            signing=Ed25519PrivateKey.generate(),
            signed_prekey=X25519PrivateKey.generate(),
            signed_prekey_id=1,
            pq_prekey=MLKEM768PrivateKey.generate(),
            pq_prekey_id=1,
        )
        keys.add_one_time(one_time_count)
        return keys

    def add_one_time(self, count: int) -> list[int]:
        start = max(self.one_time, default=0) + 1
        ids = list(range(start, start + count))
        for key_id in ids:
            self.one_time[key_id] = X25519PrivateKey.generate()
        return ids

    @property
    def identity_public(self) -> bytes:
        return _x25519_public(self.identity)

    @property
    def verify_key(self) -> bytes:
        return self.signing.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)

    def signed_prekey_proto(self) -> keys_pb2.SignedPrekey:
        key_id, public = self.signed_prekey_id, _x25519_public(self.signed_prekey)
        signature = self.signing.sign(signed_prekey_message(key_id, public))
        return keys_pb2.SignedPrekey(key_id=key_id, public_key=public, signature=signature)

    def pq_prekey_proto(self) -> keys_pb2.PqPrekey:
        key_id, public = self.pq_prekey_id, self.pq_prekey.public_key().public_bytes_raw()
        signature = self.signing.sign(pq_prekey_message(key_id, public))
        return keys_pb2.PqPrekey(key_id=key_id, public_key=public, signature=signature)

    def one_time_protos(self, ids: list[int] | None = None) -> list[keys_pb2.OneTimePrekey]:
        chosen = sorted(self.one_time) if ids is None else ids
        return [
            keys_pb2.OneTimePrekey(key_id=i, public_key=_x25519_public(self.one_time[i]))
            for i in chosen
        ]

    def sign_login(self, user_id: str, challenge: bytes) -> bytes:
        return self.signing.sign(login_message(user_id, challenge))

    # Key file: JSON with base64 raw private keys, written 0600.
    def save(self, path: Path) -> None:
        data = {
            "identity": _b64(_x25519_private(self.identity)),
            "signing": _b64(
                self.signing.private_bytes(
                    _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
                )
            ),
            "signed_prekey": _b64(_x25519_private(self.signed_prekey)),
            "signed_prekey_id": self.signed_prekey_id,
            "pq_prekey": _b64(self.pq_prekey.private_bytes_raw()),
            "pq_prekey_id": self.pq_prekey_id,
            "one_time": {str(k): _b64(_x25519_private(v)) for k, v in self.one_time.items()},
        }
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)

    @classmethod
    def load(cls, path: Path) -> UserKeys:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            identity=X25519PrivateKey.from_private_bytes(_unb64(data["identity"])),
            signing=Ed25519PrivateKey.from_private_bytes(_unb64(data["signing"])),
            signed_prekey=X25519PrivateKey.from_private_bytes(_unb64(data["signed_prekey"])),
            signed_prekey_id=data["signed_prekey_id"],
            pq_prekey=MLKEM768PrivateKey.from_seed_bytes(_unb64(data["pq_prekey"])),
            pq_prekey_id=data["pq_prekey_id"],
            one_time={
                int(k): X25519PrivateKey.from_private_bytes(_unb64(v))
                for k, v in data["one_time"].items()
            },
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)
