"""Field-level encryption at rest, blind indexes, and the key hierarchy behind them.

Key hierarchy (see docs/ARCHITECTURE.md):

    master secret (DB_ENCRYPTION_KEY)
      └─ PBKDF2-HMAC-SHA256(salt from the database, iterations)  -> root key, once at start
           ├─ HKDF "field/<table>/<column>"  -> ChaCha20-Poly1305 key per column
           ├─ HKDF "blind-index/<name>"      -> HMAC-SHA256 key per lookup column
           ├─ HKDF "chain"                   -> HMAC-SHA256 key for the audit hash chain
           ├─ HKDF "mac/<purpose>"           -> HMAC-SHA256 key for authentication tags
                                                (row MACs per table, page tokens)
           └─ HKDF "key-check"               -> key-check value stored in the database

Ciphertext format (all integers big endian):

    0x01 | key version (u32) | nonce (12 random bytes) | ChaCha20-Poly1305 ciphertext+tag

Associated data binds every ciphertext to its place, so a ciphertext copied to another
row, column, table, service or key version fails to decrypt:

    len-prefixed("securemsg/field/v1", service, table, column, row key, key version)

Stores only ever see `FieldCipher` and `BlindIndex` objects; raw keys stay in here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.common import metrics
from services.common.errors import IntegrityError

FORMAT_V1 = 0x01
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
SALT_BYTES = 16
_HEADER = struct.Struct(">BI")  # format, key version
OVERHEAD = _HEADER.size + NONCE_BYTES + TAG_BYTES


def derive_root_key(master_secret: str, salt: bytes, iterations: int) -> bytes:
    """Stretches the operator's master secret. Slow on purpose: call once per start."""
    return hashlib.pbkdf2_hmac(
        "sha256", master_secret.encode("utf-8"), salt, iterations, dklen=KEY_BYTES
    )


def _hkdf(root_key: bytes, info: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info.encode("utf-8")
    ).derive(root_key)


# The most sealing levels a database can record (see key_check_value); unlocking tries each.
MAX_SEAL_LEVEL = 8


def key_check_value(root_key: bytes, *, sealed: int = 0) -> bytes:
    """A value stored beside the salt that shows, at start, whether the key is right.

    `sealed` gives the variant stored once the rows of the first `sealed` row-MAC upgrades
    carry MACs (a service's RowSealing steps: level 1 is the first, as before later
    tables had MACs): only the master key can turn one variant into another, so whoever
    can write the file but lacks the key cannot make a sealed database look like one from
    before an upgrade (and have its rows trusted and sealed again as they are).
    """
    if not 0 <= sealed <= MAX_SEAL_LEVEL:
        raise ValueError(f"a sealing level is 0 to {MAX_SEAL_LEVEL}")
    message = b"key check|rows sealed v%d" % sealed if sealed else b"key check"
    return hmac.digest(_hkdf(root_key, "securemsg/key-check/v1"), message, "sha256")


def _encode_parts(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class KeyVersion:
    """One generation of the master secret, as recorded in a database."""

    version: int
    root_key: bytes


class FieldCipher:
    """Encrypts and decrypts one column of one table."""

    def __init__(
        self, service: str, table: str, column: str, keys: Mapping[int, bytes], primary: int
    ) -> None:
        self._label = f"{service}.{table}.{column}"
        # The associated data is _encode_parts(context, service, table, column, row key,
        # version): all but the row key are fixed per column and version, so they are
        # encoded once (a decryption is on every read).
        self._aad_prefix = _encode_parts(
            b"securemsg/field/v1", service.encode(), table.encode(), column.encode()
        )
        self._aad_suffix = {v: _encode_parts(struct.pack(">I", v)) for v in keys}
        self._aeads = {v: ChaCha20Poly1305(k) for v, k in keys.items()}
        self._primary = primary

    def _aad(self, row_key: bytes, version: int) -> bytes:
        return self._aad_prefix + _LENGTH.pack(len(row_key)) + row_key + self._aad_suffix[version]

    def encrypt(self, plaintext: bytes, row_key: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        body = self._aeads[self._primary].encrypt(
            nonce, plaintext, self._aad(row_key, self._primary)
        )
        return _HEADER.pack(FORMAT_V1, self._primary) + nonce + body

    def decrypt(self, blob: bytes, row_key: bytes) -> bytes:
        if len(blob) < OVERHEAD:
            raise self._failure("ciphertext too short")
        fmt, version = _HEADER.unpack_from(blob)
        if fmt != FORMAT_V1:
            raise self._failure(f"unknown ciphertext format {fmt}")
        aead = self._aeads.get(version)
        if aead is None:
            raise self._failure(f"key version {version} is not loaded")
        nonce = blob[_HEADER.size : _HEADER.size + NONCE_BYTES]
        try:
            return aead.decrypt(
                nonce, blob[_HEADER.size + NONCE_BYTES :], self._aad(row_key, version)
            )
        except InvalidTag:
            raise self._failure("authentication failed (tampered, moved, or wrong key)") from None

    def _failure(self, reason: str) -> IntegrityError:
        # Counted where it is found, so failures outside any RPC (rotation, outbox
        # shipping) reach the operator's alert too; the label names a column, never a row.
        metrics.INTEGRITY_FAILURES.labels(self._label).inc()
        return IntegrityError(f"{self._label}: {reason}")

    def encrypt_text(self, text: str, row_key: bytes) -> bytes:
        return self.encrypt(text.encode("utf-8"), row_key)

    def decrypt_text(self, blob: bytes, row_key: bytes) -> str:
        return self.decrypt(blob, row_key).decode("utf-8")

    def reencrypt(self, blob: bytes, old_row_key: bytes, new_row_key: bytes) -> bytes:
        """The same plaintext sealed under the primary key (and possibly a new row key)."""
        return self.encrypt(self.decrypt(blob, old_row_key), new_row_key)

    @property
    def primary_version(self) -> int:
        return self._primary


class BlindIndex:
    """Deterministic keyed hash for equality lookups on an encrypted value.

    While a key rotation is under way, rows may still be indexed under an older key
    version: lookups must match any of `candidates(value)`; writes use `value`'s
    primary index (calling the object).
    """

    def __init__(self, keys: list[bytes]) -> None:
        self._keys = keys  # primary first

    def __call__(self, value: str) -> bytes:
        return hmac.digest(self._keys[0], value.encode("utf-8"), "sha256")

    @property
    def versions(self) -> int:
        """How many indexes each value has (one per loaded key version)."""
        return len(self._keys)

    def candidates(self, value: str) -> list[bytes]:
        data = value.encode("utf-8")
        return [hmac.digest(key, data, "sha256") for key in self._keys]


MacValue = bytes | str | int | float | None
_MAC_HEADER = struct.Struct(">I")  # key version
MAC_TAG_BYTES = _MAC_HEADER.size + 32


_LENGTH = struct.Struct(">I")
_INT = struct.Struct(">q")
_FLOAT = struct.Struct(">d")


def _mac_value(value: MacValue) -> bytes:
    # Length-prefixed, with a type byte first, so that no two tuples encode alike and 1,
    # 1.0, "1" and b"1" never authenticate for each other. (A hot path: plain code.)
    if isinstance(value, bytes):
        return _LENGTH.pack(len(value) + 1) + b"b" + value
    if value is None:
        return b"\x00\x00\x00\x01n"
    if isinstance(value, str):
        data = value.encode("utf-8")
        return _LENGTH.pack(len(data) + 1) + b"s" + data
    if isinstance(value, bool | int):
        return b"\x00\x00\x00\x09i" + _INT.pack(int(value))
    return b"\x00\x00\x00\x09f" + _FLOAT.pack(value)


class Mac:
    """Authentication tags (HMAC-SHA256) over a tuple of values, under one purpose key.

    A tag is `key version (u32) | HMAC(purpose key of that version, values)`, the values
    length-prefixed and typed so that no two tuples encode alike. New tags use the
    primary version; tags of any loaded version verify, so key rotation can re-tag rows
    in the background. Comparison is constant-time.
    """

    def __init__(self, label: str, keys: Mapping[int, bytes], primary: int) -> None:
        self._label = label
        self._keys = dict(keys)
        self._primary = primary
        self._prefix = _encode_parts(b"securemsg/mac/v1", label.encode())

    def _digest(self, version: int, values: tuple[MacValue, ...]) -> bytes:
        data = self._prefix + b"".join([_mac_value(value) for value in values])
        return hmac.digest(self._keys[version], data, "sha256")

    def tag(self, *values: MacValue) -> bytes:
        return _MAC_HEADER.pack(self._primary) + self._digest(self._primary, values)

    def valid(self, tag: bytes | None, *values: MacValue) -> bool:
        if tag is None or len(tag) != MAC_TAG_BYTES:
            return False
        (version,) = _MAC_HEADER.unpack_from(tag)
        if version not in self._keys:
            return False
        return hmac.compare_digest(tag[_MAC_HEADER.size :], self._digest(version, values))

    def check(self, tag: bytes | None, *values: MacValue) -> None:
        """Raises IntegrityError unless `tag` authenticates exactly these values."""
        if not self.valid(tag, *values):
            metrics.INTEGRITY_FAILURES.labels(self._label).inc()  # see FieldCipher._failure
            raise IntegrityError(
                f"{self._label}: authentication tag does not match (altered, moved, or made "
                "under a key that is not loaded)"
            )

    @staticmethod
    def version_of(tag: bytes) -> int:
        return int(_MAC_HEADER.unpack_from(tag)[0])

    @property
    def primary_version(self) -> int:
        return self._primary


class Keyring:
    """All purpose keys of one service, derived once from its loaded key versions."""

    def __init__(self, service: str, versions: list[KeyVersion], primary: int) -> None:
        if primary not in {v.version for v in versions}:
            raise ValueError("primary key version must be among the loaded versions")
        self.service = service
        self.primary_version = primary
        self._roots = {v.version: v.root_key for v in versions}
        self._fields: dict[tuple[str, str], FieldCipher] = {}
        self._macs: dict[str, Mac] = {}

    def field(self, table: str, column: str) -> FieldCipher:
        """The cipher for one column; the same object for repeated calls."""
        key = (table, column)
        if key not in self._fields:
            subkeys = {
                v: _hkdf(root, f"securemsg/{self.service}/field/{table}/{column}")
                for v, root in self._roots.items()
            }
            self._fields[key] = FieldCipher(
                self.service, table, column, subkeys, self.primary_version
            )
        return self._fields[key]

    @property
    def versions(self) -> list[int]:
        """Loaded key versions, primary first."""
        others = sorted((v for v in self._roots if v != self.primary_version), reverse=True)
        return [self.primary_version, *others]

    @property
    def rotating(self) -> bool:
        return len(self._roots) > 1

    def blind_index(self, name: str) -> BlindIndex:
        info = f"securemsg/{self.service}/blind-index/{name}"
        return BlindIndex([_hkdf(self._roots[v], info) for v in self.versions])

    def mac(self, purpose: str) -> Mac:
        """Tags under the purpose key "securemsg/<service>/mac/<purpose>"; the same object
        for repeated calls."""
        if purpose not in self._macs:
            info = f"securemsg/{self.service}/mac/{purpose}"
            keys = {v: _hkdf(root, info) for v, root in self._roots.items()}
            self._macs[purpose] = Mac(f"{self.service}.{purpose}", keys, self.primary_version)
        return self._macs[purpose]

    def chain_keys(self) -> dict[int, bytes]:
        """The audit chain key of every loaded version (links record their version)."""
        return {
            v: _hkdf(root, f"securemsg/{self.service}/chain") for v, root in self._roots.items()
        }
