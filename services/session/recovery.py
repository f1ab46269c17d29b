"""Password login: the way back in for a user who lost their device.

It yields only a recovery session (it may replace the account's keys, deactivate the
account, or log out). Identity checks the password and any second factor and keeps the
per-account budget; this module bounds guessing per (account, address) and per address,
so one stranger hammering an account from one place neither gets far nor locks the
owner out elsewhere (the budget, which a stranger can spend, is refilled by the owner's
device-key login or a recovery code).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.common import assurance, audit_events, validation
from services.common.addresses import limit_key
from services.common.audit_events import AuditRecord, AuditSink
from services.common.errors import ResourceExhausted, Unauthenticated
from services.common.ratelimit import SlidingWindowLimiter, WindowFactory, local_windows
from services.session.login import IdentityDirectory, confirm
from services.session.model import SessionRecord
from services.session.sessions import MAX_USER_AGENT_CHARS, Sessions


@dataclass(frozen=True)
class PasswordLimits:
    failures_per_account_address: int = 5
    failures_per_address: int = 30
    window_seconds: float = 900.0


class PasswordLogin:
    def __init__(
        self,
        sessions: Sessions,
        directory: IdentityDirectory,
        limits: PasswordLimits,
        audit: AuditSink,
        windows: WindowFactory | None = None,
    ) -> None:
        """`windows` makes the failure limits: in this process's memory by default, or
        shared by every replica (Redis)."""
        self._sessions = sessions
        self._directory = directory
        self._audit = audit
        windows = windows or local_windows()
        self._by_pair = windows(
            "password_account_address", limits.failures_per_account_address, limits.window_seconds
        )
        self._by_address = windows(
            "password_address", limits.failures_per_address, limits.window_seconds
        )
        # One announcement per key and window, per replica: a duplicate event is harmless.
        self._announced = SlidingWindowLimiter(1, limits.window_seconds)

    def _announce(self, limit: str, key: str, user_id: str, address: str) -> None:
        if self._announced.acquire(f"{limit}:{key}") is None:
            details = {"limit": limit, "ip": address}
            self._audit.record(AuditRecord(audit_events.RATE_LIMIT_EXCEEDED, user_id, details))

    async def _check_limits(self, user_id: str, address: str) -> None:
        pair = f"{user_id}\x00{address}"
        for limiter, key, what, limit, who in (
            (
                self._by_pair,
                pair,
                "this account from your address",
                "password_account_address",
                user_id,
            ),
            (self._by_address, address, "your address", "password_address", ""),
        ):
            wait = await limiter.retry_after(key)
            if wait is not None:
                self._announce(limit, key, who, address)
                raise ResourceExhausted(
                    f"too many failed password logins for {what}", retry_after=wait
                )

    async def sign_in(
        self,
        user_id: str,
        password: str,
        *,
        code: str,
        recovery_code: str,
        address: str,
        user_agent: str,
    ) -> tuple[str, SessionRecord]:
        """Returns (token, recovery session) or raises Unauthenticated / ResourceExhausted
        / InvalidArgument."""
        validation.user_id(user_id)
        validation.text(user_agent, "user_agent", max_chars=MAX_USER_AGENT_CHARS, required=False)
        group = limit_key(address)  # an IPv4 address, or an IPv6 /64
        await self._check_limits(user_id, group)
        try:
            used = await self._directory.verify_password(user_id, password, code, recovery_code)
        except Unauthenticated:
            await self._by_pair.hit(f"{user_id}\x00{group}")
            await self._by_address.hit(group)
            failure = AuditRecord(
                audit_events.USER_LOGIN_FAILED, user_id, {"ip": address, "method": "password"}
            )
            await asyncio.to_thread(self._audit.record, failure)
            raise
        except ResourceExhausted:
            await asyncio.to_thread(self._announce, "password_account", user_id, user_id, group)
            raise
        await self._by_pair.reset(f"{user_id}\x00{group}")
        level = assurance.PASSWORD if used == "none" else assurance.PASSWORD_AND_SECOND_FACTOR
        token, record = await asyncio.to_thread(
            lambda: self._sessions.create(
                user_id, address, user_agent, level=level, scope=assurance.RECOVERY
            )
        )
        # Not RecordLogin: that refills the password budget, which a password login must
        # not do.
        await confirm(self._sessions, record, self._directory.is_active(user_id))
        return token, record
