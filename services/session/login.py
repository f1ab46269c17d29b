"""Login by proof of key possession: single-use challenges signed with the verify key.

An unknown user, a deactivated user, a wrong signature and a bad challenge take the same
path (the identity lookup and an Ed25519 verification always happen) and end in the same
error, so neither the answer nor its timing tells whether an account exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.common import assurance, audit_events, validation
from services.common.addresses import limit_key
from services.common.audit_events import AuditRecord, AuditSink
from services.common.errors import InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from services.common.identity_client import LoginKey
from services.common.ratelimit import SlidingWindowLimiter, WindowFactory, local_windows
from services.protocol.signing import ED25519_SIGNATURE_BYTES as SIGNATURE_BYTES
from services.protocol.signing import login_message
from services.session.model import NoSuchSession, SessionRecord
from services.session.sessions import MAX_USER_AGENT_CHARS, Sessions

CHALLENGE_BYTES = 32
LOGIN_FAILED = (
    "login failed: unknown user, wrong signature, or a challenge that is unknown, used or "
    "expired; request a new challenge and sign it with your verify key"
)

STEP_UP_FAILED = (
    "step-up failed: wrong signature, or a challenge that is unknown, used or expired; "
    "request a new challenge and sign it with your verify key"
)

# Verifying against a fixed key when the user is unknown keeps the timing uniform.
_DECOY_KEY = Ed25519PublicKey.from_public_bytes(bytes(range(32)))


async def confirm(sessions: Sessions, record: SessionRecord, still_active: Awaitable[bool]) -> None:
    """Keeps a new session only if identity, asked after the session was written, still
    has the account active: a deactivation that landed while the login was under way
    (after its key lookup, before its session existed) would otherwise leave a session
    behind. After this answer, the deactivation's own revocation sees the session. Raises
    Unauthenticated or Unavailable, having discarded the session."""

    def discard() -> None:
        with contextlib.suppress(NoSuchSession):  # revoked meanwhile: gone either way
            sessions.delete(record, record.session_id)

    try:
        active = await still_active
    except Unavailable:
        await asyncio.to_thread(discard)
        raise
    if not active:
        await asyncio.to_thread(discard)
        raise Unauthenticated(LOGIN_FAILED)


class IdentityDirectory(Protocol):
    """The identity service as login sees it."""

    async def login_key(self, user_id: str) -> LoginKey | None:
        """The active user's Ed25519 verify key and whether the account has a second
        factor, or None if unknown or deactivated."""
        ...

    async def record_login(self, user_id: str, when: float) -> bool:
        """Records a device-key login; False if the account is no longer active."""
        ...

    async def is_active(self, user_id: str) -> bool: ...

    async def verify_second_factor(self, user_id: str, code: str, recovery_code: str) -> str:
        """ "totp" or "recovery_code", or raises Unauthenticated, FailedPrecondition,
        InvalidArgument, ResourceExhausted."""
        ...

    async def verify_password(
        self, user_id: str, password: str, code: str, recovery_code: str
    ) -> str:
        """The second factor proven with the password ("none", "totp", "recovery_code"),
        or raises Unauthenticated, InvalidArgument, ResourceExhausted."""
        ...


class Challenges(Protocol):
    """Outstanding login challenges: this process's memory (`ChallengeBook`) or Redis
    shared by every replica (services.session.redis_challenges), same rules."""

    async def issue(self, user_id: str, group: str = "") -> Challenge: ...

    async def take(self, challenge_id: str, user_id: str) -> Challenge | None:
        """The challenge, once: taken whoever asks (even for the wrong user)."""
        ...

    async def count(self) -> int: ...


@dataclass(frozen=True)
class Challenge:
    challenge_id: str
    user_id: str
    nonce: bytes
    expire_time: float
    group: str = ""  # the requesting address's limit key (see services.common.addresses)


class ChallengeBook:
    """Outstanding challenges, in memory: each can be taken once, until it expires.

    Backpressure: besides the hard `capacity`, each address group may hold at most
    `per_group` outstanding challenges, and once the book is more than half full that
    allowance shrinks with the free space left. A person holds one challenge for the
    moment between asking and signing, so honest groups are never near it; whoever keeps
    many outstanding is cut back first, and filling the book takes ever more groups.
    """

    def __init__(
        self,
        ttl: float,
        *,
        capacity: int = 100_000,
        per_group: int = 120,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._per_group = per_group
        self._clock = clock
        self._items: OrderedDict[str, Challenge] = OrderedDict()
        self._by_group: dict[str, int] = {}
        self._lock = threading.Lock()

    def _allowance(self) -> int:
        half = self._capacity / 2
        free = self._capacity - len(self._items)
        if free >= half:
            return self._per_group
        return max(1, int(self._per_group * free / half))

    async def issue(self, user_id: str, group: str = "") -> Challenge:
        now = self._clock()
        challenge = Challenge(
            secrets.token_hex(16),
            user_id,
            secrets.token_bytes(CHALLENGE_BYTES),
            now + self._ttl,
            group,
        )
        with self._lock:
            self._purge(now)
            if len(self._items) >= self._capacity:
                raise ResourceExhausted("too many logins in progress", retry_after=self._ttl)
            if self._by_group.get(group, 0) >= self._allowance():
                raise ResourceExhausted(
                    "too many unanswered login challenges from your address; sign the ones "
                    "you have or wait for them to expire",
                    retry_after=self._ttl,
                )
            self._items[challenge.challenge_id] = challenge
            self._by_group[group] = self._by_group.get(group, 0) + 1
        return challenge

    async def take(self, challenge_id: str, user_id: str) -> Challenge | None:
        with self._lock:
            challenge = self._items.pop(challenge_id, None)
            if challenge is not None:
                self._release(challenge)
        if challenge is None or challenge.user_id != user_id:
            return None
        if challenge.expire_time <= self._clock():
            return None
        return challenge

    def _release(self, challenge: Challenge) -> None:
        left = self._by_group[challenge.group] - 1
        if left:
            self._by_group[challenge.group] = left
        else:
            del self._by_group[challenge.group]

    def _purge(self, now: float) -> None:
        # Insertion order is expiry order (fixed TTL), so expired ones sit at the front.
        while self._items:
            first = next(iter(self._items.values()))
            if first.expire_time > now:
                break
            self._items.popitem(last=False)
            self._release(first)

    async def count(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._items)


@dataclass(frozen=True)
class LoginLimits:
    """Failed logins allowed per window, per (account, address group) and per group.

    Nothing counts per account alone: an Ed25519 key cannot be guessed, so such a limit
    would protect nothing and let anyone lock the owner out. A failure counts against
    the account only when it presented a valid, unexpired challenge issued for that
    account from that address group, and a correct signature is never refused.
    """

    failures_per_account_address: int = 10
    failures_per_address: int = 100
    window_seconds: float = 900.0
    # Challenges are free to ask for; without a cap one address could fill the book.
    challenges_per_address_per_minute: int = 120


class Login:
    def __init__(
        self,
        sessions: Sessions,
        directory: IdentityDirectory,
        challenges: Challenges,
        limits: LoginLimits,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
        windows: WindowFactory | None = None,
    ) -> None:
        """`windows` makes the limits: in this process's memory by default, or shared
        by every replica (Redis), so the 11th failure is refused wherever it lands."""
        self._sessions = sessions
        self._directory = directory
        self._challenges = challenges
        self._audit = audit
        self._clock = clock
        # One rate_limit_exceeded event per key and window, not one per refused attempt.
        # Per replica: a second announcement from another replica is harmless.
        self._announced = SlidingWindowLimiter(1, limits.window_seconds)
        windows = windows or local_windows()
        self._by_pair = windows(
            "login_account_address", limits.failures_per_account_address, limits.window_seconds
        )
        self._by_address = windows(
            "login_address", limits.failures_per_address, limits.window_seconds
        )
        self._challenges_by_address = windows(
            "login_challenges", limits.challenges_per_address_per_minute, 60.0
        )

    async def challenge(self, user_id: str, address: str) -> Challenge:
        validation.user_id(user_id)
        group = limit_key(address)
        wait = await self._challenges_by_address.acquire(group)
        if wait is not None:
            self._announce_limit("login_challenges", group, "")
            raise ResourceExhausted("too many login challenges from your address", retry_after=wait)
        return await self._challenges.issue(user_id, group)

    def _announce_limit(self, limit: str, group: str, user_id: str) -> None:
        if self._announced.acquire(f"{limit}:{user_id}:{group}") is None:
            details = {"limit": limit, "ip": group}
            self._audit.record(AuditRecord(audit_events.RATE_LIMIT_EXCEEDED, user_id, details))

    async def _over_limit(self, user_id: str, group: str) -> ResourceExhausted | None:
        """The refusal due if this (account, group) or this group failed too often."""
        for limiter, key, what, limit, account in (
            (self._by_pair, f"{user_id} {group}", "this account from your address",
             "login_account_address", user_id),
            (self._by_address, group, "your address", "login_address", ""),
        ):  # fmt: skip
            wait = await limiter.retry_after(key)
            if wait is not None:
                self._announce_limit(limit, group, account)
                return ResourceExhausted(f"too many failed logins for {what}", retry_after=wait)
        return None

    async def sign_in(
        self,
        user_id: str,
        challenge_id: str,
        signature: bytes,
        *,
        address: str,
        user_agent: str,
    ) -> tuple[str, SessionRecord]:
        """Returns (token, session) or raises Unauthenticated / ResourceExhausted.

        Limits decide only how a failure is answered and whether hopeless attempts get
        any work: a correct signature on a valid challenge always logs in.
        """
        validation.user_id(user_id)
        if not challenge_id:
            raise InvalidArgument("challenge_id is required (from CreateChallenge)")
        if len(signature) != SIGNATURE_BYTES:
            raise InvalidArgument(f"signature must be {SIGNATURE_BYTES} bytes (Ed25519)")
        validation.text(user_agent, "user_agent", max_chars=MAX_USER_AGENT_CHARS, required=False)
        group = limit_key(address)

        challenge = await self._challenges.take(challenge_id, user_id)
        refusal = await self._over_limit(user_id, group)
        if challenge is None and refusal is not None:
            raise refusal  # cannot succeed without a challenge: spend nothing on it
        key = await self._verified_key(user_id, challenge, signature)

        if key is None:
            if refusal is not None:
                raise refusal  # no event per attempt past a limit: one announcement
            await self._by_address.hit(group)
            if challenge is not None:  # only a real attempt at this account counts for it
                await self._by_pair.hit(f"{user_id} {group}")
            failure = AuditRecord(audit_events.USER_LOGIN_FAILED, user_id, {"ip": address})
            await asyncio.to_thread(self._audit.record, failure)
            raise Unauthenticated(LOGIN_FAILED)

        await self._by_pair.reset(f"{user_id} {group}")
        # An account with a second factor gets a session that can only step up until a
        # code is proven; otherwise the login already meets what the account requires.
        token, record = await asyncio.to_thread(
            lambda: self._sessions.create(
                user_id,
                address,
                user_agent,
                level=assurance.DEVICE_KEY,
                scope=assurance.STEP_UP_REQUIRED if key.second_factor_enabled else assurance.FULL,
                stepped_up=not key.second_factor_enabled,
            )
        )
        await confirm(
            self._sessions, record, self._directory.record_login(user_id, record.create_time)
        )
        return token, record

    async def _verified_key(
        self, user_id: str, challenge: Challenge | None, signature: bytes
    ) -> LoginKey | None:
        """The user's login key if `signature` signs `challenge` with it; None for every
        failure, after the same work (a decoy key stands in for an unknown user)."""
        key = await self._directory.login_key(user_id)
        verifier = _DECOY_KEY
        if key is not None:
            try:
                verifier = Ed25519PublicKey.from_public_bytes(key.verify_key)
            except ValueError:
                key = None
        nonce = challenge.nonce if challenge is not None else bytes(CHALLENGE_BYTES)
        try:
            verifier.verify(signature, login_message(user_id, nonce))
            verified = True
        except InvalidSignature:
            verified = False
        return key if verified and challenge is not None else None

    async def step_up(
        self,
        record: SessionRecord,
        *,
        code: str,
        recovery_code: str,
        challenge_id: str,
        signature: bytes,
        address: str,
    ) -> SessionRecord:
        """Proves a second factor (or, for an account without one, the device key again)
        in a session; returns the raised session."""
        self._sessions.require(record, frozenset({assurance.FULL, assurance.STEP_UP_REQUIRED}))
        user_id = record.user_id
        if code or recovery_code:
            if challenge_id or signature:
                raise InvalidArgument("send a code or a signature, not both")
            used = await self._directory.verify_second_factor(user_id, code, recovery_code)
            return await asyncio.to_thread(self._sessions.step_up, record, used)
        if not challenge_id or len(signature) != SIGNATURE_BYTES:
            raise InvalidArgument(
                "send code (or recovery_code), or for an account without a second factor "
                f"challenge_id and a {SIGNATURE_BYTES}-byte signature"
            )
        group = limit_key(address)
        refusal = await self._over_limit(user_id, group)
        if refusal is not None:
            raise refusal
        key = await self._verified_key(
            user_id, await self._challenges.take(challenge_id, user_id), signature
        )
        if key is not None and key.second_factor_enabled:
            raise InvalidArgument(
                "this account has a second factor: step up with a code from your "
                "authenticator app (or a recovery code)"
            )
        if key is None:
            await self._by_address.hit(group)
            await self._by_pair.hit(f"{user_id} {group}")
            failure = AuditRecord(audit_events.USER_LOGIN_FAILED, user_id, {"ip": address})
            await asyncio.to_thread(self._audit.record, failure)
            raise Unauthenticated(STEP_UP_FAILED)
        return await asyncio.to_thread(self._sessions.step_up, record, "device_key")

    async def pending_challenges(self) -> int:
        return await self._challenges.count()
