"""Client for the identity service's internal API (session: logins; relay: recipients)."""

from __future__ import annotations

import logging

import grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as pb_grpc

from services.common import convert
from services.common.cache import TtlCache
from services.common.errors import Unavailable

TIMEOUT_SECONDS = 3.0
logger = logging.getLogger(__name__)


class RemoteIdentityDirectory:
    def __init__(self, channel: grpc.aio.Channel, *, active_cache_seconds: float = 0.0) -> None:
        self._stub = pb_grpc.IdentityInternalServiceStub(channel)
        # Only "active" answers are cached: a user deactivated meanwhile may still be sent
        # messages for this long (they stay opaque and expire); unknown users are rechecked.
        self._active = TtlCache[bool](active_cache_seconds, 100_000)

    async def verify_key(self, user_id: str) -> bytes | None:
        try:
            reply = await self._stub.GetVerifyKey(
                pb.GetVerifyKeyRequest(user_id=user_id),
                timeout=TIMEOUT_SECONDS,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            logger.warning("identity lookup failed", extra={"fields": {"code": exc.code().name}})
            raise Unavailable("login is unavailable right now (identity service); retry") from None
        return reply.verify_key

    async def record_login(self, user_id: str, when: float) -> None:
        # Best effort: the session exists already; a missed last-login time is not worth
        # failing the login over.
        try:
            await self._stub.RecordLogin(
                pb.RecordLoginRequest(user_id=user_id, login_time=convert.timestamp(when)),
                timeout=TIMEOUT_SECONDS,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning(
                "recording last login failed", extra={"fields": {"code": exc.code().name}}
            )

    async def is_active(self, user_id: str) -> bool:
        """Whether the user exists and is not deactivated."""
        if self._active.get(user_id):
            return True
        try:
            reply = await self._stub.GetUserStatus(
                pb.GetUserStatusRequest(user_id=user_id),
                timeout=TIMEOUT_SECONDS,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            logger.warning("identity lookup failed", extra={"fields": {"code": exc.code().name}})
            raise Unavailable(
                "cannot check the recipient right now (identity service); retry"
            ) from None
        if reply.active:
            self._active.put(user_id, True)
        return reply.active
