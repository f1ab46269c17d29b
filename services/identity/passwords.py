"""Passwords: the NIST SP 800-63B rules for choosing one, and Argon2id for keeping it.

Rules (rev. 4, chosen for a password that may be the only factor of a recovery login):
at least 15 characters (the single-factor minimum; a second factor is optional and can
be removed later, so every password meets the stricter rule), at most 256 (NIST asks
for at least 64), every Unicode character counted as one after NFKC normalisation, no
composition rules, and a blocklist: the zxcvbn estimator (offline: its frequency lists
hold the 30,000 most common passwords, words, names, keyboard walks, repeats and
sequences) must rate it at least 3 ("safely unguessable", over 10^8 guesses), with the
user id and alias as extra dictionary words, and it must not contain either outright.

Storage: Argon2id (argon2-cffi) with a random salt per hash; the resulting PHC string
is then sealed with the store's field encryption, whose key comes from the service's
key hierarchy. That key is the pepper (the OWASP "encrypt the hash" variant): a stolen
database alone gives nothing to test guesses against, and unlike an HMAC pepper it
rotates with the master key, because re-encrypting needs no password.
"""

from __future__ import annotations

import secrets
import threading
import unicodedata
from dataclasses import dataclass

import argon2
from argon2.exceptions import InvalidHashError, VerificationError
from zxcvbn import zxcvbn

from services.common.errors import InvalidArgument

MIN_CHARS = 15
MAX_CHARS = 256
MIN_SCORE = 3
# zxcvbn's matching is superlinear; it looks at this prefix (its own default limit).
ESTIMATOR_CHARS = 72
# A user id or alias shorter than this is too common a substring to forbid.
MIN_NAME_CHARS = 3


def normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def check_new_password(password: str, user_id: str, alias: str) -> str:
    """The normalised password if it may be chosen; otherwise InvalidArgument naming the
    rule that failed."""
    if not password:
        raise InvalidArgument("password is required")
    normal = normalize(password)
    if len(normal) < MIN_CHARS:
        raise InvalidArgument(
            f"password must be at least {MIN_CHARS} characters (a passphrase of a few "
            "unrelated words works well); no symbols or digits are required"
        )
    if len(normal) > MAX_CHARS:
        raise InvalidArgument(f"password must be at most {MAX_CHARS} characters")
    if any(unicodedata.category(ch) in {"Cc", "Cs"} for ch in normal):
        raise InvalidArgument("password must not contain control characters")
    folded = normal.casefold()
    names = [n for n in (user_id, normalize(alias)) if len(n) >= MIN_NAME_CHARS]
    if any(name.casefold() in folded for name in names):
        raise InvalidArgument("password must not contain your user id or alias")
    if zxcvbn(normal[:ESTIMATOR_CHARS], user_inputs=names)["score"] < MIN_SCORE:
        raise InvalidArgument(
            "password is too common or too easy to guess (a known password, a word, a "
            "name, a keyboard pattern or a repetition); choose a longer or less common one"
        )
    return normal


@dataclass(frozen=True)
class HashParameters:
    """Argon2id cost. The defaults are OWASP's minimum for Argon2id (19 MiB, 2 passes,
    one lane); stored hashes made with other parameters are redone at the next
    successful login."""

    time_cost: int = 2
    memory_kib: int = 19456
    parallelism: int = 1


class PasswordHasher:
    """Argon2id hashing with a bound on how many hashes run at once (each takes
    `memory_kib` of memory), and a decoy hash for accounts that have no password."""

    def __init__(self, parameters: HashParameters, *, max_concurrent: int = 4) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=parameters.time_cost,
            memory_cost=parameters.memory_kib,
            parallelism=parameters.parallelism,
            type=argon2.Type.ID,
        )
        self._slots = threading.BoundedSemaphore(max_concurrent)
        # Same parameters as real hashes, so checking the decoy costs the same time.
        self.decoy = self.hash(secrets.token_urlsafe(24))

    def hash(self, normalized: str) -> str:
        with self._slots:
            return self._hasher.hash(normalized)

    def verify(self, stored: str, password: str) -> bool:
        with self._slots:
            try:
                return self._hasher.verify(stored, normalize(password))
            except (VerificationError, InvalidHashError):
                return False

    def needs_rehash(self, stored: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True
