"""gRPC transport for the relay: authenticate, check the recipient, delegate to the queues."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from securemsg.relay.v1 import relay_admin_service_pb2 as admin_pb
from securemsg.relay.v1 import relay_admin_service_pb2_grpc as admin_grpc
from securemsg.relay.v1 import relay_service_pb2 as pb
from securemsg.relay.v1 import relay_service_pb2_grpc as pb_grpc

from services.common import audit_events, convert, peers
from services.common.auth import AuthenticatedUser, TokenValidator, bearer_token
from services.common.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from services.common.outbox import Outbox
from services.common.peers import Context
from services.relay.queues import Message, MessageQueues

DEFAULT_FETCH = 100
MAX_FETCH = 1000
MAX_ACK_IDS = 1000


class RecipientDirectory(Protocol):
    """What the relay asks identity: is this user someone we may queue for?"""

    async def is_active(self, user_id: str) -> bool: ...


def _envelope(message: Message) -> pb.Envelope:
    return pb.Envelope(
        message_id=message.message_id,
        sender_id=message.sender_id,
        body=bytes(message.body),
        send_time=convert.timestamp(message.send_time),
        expire_time=convert.timestamp(message.expire_time),
    )


class _AuditedTokens:
    """Token checks that leave an auth_failed event (per address, at most once a minute)."""

    def __init__(self, tokens: TokenValidator, queues: MessageQueues) -> None:
        self._tokens = tokens
        self._queues = queues

    async def check(self, context: Context, token: str | None = None) -> AuthenticatedUser:
        try:
            return await self._tokens.validate(
                token if token is not None else bearer_token(context)
            )
        except Unauthenticated:
            self._queues.announce(audit_events.AUTH_FAILED, "", {"ip": peers.peer_host(context)})
            raise


class RelayServicer(pb_grpc.RelayServiceServicer):
    def __init__(
        self,
        queues: MessageQueues,
        tokens: TokenValidator,
        recipients: RecipientDirectory,
        *,
        revalidate_seconds: float,
        fetch_budget_bytes: int,
    ) -> None:
        self._queues = queues
        self._tokens = _AuditedTokens(tokens, queues)
        self._recipients = recipients
        self._revalidate = revalidate_seconds
        self._fetch_budget = fetch_budget_bytes

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Context
    ) -> pb.SendMessageResponse:
        sender = await self._tokens.check(context)
        asked = request.ttl
        requested = asked.seconds + asked.nanos / 1e9 if request.HasField("ttl") else None
        ttl = self._queues.admit(sender.user_id, request.recipient_id, request.body, requested)
        if not await self._recipients.is_active(request.recipient_id):
            raise NotFound("no active user with that recipient_id")
        message = self._queues.send(sender.user_id, request.recipient_id, request.body, ttl)
        return pb.SendMessageResponse(
            message_id=message.message_id, expire_time=convert.timestamp(message.expire_time)
        )

    async def FetchMessages(
        self, request: pb.FetchMessagesRequest, context: Context
    ) -> pb.FetchMessagesResponse:
        caller = await self._tokens.check(context)
        limit = request.max_messages or DEFAULT_FETCH
        if limit > MAX_FETCH:
            raise InvalidArgument(f"max_messages must be at most {MAX_FETCH}")
        messages = self._queues.pending(caller.user_id, limit, self._fetch_budget)
        return pb.FetchMessagesResponse(messages=[_envelope(m) for m in messages])

    async def AcknowledgeMessages(
        self, request: pb.AcknowledgeMessagesRequest, context: Context
    ) -> pb.AcknowledgeMessagesResponse:
        caller = await self._tokens.check(context)
        ids = list(request.message_ids)
        if not ids:
            raise InvalidArgument("message_ids must name at least one message")
        if len(ids) > MAX_ACK_IDS:
            raise InvalidArgument(f"message_ids may hold at most {MAX_ACK_IDS} ids")
        count = self._queues.acknowledge(caller.user_id, ids)
        return pb.AcknowledgeMessagesResponse(acknowledged_count=count)

    async def SubscribeMessages(
        self, request: pb.SubscribeMessagesRequest, context: Context
    ) -> AsyncIterator[pb.SubscribeMessagesResponse]:
        token = bearer_token(context)
        caller = await self._tokens.check(context, token)
        loop = asyncio.get_running_loop()
        wakeup = self._queues.watch(caller.user_id)
        delivered: set[str] = set()
        recheck_at = loop.time() + self._revalidate
        try:
            while True:
                wakeup.clear()  # before reading, so an arrival during the yields is not missed
                pending = self._queues.pending(caller.user_id)
                delivered &= {m.message_id for m in pending}
                for message in pending:
                    if message.message_id not in delivered:
                        delivered.add(message.message_id)
                        yield pb.SubscribeMessagesResponse(message=_envelope(message))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(recheck_at):
                        await _first_of(wakeup, self._queues.closing)
                if self._queues.closing.is_set():
                    raise Unavailable("the relay is restarting; subscribe again")
                if loop.time() >= recheck_at:
                    await self._tokens.check(context, token)  # a revoked token ends the stream
                    recheck_at = loop.time() + self._revalidate
        finally:
            self._queues.unwatch(caller.user_id, wakeup)


async def _first_of(first: asyncio.Event, second: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class RelayAdminServicer(admin_grpc.RelayAdminServiceServicer):
    def __init__(self, queues: MessageQueues, outbox: Outbox) -> None:
        self._queues = queues
        self._outbox = outbox

    async def GetRelayStats(
        self, request: admin_pb.GetRelayStatsRequest, context: Context
    ) -> admin_pb.GetRelayStatsResponse:
        stats = self._queues.stats()
        return admin_pb.GetRelayStatsResponse(
            queued_messages=stats.queued_messages,
            queued_bytes=stats.queued_bytes,
            recipients=stats.recipients,
            subscribers=stats.subscribers,
            audit_outbox_backlog=self._outbox.backlog(),
        )
