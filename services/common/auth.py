"""Authenticating end users by their bearer token.

Identity, relay and audit check tokens by calling SessionInternalService.ValidateSession
(`RemoteTokenValidator`, behind the `TokenValidator` protocol so that servicers and their
tests need no session service). The session service owns the tokens: it reads the bearer
token with `bearer_token` and validates it against its own store, without this protocol.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from securemsg.session.v1 import session_internal_service_pb2 as session_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as session_grpc

from services.common import peer_client
from services.common.assurance import (
    RESTRICTED,
    RESTRICTED_SCOPE,
    STEP_UP_NEEDED,
    level_name,
    scope_name,
)
from services.common.cache import TtlCache
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.peers import Context

_MISSING = "missing credentials: send metadata 'authorization: Bearer <token>' from a login"
_REFUSED = "session token is invalid, expired or revoked; log in again"
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: lambda: Unauthenticated(_REFUSED),
    grpc.StatusCode.INVALID_ARGUMENT: lambda: Unauthenticated(_REFUSED),
    # The token's session row failed its integrity check at the session service (which
    # logs and counts it): whatever the token is, it cannot be trusted.
    grpc.StatusCode.DATA_LOSS: lambda: Unauthenticated(_REFUSED),
    grpc.StatusCode.PERMISSION_DENIED: lambda: PermissionDenied(RESTRICTED),
}


@dataclass(frozen=True)
class AuthenticatedUser:
    """A caller's session as the session service described it (see session.proto)."""

    user_id: str
    session_id: str
    level: str = "device_key"  # services.protocol.assurance level names
    scope: str = "full"  # "full", "step_up_required" or "recovery"
    step_up_expire_time: float | None = None  # until when sensitive calls are allowed

    def recently_stepped_up(self, now: float) -> bool:
        return self.step_up_expire_time is not None and now < self.step_up_expire_time


class TokenValidator(Protocol):
    async def validate(self, token: str) -> AuthenticatedUser:
        """Returns the token's user, or raises Unauthenticated / Unavailable."""
        ...


def bearer_token(context: Context) -> str:
    """The token from `authorization: Bearer <token>` metadata, or Unauthenticated."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
    raise Unauthenticated(_MISSING)


async def authenticate(context: Context, validator: TokenValidator) -> AuthenticatedUser:
    return await validator.validate(bearer_token(context))


class SessionChecker(Protocol):
    """Token validation that knows session scopes and step-ups (identity's sensitive and
    recovery calls)."""

    async def check(
        self, token: str, *, accept_restricted: bool = False, fresh: bool = False
    ) -> AuthenticatedUser:
        """Like TokenValidator.validate; `accept_restricted` also admits step-up-only and
        recovery sessions, `fresh` bypasses any cache."""
        ...


async def authenticate_for(
    context: Context,
    checker: SessionChecker,
    *,
    scopes: frozenset[str] = frozenset({"full"}),
    recent_step_up: bool = False,
) -> AuthenticatedUser:
    """The caller, if their session's scope is one of `scopes` and, for a sensitive call
    (`recent_step_up`), it stepped up recently; otherwise PermissionDenied saying what
    to do. A cached answer that falls short is checked once more without the cache, so
    a step-up made a moment ago counts at once."""
    token = bearer_token(context)
    restricted = scopes != {"full"}
    user = await checker.check(token, accept_restricted=restricted)
    if recent_step_up and not user.recently_stepped_up(time.time()):
        user = await checker.check(token, accept_restricted=restricted, fresh=True)
    if user.scope not in scopes:
        raise PermissionDenied(RESTRICTED_SCOPE.get(user.scope, RESTRICTED))
    if recent_step_up and not user.recently_stepped_up(time.time()):
        raise PermissionDenied(STEP_UP_NEEDED)
    return user


class RemoteTokenValidator:
    """Validates tokens with the session service over (mutual TLS) gRPC.

    Successful answers are cached for `cache_seconds` counted from when the question was
    asked, not from when the answer arrived: that is how long a token revoked at the
    session service may still be accepted here (the documented bound, whatever the
    answer's delay; 0 turns the cache off). Failures are never cached, so a new token
    works at once.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        cache_seconds: float = 0.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stub = session_grpc.SessionInternalServiceStub(channel)
        self._cache = TtlCache[AuthenticatedUser](cache_seconds, max_entries, clock)

    async def validate(self, token: str) -> AuthenticatedUser:
        return await self.check(token)

    async def check(
        self, token: str, *, accept_restricted: bool = False, fresh: bool = False
    ) -> AuthenticatedUser:
        digest = hashlib.sha256(token.encode("utf-8", "replace")).digest()  # no raw tokens
        key = digest + (b"r" if accept_restricted else b"f")
        cached = None if fresh else self._cache.get(key)
        if cached is not None:
            return cached
        asked = self._cache.now()
        user = await self._ask(token, accept_restricted)
        self._cache.put(key, user, since=asked)
        return user

    async def _ask(self, token: str, accept_restricted: bool) -> AuthenticatedUser:
        reply = await peer_client.call(
            self._stub.ValidateSession,
            session_pb.ValidateSessionRequest(token=token, accept_restricted=accept_restricted),
            unavailable="cannot check the session token right now (session service "
            "unreachable); retry",
            idempotent=True,
            answers=_REFUSALS,
        )
        return AuthenticatedUser(
            user_id=reply.user_id,
            session_id=reply.session_id,
            level=level_name(reply.assurance_level),
            scope=scope_name(reply.scope),
            step_up_expire_time=(
                reply.step_up_expire_time.ToNanoseconds() / 1e9
                if reply.HasField("step_up_expire_time")
                else None
            ),
        )
