"""Authenticating end users by their bearer token.

Identity, relay and audit check tokens by calling SessionInternalService.ValidateSession
(`RemoteTokenValidator`, behind the `TokenValidator` protocol so that servicers and their
tests need no session service). The session service owns the tokens: it reads the bearer
token with `bearer_token` and validates it against its own store, without this protocol.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import grpc
from securemsg.session.v1 import session_internal_service_pb2 as session_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as session_grpc

from services.common import peer_client
from services.common.cache import TtlCache
from services.common.errors import Unauthenticated
from services.common.peers import Context

_MISSING = "missing credentials: send metadata 'authorization: Bearer <token>' from a login"
_REFUSED = "session token is invalid, expired or revoked; log in again"
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: lambda: Unauthenticated(_REFUSED),
    grpc.StatusCode.INVALID_ARGUMENT: lambda: Unauthenticated(_REFUSED),
}


@dataclass(frozen=True)
class AuthenticatedUser:
    user_id: str
    session_id: str


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


class RemoteTokenValidator:
    """Validates tokens with the session service over (mutual TLS) gRPC.

    Successful answers are cached for `cache_seconds`: that is how long a token revoked
    at the session service may still be accepted here (the documented bound; 0 turns
    the cache off). Failures are never cached, so a new token works at once.
    """

    def __init__(
        self, channel: grpc.aio.Channel, *, cache_seconds: float = 0.0, max_entries: int = 100_000
    ) -> None:
        self._stub = session_grpc.SessionInternalServiceStub(channel)
        self._cache = TtlCache[AuthenticatedUser](cache_seconds, max_entries)

    async def validate(self, token: str) -> AuthenticatedUser:
        key = hashlib.sha256(token.encode("utf-8", "replace")).digest()  # no raw tokens kept
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        user = await self._ask(token)
        self._cache.put(key, user)
        return user

    async def _ask(self, token: str) -> AuthenticatedUser:
        reply = await peer_client.call(
            self._stub.ValidateSession,
            session_pb.ValidateSessionRequest(token=token),
            unavailable="cannot check the session token right now (session service "
            "unreachable); retry",
            idempotent=True,
            answers=_REFUSALS,
        )
        return AuthenticatedUser(user_id=reply.user_id, session_id=reply.session_id)
