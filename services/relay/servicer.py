"""gRPC transport for the relay: authenticate, convert, delegate to `Relay`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from google.protobuf.timestamp_pb2 import Timestamp
from securemsg.relay.v1 import relay_admin_service_pb2 as admin_pb
from securemsg.relay.v1 import relay_admin_service_pb2_grpc as admin_grpc
from securemsg.relay.v1 import relay_service_pb2 as pb
from securemsg.relay.v1 import relay_service_pb2_grpc as pb_grpc

from services.common import convert
from services.common.addresses import ClientAddresses, limit_key
from services.common.auth import AuthenticatedUser, TokenValidator, bearer_token
from services.common.errors import Unauthenticated
from services.common.peers import Context
from services.relay.domain import Relay
from services.relay.model import Message, Outgoing


def _envelope(message: Message) -> pb.Envelope:
    envelope = pb.Envelope(
        message_id=message.message_id, sender_id=message.sender_id, body=bytes(message.body)
    )
    # Set in place: a Timestamp built apart and then copied in cost twice as much, once
    # per message streamed.
    _set_time(envelope.send_time, message.send_time)
    _set_time(envelope.expire_time, message.expire_time)
    return envelope


def _set_time(field: Timestamp, seconds: float) -> None:
    """convert.timestamp's value, written into a message's own field."""
    nanos = int(seconds * 1e9)
    field.seconds, field.nanos = divmod(nanos, 1_000_000_000)


class _AuditedTokens:
    """Token checks that leave an auth_failed event."""

    def __init__(self, tokens: TokenValidator, relay: Relay, addresses: ClientAddresses) -> None:
        self._tokens = tokens
        self._relay = relay
        self._addresses = addresses

    async def check(self, context: Context, token: str | None = None) -> AuthenticatedUser:
        try:
            return await self._tokens.validate(
                token if token is not None else bearer_token(context)
            )
        except Unauthenticated:
            self._relay.auth_failed(limit_key(self._addresses.of(context)))
            raise


class RelayServicer(pb_grpc.RelayServiceServicer):
    def __init__(
        self, relay: Relay, tokens: TokenValidator, addresses: ClientAddresses | None = None
    ) -> None:
        self._relay = relay
        self._tokens = _AuditedTokens(tokens, relay, addresses or ClientAddresses())

    async def SendMessage(
        self, request: pb.SendMessageRequest, context: Context
    ) -> pb.SendMessageResponse:
        sender = await self._tokens.check(context)
        asked = request.ttl
        requested = asked.seconds + asked.nanos / 1e9 if request.HasField("ttl") else None
        message = await self._relay.send(
            sender.user_id, request.recipient_id, request.body, requested, request.client_message_id
        )
        return pb.SendMessageResponse(
            message_id=message.message_id, expire_time=convert.timestamp(message.expire_time)
        )

    async def FetchMessages(
        self, request: pb.FetchMessagesRequest, context: Context
    ) -> pb.FetchMessagesResponse:
        caller = await self._tokens.check(context)
        messages = await self._relay.fetch(caller.user_id, request.max_messages)
        return pb.FetchMessagesResponse(messages=[_envelope(m) for m in messages])

    async def AcknowledgeMessages(
        self, request: pb.AcknowledgeMessagesRequest, context: Context
    ) -> pb.AcknowledgeMessagesResponse:
        caller = await self._tokens.check(context)
        count = await self._relay.acknowledge(caller.user_id, list(request.message_ids))
        return pb.AcknowledgeMessagesResponse(acknowledged_count=count)

    async def SubscribeMessages(
        self, request: pb.SubscribeMessagesRequest, context: Context
    ) -> AsyncIterator[pb.SubscribeMessagesResponse]:
        token = bearer_token(context)
        caller = await self._tokens.check(context, token)
        messages = self._relay.subscribe(caller.user_id, lambda: self._tokens.check(context, token))
        async with contextlib.aclosing(messages):
            async for message in messages:
                yield pb.SubscribeMessagesResponse(message=_envelope(message))

    async def SendMessages(
        self, request: pb.SendMessagesRequest, context: Context
    ) -> pb.SendMessagesResponse:
        sender = await self._tokens.check(context)
        asked = request.ttl
        requested = asked.seconds + asked.nanos / 1e9 if request.HasField("ttl") else None
        outgoing = [Outgoing(m.recipient_id, m.body, m.client_message_id) for m in request.messages]
        messages = await self._relay.send_many(sender.user_id, outgoing, requested)
        response = pb.SendMessagesResponse()
        for message in messages:
            result = response.results.add(message_id=message.message_id)
            _set_time(result.expire_time, message.expire_time)
        return response

    async def StreamMessages(
        self, request_iterator: AsyncIterator[pb.StreamMessagesRequest], context: Context
    ) -> AsyncIterator[pb.StreamMessagesResponse]:
        token = bearer_token(context)
        caller = await self._tokens.check(context, token)

        async def acknowledgements() -> AsyncIterator[list[str]]:
            async for request in request_iterator:
                yield list(request.acknowledged_message_ids)

        batches = self._relay.exchange(
            caller.user_id, acknowledgements(), lambda: self._tokens.check(context, token)
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                yield pb.StreamMessagesResponse(messages=[_envelope(m) for m in batch])


class RelayAdminServicer(admin_grpc.RelayAdminServiceServicer):
    def __init__(
        self, relay: Relay, audit_backlog: Callable[[], int], audit_dropped: Callable[[], int]
    ) -> None:
        self._relay = relay
        self._audit_backlog = audit_backlog
        self._audit_dropped = audit_dropped

    async def GetRelayStats(
        self, request: admin_pb.GetRelayStatsRequest, context: Context
    ) -> admin_pb.GetRelayStatsResponse:
        stats = await self._relay.stats()
        return admin_pb.GetRelayStatsResponse(
            queued_messages=stats.queued_messages,
            queued_bytes=stats.queued_bytes,
            recipients=stats.recipients,
            subscribers=stats.subscribers,
            audit_outbox_backlog=self._audit_backlog(),
            audit_events_dropped=self._audit_dropped(),
        )
