"""Client for the identity service's internal API (session: logins; relay: recipients)."""

from __future__ import annotations

import contextlib

import grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as pb_grpc

from services.common import convert, peer_client
from services.common.cache import TtlCache
from services.common.errors import Unavailable


class RemoteIdentityDirectory:
    def __init__(self, channel: grpc.aio.Channel, *, active_cache_seconds: float = 0.0) -> None:
        self._stub = pb_grpc.IdentityInternalServiceStub(channel)
        # Only "active" answers are cached: a user deactivated meanwhile may still be sent
        # messages for this long (they stay opaque and expire); unknown users are rechecked.
        self._active = TtlCache[bool](active_cache_seconds, 100_000)

    async def verify_key(self, user_id: str) -> bytes | None:
        reply = await peer_client.call(
            self._stub.GetVerifyKey,
            pb.GetVerifyKeyRequest(user_id=user_id),
            unavailable="login is unavailable right now (identity service); retry",
            idempotent=True,
        )
        return reply.verify_key or None  # empty: unknown or deactivated

    async def record_login(self, user_id: str, when: float) -> None:
        # Best effort: the session exists already; a missed last-login time is not worth
        # failing the login over (the failure is logged by the call helper).
        with contextlib.suppress(Unavailable):
            await peer_client.call(
                self._stub.RecordLogin,
                pb.RecordLoginRequest(user_id=user_id, login_time=convert.timestamp(when)),
                unavailable="recording the last login failed",
                idempotent=True,  # sets the time, so a repeat changes nothing
            )

    async def is_active(self, user_id: str) -> bool:
        """Whether the user exists and is not deactivated."""
        if self._active.get(user_id):
            return True
        reply = await peer_client.call(
            self._stub.GetUserStatus,
            pb.GetUserStatusRequest(user_id=user_id),
            unavailable="cannot check the recipient right now (identity service); retry",
            idempotent=True,
        )
        if reply.active:
            self._active.put(user_id, True)
        return reply.active
