"""Revoking a deactivated user's sessions through the session service's admin API."""

from __future__ import annotations

import grpc
from securemsg.session.v1 import session_admin_service_pb2 as pb
from securemsg.session.v1 import session_admin_service_pb2_grpc as pb_grpc

from services.common import peer_client


class RemoteSessionRevoker:
    """`services.identity.model.SessionRevoker` over the session service's admin API."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = pb_grpc.SessionAdminServiceStub(channel)

    async def revoke_all(self, user_id: str, *, keep_session_id: str = "") -> int:
        reply = await peer_client.call(
            self._stub.RevokeUserSessions,
            pb.RevokeUserSessionsRequest(user_id=user_id, keep_session_id=keep_session_id),
            unavailable="the change is made but the account's sessions could not be revoked "
            "yet (session service unreachable); repeat the call to finish",
            idempotent=True,  # revoking what is already revoked changes nothing
        )
        return reply.revoked_count
