"""gRPC transport for sessions: authenticate, convert, delegate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from securemsg.session.v1 import session_admin_service_pb2 as admin_pb
from securemsg.session.v1 import session_admin_service_pb2_grpc as admin_grpc
from securemsg.session.v1 import session_internal_service_pb2 as internal_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as internal_grpc
from securemsg.session.v1 import session_pb2
from securemsg.session.v1 import session_service_pb2 as pb
from securemsg.session.v1 import session_service_pb2_grpc as pb_grpc

from services.common import assurance, convert
from services.common.addresses import ClientAddresses
from services.common.auth import bearer_token
from services.common.errors import PermissionDenied
from services.common.peers import Context
from services.session.login import Login
from services.session.model import SessionRecord
from services.session.recovery import PasswordLogin
from services.session.sessions import Sessions

_ANY_SCOPE = frozenset({assurance.FULL, assurance.STEP_UP_REQUIRED, assurance.RECOVERY})


def _session(record: SessionRecord, current_id: str, sessions: Sessions) -> session_pb2.Session:
    return session_pb2.Session(
        session_id=record.session_id,
        user_id=record.user_id,
        create_time=convert.timestamp(record.create_time),
        last_seen_time=convert.timestamp(sessions.last_seen(record)),
        expire_time=convert.timestamp(record.expire_time),
        ip_address=record.ip_address,
        user_agent=record.user_agent,
        current=record.session_id == current_id,
        assurance_level=assurance.level_value(record.assurance.level),
        scope=assurance.scope_value(record.assurance.scope),
        step_up_time=convert.optional_timestamp(record.assurance.step_up_time),
    )


def _user_agent(request_value: str, context: Context) -> str:
    if request_value:
        return request_value
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent" and isinstance(value, str):
            return value[:256]
    return ""


class SessionServicer(pb_grpc.SessionServiceServicer):
    def __init__(
        self,
        sessions: Sessions,
        login: Login,
        password_login: PasswordLogin,
        addresses: ClientAddresses,
    ) -> None:
        self._sessions = sessions
        self._login = login
        self._password_login = password_login
        self._addresses = addresses

    async def _caller(
        self,
        context: Context,
        scopes: frozenset[str] = frozenset({assurance.FULL}),
        *,
        recent_step_up: bool = False,
    ) -> SessionRecord:
        token = bearer_token(context)
        record = self._sessions.validate_remembered(token)
        if record is None:
            record = await asyncio.to_thread(self._sessions.validate, token)
        return self._sessions.require(record, scopes, recent_step_up=recent_step_up)

    async def CreateChallenge(
        self, request: pb.CreateChallengeRequest, context: Context
    ) -> pb.CreateChallengeResponse:
        challenge = await self._login.challenge(request.user_id, self._addresses.of(context))
        return pb.CreateChallengeResponse(
            challenge_id=challenge.challenge_id,
            challenge=challenge.nonce,
            expire_time=convert.timestamp(challenge.expire_time),
        )

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.CreateSessionResponse:
        token, record = await self._login.sign_in(
            request.user_id,
            request.challenge_id,
            request.signature,
            address=self._addresses.of(context),
            user_agent=_user_agent(request.user_agent, context),
        )
        return pb.CreateSessionResponse(
            token=token, session=_session(record, record.session_id, self._sessions)
        )

    async def TouchSession(
        self, request: pb.TouchSessionRequest, context: Context
    ) -> pb.TouchSessionResponse:
        caller = await self._caller(context)
        record = await asyncio.to_thread(self._sessions.touch, caller)
        return pb.TouchSessionResponse(session=_session(record, caller.session_id, self._sessions))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        caller = await self._caller(context)
        page = await asyncio.to_thread(
            self._sessions.list, caller.user_id, request.page_size, request.page_token
        )
        return pb.ListSessionsResponse(
            sessions=[_session(r, caller.session_id, self._sessions) for r in page.sessions],
            next_page_token=page.next_page_token,
        )

    async def StepUpSession(
        self, request: pb.StepUpSessionRequest, context: Context
    ) -> pb.StepUpSessionResponse:
        caller = await self._caller(
            context, frozenset({assurance.FULL, assurance.STEP_UP_REQUIRED})
        )
        record = await self._login.step_up(
            caller,
            code=request.code,
            recovery_code=request.recovery_code,
            challenge_id=request.challenge_id,
            signature=request.signature,
            address=self._addresses.of(context),
        )
        return pb.StepUpSessionResponse(session=_session(record, record.session_id, self._sessions))

    async def CreatePasswordSession(
        self, request: pb.CreatePasswordSessionRequest, context: Context
    ) -> pb.CreatePasswordSessionResponse:
        token, record = await self._password_login.sign_in(
            request.user_id,
            request.password,
            code=request.second_factor_code,
            recovery_code=request.recovery_code,
            address=self._addresses.of(context),
            user_agent=_user_agent(request.user_agent, context),
        )
        return pb.CreatePasswordSessionResponse(
            token=token, session=_session(record, record.session_id, self._sessions)
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        caller = await self._caller(context, _ANY_SCOPE)
        await asyncio.to_thread(self._sessions.delete, caller, request.session_id)
        return pb.DeleteSessionResponse()

    async def RevokeOtherSessions(
        self, request: pb.RevokeOtherSessionsRequest, context: Context
    ) -> pb.RevokeOtherSessionsResponse:
        caller = await self._caller(context, recent_step_up=True)
        count = await asyncio.to_thread(self._sessions.revoke_others, caller)
        return pb.RevokeOtherSessionsResponse(revoked_count=count)


class SessionInternalServicer(internal_grpc.SessionInternalServiceServicer):
    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions

    async def ValidateSession(
        self, request: internal_pb.ValidateSessionRequest, context: Context
    ) -> internal_pb.ValidateSessionResponse:
        # From memory when it can say (no thread, no query); otherwise from the store.
        record = self._sessions.validate_remembered(request.token)
        if record is None:
            record = await asyncio.to_thread(
                self._sessions.validate, request.token, strict_shape=True
            )
        # Fail closed: a service that does not ask for restricted sessions never sees one.
        if record.assurance.scope != assurance.FULL and not request.accept_restricted:
            raise PermissionDenied(assurance.RESTRICTED)
        return internal_pb.ValidateSessionResponse(
            user_id=record.user_id,
            session_id=record.session_id,
            expire_time=convert.timestamp(record.expire_time),
            assurance_level=assurance.level_value(record.assurance.level),
            scope=assurance.scope_value(record.assurance.scope),
            step_up_expire_time=convert.optional_timestamp(
                self._sessions.step_up_expire_time(record)
            ),
        )


class SessionAdminServicer(admin_grpc.SessionAdminServiceServicer):
    def __init__(self, sessions: Sessions, login: Login, audit_backlog: Callable[[], int]) -> None:
        self._sessions = sessions
        self._login = login
        self._audit_backlog = audit_backlog  # the outbox is storage: only its size here

    async def RevokeUserSessions(
        self, request: admin_pb.RevokeUserSessionsRequest, context: Context
    ) -> admin_pb.RevokeUserSessionsResponse:
        count = await asyncio.to_thread(
            self._sessions.revoke_user, request.user_id, request.keep_session_id
        )
        return admin_pb.RevokeUserSessionsResponse(revoked_count=count)

    async def CleanupExpiredSessions(
        self, request: admin_pb.CleanupExpiredSessionsRequest, context: Context
    ) -> admin_pb.CleanupExpiredSessionsResponse:
        count = await asyncio.to_thread(self._sessions.cleanup)
        return admin_pb.CleanupExpiredSessionsResponse(deleted_count=count)

    async def GetSessionStats(
        self, request: admin_pb.GetSessionStatsRequest, context: Context
    ) -> admin_pb.GetSessionStatsResponse:
        active, users = await asyncio.to_thread(self._sessions.counts)
        backlog = await asyncio.to_thread(self._audit_backlog)
        return admin_pb.GetSessionStatsResponse(
            audit_outbox_backlog=backlog,
            active_sessions=active,
            users_with_sessions=users,
            pending_challenges=await self._login.pending_challenges(),
        )
