"""Client for the identity service's internal API (session: logins; relay: recipients)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as pb_grpc

from services.common import convert, peer_client
from services.common.cache import TtlCache
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)

CODE_REFUSED = "the code is wrong, already used or expired; use the current code"
RECOVERY_LOGIN_REFUSED = (
    "password login failed: unknown user, no password set, wrong password, or a missing "
    "or wrong second-factor code"
)
_SECOND_FACTOR_ANSWERS = {
    grpc.StatusCode.UNAUTHENTICATED: lambda: Unauthenticated(CODE_REFUSED),
    grpc.StatusCode.FAILED_PRECONDITION: lambda: FailedPrecondition(
        "this account has no TOTP second factor; step up with a recovery code, or with a "
        "new device-key signature (challenge_id and signature)"
    ),
    grpc.StatusCode.INVALID_ARGUMENT: lambda: InvalidArgument(
        "send exactly one of code and recovery_code, each at most 64 characters"
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: lambda: ResourceExhausted(
        "too many wrong codes for this account"
    ),
}
_PASSWORD_ANSWERS = {
    grpc.StatusCode.UNAUTHENTICATED: lambda: Unauthenticated(RECOVERY_LOGIN_REFUSED),
    grpc.StatusCode.INVALID_ARGUMENT: lambda: InvalidArgument(
        "user_id must be a valid user id, password 1 to 256 characters, at most one of "
        "second_factor_code and recovery_code, codes at most 64 characters"
    ),
    grpc.StatusCode.RESOURCE_EXHAUSTED: lambda: ResourceExhausted(
        "too many failed password logins for this account; log in with your device key, "
        "or send a recovery code with the password, to reset the count"
    ),
}
# Argon2id runs under a concurrency bound at identity: allow for a queue.
PASSWORD_DEADLINE_SECONDS = 10.0


@dataclass(frozen=True)
class LoginKey:
    verify_key: bytes
    second_factor_enabled: bool  # a device-key login must then step up


class RemoteIdentityDirectory:
    def __init__(self, channel: grpc.aio.Channel, *, active_cache_seconds: float = 0.0) -> None:
        self._stub = pb_grpc.IdentityInternalServiceStub(channel)
        # Only "active" answers are cached: a user deactivated meanwhile may still be sent
        # messages for this long (they stay opaque and expire); unknown users are rechecked.
        self._active = TtlCache[bool](active_cache_seconds, 100_000)

    async def verify_key(self, user_id: str) -> bytes | None:
        key = await self.login_key(user_id)
        return None if key is None else key.verify_key

    async def login_key(self, user_id: str) -> LoginKey | None:
        """The active user's verify key and whether the account has a second factor."""
        reply = await peer_client.call(
            self._stub.GetVerifyKey,
            pb.GetVerifyKeyRequest(user_id=user_id),
            unavailable="login is unavailable right now (identity service); retry",
            idempotent=True,
        )
        if not reply.verify_key:  # empty: unknown or deactivated
            return None
        return LoginKey(reply.verify_key, reply.second_factor_enabled)

    async def verify_second_factor(self, user_id: str, code: str, recovery_code: str) -> str:
        """Checks a code (see IdentityInternalService.VerifySecondFactor); returns
        "totp" or "recovery_code"."""
        reply = await peer_client.call(
            self._stub.VerifySecondFactor,
            pb.VerifySecondFactorRequest(user_id=user_id, code=code, recovery_code=recovery_code),
            unavailable="cannot check the code right now (identity service); retry",
            idempotent=False,  # a code is accepted once: never send it twice
            answers=_SECOND_FACTOR_ANSWERS,
        )
        return _factor_name(reply.second_factor)

    async def verify_password(
        self, user_id: str, password: str, code: str, recovery_code: str
    ) -> str:
        """Checks a password login; returns the second factor proven with it ("none",
        "totp" or "recovery_code")."""
        reply = await peer_client.call(
            self._stub.VerifyPassword,
            pb.VerifyPasswordRequest(
                user_id=user_id, password=password, code=code, recovery_code=recovery_code
            ),
            unavailable="password login is unavailable right now (identity service); retry",
            idempotent=False,  # counts against the budget and may use up a recovery code
            answers=_PASSWORD_ANSWERS,
            deadline_seconds=PASSWORD_DEADLINE_SECONDS,
        )
        return _factor_name(reply.second_factor)

    async def record_login(self, user_id: str, when: float) -> bool:
        """Records a login; False if the account is no longer active (it was deactivated
        while the login was under way). Raises Unavailable."""
        try:
            await peer_client.call(
                self._stub.RecordLogin,
                pb.RecordLoginRequest(user_id=user_id, login_time=convert.timestamp(when)),
                unavailable="login is unavailable right now (identity service); retry",
                idempotent=True,  # sets the time, so a repeat changes nothing
                answers={grpc.StatusCode.NOT_FOUND: lambda: NotFound("no such active user")},
            )
        except NotFound:
            return False
        return True

    async def are_active(self, user_ids: Sequence[str]) -> list[bool]:
        """`is_active` for each, asking identity (concurrently) only for those whose
        answer is not cached: a batch of cached recipients costs no task at all."""
        answers: list[bool | None] = [True if self._active.get(u) else None for u in user_ids]
        unknown = [i for i, answer in enumerate(answers) if answer is None]
        found = (
            await asyncio.gather(*(self.is_active(user_ids[i]) for i in unknown)) if unknown else []
        )
        for i, answer in zip(unknown, found, strict=True):
            answers[i] = answer
        return [bool(answer) for answer in answers]

    async def is_active(self, user_id: str) -> bool:
        """Whether the user exists and is not deactivated."""
        if self._active.get(user_id):
            return True
        asked = self._active.now()
        reply = await peer_client.call(
            self._stub.GetUserStatus,
            pb.GetUserStatusRequest(user_id=user_id),
            unavailable="cannot check the recipient right now (identity service); retry",
            idempotent=True,
        )
        if reply.active:
            self._active.put(user_id, True, since=asked)
        return reply.active


def _factor_name(value: pb.SecondFactor.ValueType) -> str:
    if value == pb.SECOND_FACTOR_TOTP:
        return "totp"
    if value == pb.SECOND_FACTOR_RECOVERY_CODE:
        return "recovery_code"
    return "none"
