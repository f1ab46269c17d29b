"""Identity rules, independent of gRPC: who may register, what a bundle must hold,
and how an account is closed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common import audit_events, validation
from services.common.addresses import limit_key
from services.common.audit_events import AuditRecord
from services.common.errors import ResourceExhausted, Unavailable
from services.common.ratelimit import CounterFactory, local_counters
from services.identity import keys
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import (
    IdentityCounts,
    IdentityStore,
    NewKeys,
    NewUser,
    NoSuchUser,
    SessionRevoker,
    User,
)

logger = logging.getLogger(__name__)

MAX_ALIAS_CHARS = 64
MAX_METADATA_ENTRIES = 16
MAX_METADATA_VALUE_CHARS = 256
MAX_PREKEYS_PER_REQUEST = 100
MAX_PREKEY_POOL = 1000


@dataclass(frozen=True)
class Registration:
    user_id: str
    alias: str
    metadata: dict[str, str]
    identity_key: bytes
    verify_key: bytes
    signed_prekey: SignedKey | None
    pq_prekey: SignedKey | None
    one_time_prekeys: list[OneTimePrekey]


@dataclass(frozen=True)
class Bundle:
    user_id: str
    identity_key: bytes
    verify_key: bytes
    signed_prekey: SignedKey
    pq_prekey: SignedKey
    one_time_prekey: OneTimePrekey | None
    fingerprint: str


@dataclass(frozen=True)
class IdentityLimits:
    """Abuse limits: registrations per peer address, bundle fetches per caller.

    Bundle fetches consume one-time prekeys, so an unbounded caller could empty
    everyone's pool; registrations are anonymous, so they are bounded per address.
    Past `prekeys_per_target_per_hour` fetches of one user's bundle by one caller, the
    bundle still comes (X3DH works without a one-time prekey) but takes none from the
    pool: draining a pool of 1000 then needs a hundred accounts an hour, not a minute.
    """

    registrations_per_minute: int = 60
    bundles_per_minute: int = 600
    prekeys_per_target_per_hour: int = 10


class PublishedKeys(Protocol):
    """Accounts as read before, kept in memory (services.identity.cache)."""

    def published(self, user_id: str) -> User | None:
        """The account and its published keys and status (its one-time prekey count may
        be out of date), or None for an unknown user."""
        ...


class Identity:
    """The identity service's use cases. Callers are already authenticated."""

    def __init__(
        self,
        store: IdentityStore,
        revoker: SessionRevoker,
        clock: Callable[[], float] = time.time,
        limits: IdentityLimits | None = None,
        on_login: Callable[[str], None] = lambda user_id: None,
        published: PublishedKeys | None = None,
        windows: CounterFactory | None = None,
    ) -> None:
        self._store = store
        # Where a key bundle's account comes from: memory when the wiring gives one.
        self._published = published.published if published is not None else store.get_user
        self._revoker = revoker
        self._clock = clock
        # A device-key login also refills the password budget (see factors.py).
        self._on_login = on_login
        limits = limits or IdentityLimits(2**31, 2**31, 2**31)
        # In this process's memory unless the wiring shares them between replicas.
        windows = windows or local_counters(clock)
        self._registrations = windows("registrations", limits.registrations_per_minute, 60.0)
        self._bundles = windows("bundles", limits.bundles_per_minute, 60.0)
        self._prekeys_per_target = windows(
            "prekeys-per-target", limits.prekeys_per_target_per_hour, 3600.0
        )

    def register(self, request: Registration, address: str = "") -> User:
        wait = self._registrations.acquire(limit_key(address))
        if wait is not None:
            raise ResourceExhausted("too many registrations from your address", retry_after=wait)
        validation.user_id(request.user_id)
        validation.text(request.alias, "alias", max_chars=MAX_ALIAS_CHARS)
        validation.string_map(
            request.metadata,
            "metadata",
            max_entries=MAX_METADATA_ENTRIES,
            max_value_chars=MAX_METADATA_VALUE_CHARS,
        )
        verifier = keys.check_identity_keys(request.identity_key, request.verify_key)
        signed = keys.check_signed_prekey(verifier, request.signed_prekey)
        pq = keys.check_pq_prekey(verifier, request.pq_prekey)
        prekeys = keys.check_one_time_prekeys(
            request.one_time_prekeys, max_count=MAX_PREKEYS_PER_REQUEST, allow_empty=True
        )
        new = NewUser(
            user_id=request.user_id,
            alias=request.alias,
            metadata=dict(request.metadata),
            identity_key=request.identity_key,
            verify_key=request.verify_key,
            signed_prekey=signed,
            pq_prekey=pq,
            one_time_prekeys=prekeys,
            create_time=self._clock(),
        )
        self._store.add_user(new, AuditRecord(audit_events.USER_REGISTERED, request.user_id))
        # What was just stored, without reading and decrypting it back (a tenth of the
        # registration's time in the profile).
        return User(
            user_id=new.user_id,
            alias=new.alias,
            metadata=new.metadata,
            identity_key=new.identity_key,
            verify_key=new.verify_key,
            signed_prekey=new.signed_prekey,
            pq_prekey=new.pq_prekey,
            create_time=new.create_time,
            last_login_time=None,
            deactivate_time=None,
            one_time_prekey_count=len(new.one_time_prekeys),
        )

    def profile(self, user_id: str) -> User:
        user = self._store.get_user(user_id)
        if user is None or not user.active:
            raise NoSuchUser
        return user

    def bundle(self, user_id: str, caller: str = "") -> Bundle:
        validation.user_id(user_id)
        wait = self._bundles.acquire(caller)
        if wait is not None:
            raise ResourceExhausted("too many key bundle requests", retry_after=wait)
        user = self._published(user_id)
        if user is None or not user.active:
            raise NoSuchUser
        may_take = self._prekeys_per_target.acquire(f"{caller} {user_id}") is None
        return Bundle(
            user_id=user.user_id,
            identity_key=user.identity_key,
            verify_key=user.verify_key,
            signed_prekey=user.signed_prekey,
            pq_prekey=user.pq_prekey,
            one_time_prekey=self._store.take_one_time_prekey(user_id) if may_take else None,
            fingerprint=keys.fingerprint(user.identity_key, user.verify_key),
        )

    def upload_one_time_prekeys(self, user_id: str, prekeys: list[OneTimePrekey]) -> int:
        keys.check_one_time_prekeys(prekeys, max_count=MAX_PREKEYS_PER_REQUEST, allow_empty=False)
        return self._store.add_one_time_prekeys(
            user_id,
            prekeys,
            MAX_PREKEY_POOL,
            AuditRecord(audit_events.PREKEYS_UPLOADED, user_id, {"count": str(len(prekeys))}),
        )

    def prekey_count(self, user_id: str) -> int:
        return self.profile(user_id).one_time_prekey_count

    def rotate_signed_prekey(
        self, user_id: str, signed: SignedKey | None, pq: SignedKey | None
    ) -> Bundle:
        user = self.profile(user_id)
        verifier = keys.check_identity_keys(user.identity_key, user.verify_key)
        new_signed = keys.check_signed_prekey(verifier, signed)
        new_pq = keys.check_pq_prekey(verifier, pq) if pq is not None else None
        self._store.set_prekeys(
            user_id,
            new_signed,
            new_pq,
            AuditRecord(
                audit_events.SIGNED_PREKEY_ROTATED,
                user_id,
                {"pq_prekey": "rotated" if new_pq else "kept"},
            ),
        )
        return Bundle(
            user_id=user_id,
            identity_key=user.identity_key,
            verify_key=user.verify_key,
            signed_prekey=new_signed,
            pq_prekey=new_pq or user.pq_prekey,
            one_time_prekey=None,
            fingerprint=keys.fingerprint(user.identity_key, user.verify_key),
        )

    def verify_key(self, user_id: str) -> bytes:
        """An active user's verify key; empty for an unknown or deactivated user.

        Both answers take the same path out (no error, no log line), so the login that
        asks cannot tell them apart by status or timing; login verifies against a decoy.
        """
        validation.user_id(user_id)
        return self._store.get_verify_key(user_id) or b""

    def record_login(self, user_id: str, when: float | None) -> None:
        validation.user_id(user_id)
        self._store.record_login(user_id, self._clock() if when is None else when)
        self._on_login(user_id)

    def status(self, user_id: str) -> tuple[bool, bool]:
        """(exists, active) for a user id."""
        validation.user_id(user_id)
        active = self._store.is_active(user_id)
        return active is not None, bool(active)

    async def deactivate(self, user_id: str, by: str = "owner") -> float:
        """Closes an account for good; `by` ("owner" or "operator") goes into the audit trail.

        Deactivate first: from then on no new login succeeds (a login under way is
        refused when it confirms with RecordLogin). The revocation of every session is
        written in the same transaction and done at once if the session service answers;
        otherwise `revoke_pending` (a background task) repeats it until it is done, so no
        session outlives a deactivation by more than the time session is unreachable.
        """
        validation.user_id(user_id)
        event = AuditRecord(audit_events.USER_DEACTIVATED, user_id, {"by": by})
        when = await asyncio.to_thread(self._store.deactivate, user_id, self._clock(), event)
        try:
            await self.revoke_pending()
        except Unavailable:
            logger.warning("session revocation deferred; it will be retried")
        return when

    async def revoke_pending(self) -> int:
        """Revokes the sessions of deactivated accounts still owed it; returns how many
        were done. Raises Unavailable (leaving the rest) when session does not answer."""
        done = 0
        while pending := await asyncio.to_thread(self._store.pending_revocations, 100):
            for item in pending:
                await self._revoker.revoke_all(item.user_id)
                await asyncio.to_thread(self._store.revocation_done, item.revocation_id)
                done += 1
        return done

    async def replace_keys(
        self, user_id: str, replacement: Registration, *, by: str, keep_session_id: str
    ) -> tuple[User, int]:
        """Replaces a lost device's keys (`replacement` as at registration, its user id,
        alias and metadata ignored); returns the profile and how many other sessions
        were revoked. `by` ("recovery" or "owner") goes into the audit trail.

        Keys first, then sessions: from the moment the keys change the old verify key
        cannot log in, and revoking is idempotent, so if the session service cannot be
        reached the call fails (UNAVAILABLE) and repeating it finishes the job.
        """
        verifier = keys.check_identity_keys(replacement.identity_key, replacement.verify_key)
        new = NewKeys(
            identity_key=replacement.identity_key,
            verify_key=replacement.verify_key,
            signed_prekey=keys.check_signed_prekey(verifier, replacement.signed_prekey),
            pq_prekey=keys.check_pq_prekey(verifier, replacement.pq_prekey),
            one_time_prekeys=keys.check_one_time_prekeys(
                replacement.one_time_prekeys, max_count=MAX_PREKEYS_PER_REQUEST, allow_empty=True
            ),
        )
        event = AuditRecord(
            audit_events.KEYS_REPLACED,
            user_id,
            {"by": by, "one_time_prekeys": str(len(new.one_time_prekeys))},
        )
        await asyncio.to_thread(self._store.replace_keys, user_id, new, event)
        revoked = await self._revoker.revoke_all(user_id, keep_session_id=keep_session_id)
        return await asyncio.to_thread(self.profile, user_id), revoked

    def counts(self) -> IdentityCounts:
        return self._store.counts()
