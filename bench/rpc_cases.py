"""Hot paths of the real services, and the bare echo ceiling, under the same load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from securemsg.audit.v1 import audit_event_pb2
from securemsg.audit.v1 import audit_ingest_service_pb2 as ingest_pb
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.audit.v1 import audit_service_pb2 as audit_pb
from securemsg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.identity.v1 import identity_service_pb2_grpc as identity_grpc
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc
from securemsg.session.v1 import session_internal_service_pb2 as internal_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as internal_grpc

from bench import load
from bench.echo_server import METHOD
from services.client.keys import UserKeys
from services.common import convert
from tests.support.stack import Stack, free_port
from tests.support.users import new_user, registration, user_client

PAYLOAD = bytes(120)  # about the size of the smaller requests below
AUDIT_BATCH = 50
# Case names that the summary refers to.
REGISTER, BUNDLE, VALIDATE = "register user", "get key bundle", "validate session"
DELIVERY = "relay delivery (send, stream, ack)"
BATCHED = "relay delivery, batched (SendMessages, StreamMessages)"
GROUP = 8  # recipients of each batched call
PRODUCTION_CACHES = {"TOKEN_CACHE_SECONDS": "2", "RECIPIENT_CACHE_SECONDS": "10"}
UNLIMITED = {
    "identity": PRODUCTION_CACHES,
    "audit": PRODUCTION_CACHES,
    "session": {"LOGIN_CHALLENGES_PER_MINUTE": "100000000"},
    "relay": {
        **PRODUCTION_CACHES,
        "RELAY_SENDS_PER_MINUTE": "100000000",
        "RELAY_MAX_QUEUE_MESSAGES": "10000000",
        "RELAY_MAX_QUEUE_BYTES": "4000000000",
        "RELAY_MAX_TOTAL_BYTES": "4000000000",
        "RELAY_MAX_SENDER_MESSAGES": "10000000",
        "RELAY_MAX_SENDER_BYTES": "4000000000",
    },
}


def aio_channel(stack: Stack, name: str, cert: str | None = None) -> grpc.aio.Channel:
    tls = stack.layout.tls
    ca = (tls / "ca.pem").read_bytes()
    if cert is None:
        return grpc.aio.secure_channel(
            stack[name].env["LISTEN_ADDRESS"], grpc.ssl_channel_credentials(ca)
        )
    credentials = grpc.ssl_channel_credentials(
        ca, (tls / f"{cert}.key").read_bytes(), (tls / f"{cert}.pem").read_bytes()
    )
    return grpc.aio.secure_channel(stack[name].env["INTERNAL_LISTEN_ADDRESS"], credentials)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class Peer:
    """A case's call, and the process that answers it (for CPU accounting)."""

    call: load.Call
    pid: int


@asynccontextmanager
async def echo_case(stack: Stack) -> AsyncIterator[Peer]:
    """The ceiling: a bare echo call, in its own process, over the same TLS."""
    address = f"127.0.0.1:{free_port()}"
    tls = stack.layout.tls
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.echo_server", address, str(tls / "identity.pem"),
        str(tls / "identity.key"), stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        await server.stdout.readline()  # "serving"
        ca = (tls / "ca.pem").read_bytes()
        async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(ca)) as channel:
            echo = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

            async def call(_: int) -> None:
                await echo(PAYLOAD, timeout=10)

            yield Peer(call, server.pid)
    finally:
        server.terminate()
        await server.wait()


@dataclass
class Actors:
    """Who the cases act as, and the channels they use."""

    token: str  # a user with a full session (bench-reader)
    sink_token: str  # the recipient of the delivery case
    relay: Any  # RelayService stub
    group_tokens: list[str]  # the recipients of the batched delivery case, in order


@asynccontextmanager
async def hot_cases(
    stack: Stack, seconds: float
) -> AsyncIterator[tuple[list[tuple[str, load.Call]], Actors]]:
    """The unary hot paths, ready to call; and who they act as."""
    client = user_client(stack)
    reader_keys = new_user(client, "bench-reader")
    token = client.login("bench-reader", reader_keys)
    for i in range(50):
        new_user(client, f"bench-peer{i}", one_time=100)
    new_user(client, "bench-mailbox", one_time=0)  # relay send's recipient; never reads
    sink_keys = UserKeys.generate(0)
    client.identity.RegisterUser(registration("bench-sink", sink_keys), timeout=10)
    sink_token = client.login("bench-sink", sink_keys)
    group_tokens = [
        client.login(f"bench-member{i}", new_user(client, f"bench-member{i}", one_time=0))
        for i in range(GROUP)
    ]
    client.close()

    # Registration requests are made ahead: key generation is the client's cost. The
    # server checks signatures over keys, not user ids, so key sets are reused.
    key_sets = [UserKeys.generate(5) for _ in range(100)]
    prepared = [
        registration(f"bench-new-{n}", key_sets[n % len(key_sets)])
        for n in range(int(seconds * 4000) + 2000)
    ]
    async with (
        aio_channel(stack, "identity") as identity_channel,
        aio_channel(stack, "session", cert="relay") as session_channel,
        aio_channel(stack, "relay") as relay_channel,
        aio_channel(stack, "audit", cert="identity") as ingest_channel,
        aio_channel(stack, "audit", cert="operator") as audit_channel,
    ):
        # Any: the generated stubs type only the synchronous flavour of these calls.
        identity: Any = identity_grpc.IdentityServiceStub(identity_channel)
        validate: Any = internal_grpc.SessionInternalServiceStub(session_channel)
        relay: Any = relay_grpc.RelayServiceStub(relay_channel)
        ingest: Any = ingest_grpc.AuditIngestServiceStub(ingest_channel)
        audit: Any = audit_grpc.AuditServiceStub(audit_channel)

        async def register(n: int) -> None:
            # Past the prepared ones a request is a duplicate and fails (counted as errors).
            await identity.RegisterUser(prepared[n % len(prepared)], timeout=10)

        async def bundle(n: int) -> None:
            request = identity_pb.GetKeyBundleRequest(user_id=f"bench-peer{n % 50}")
            await identity.GetKeyBundle(request, metadata=bearer(token), timeout=10)

        async def validate_session(_: int) -> None:
            await validate.ValidateSession(
                internal_pb.ValidateSessionRequest(token=token), timeout=10
            )

        async def send(_: int) -> None:
            request = relay_pb.SendMessageRequest(recipient_id="bench-mailbox", body=PAYLOAD)
            await relay.SendMessage(request, metadata=bearer(token), timeout=10)

        async def append(_: int) -> None:
            now = convert.timestamp(time.time())
            events = [
                audit_event_pb2.AuditEvent(
                    event_id=uuid.uuid4().hex, action="user_login", source="identity",
                    user_id="bench-peer1", occur_time=now, details={"ip": "10.0.0.1"},
                )
                for _ in range(AUDIT_BATCH)
            ]  # fmt: skip
            await ingest.AppendAuditEvents(
                ingest_pb.AppendAuditEventsRequest(events=events), timeout=10
            )

        async def list_events(_: int) -> None:
            await audit.ListAuditEvents(audit_pb.ListAuditEventsRequest(page_size=50), timeout=10)

        cases: list[tuple[str, load.Call]] = [
            (REGISTER, register),
            (BUNDLE, bundle),
            (VALIDATE, validate_session),
            ("relay send", send),
            (f"audit append ({AUDIT_BATCH}/call)", append),
            ("audit list (50/page)", list_events),
        ]
        yield cases, Actors(token, sink_token, relay, group_tokens)


@asynccontextmanager
async def relay_delivery(actors: Actors) -> AsyncIterator[load.Call]:
    """send -> live stream -> ack, one message per call; latency from send to arrival."""
    relay, recipient = actors.relay, bearer(actors.sink_token)
    arrivals: dict[bytes, asyncio.Future[None]] = {}
    stream = relay.SubscribeMessages(relay_pb.SubscribeMessagesRequest(), metadata=recipient)

    async def receive() -> None:
        async for item in stream:
            message = item.message
            waiter = arrivals.pop(message.body, None)
            await relay.AcknowledgeMessages(
                relay_pb.AcknowledgeMessagesRequest(message_ids=[message.message_id]),
                metadata=recipient,
                timeout=10,
            )
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    receiver = asyncio.create_task(receive())

    async def deliver(n: int) -> None:
        body = n.to_bytes(8, "big") + PAYLOAD
        arrived = asyncio.get_running_loop().create_future()
        arrivals[body] = arrived
        request = relay_pb.SendMessageRequest(recipient_id="bench-sink", body=body)
        await relay.SendMessage(request, metadata=bearer(actors.token), timeout=10)
        await asyncio.wait_for(arrived, 10)

    try:
        yield deliver
    finally:
        stream.cancel()
        receiver.cancel()


def start_stack(root: Path) -> Stack:
    stack = Stack(root, ("identity", "session", "relay", "audit"), extra_env=UNLIMITED)
    stack.start()
    return stack


@asynccontextmanager
async def relay_batched_delivery(actors: Actors) -> AsyncIterator[load.Call]:
    """One call = one SendMessages to GROUP members; each member holds one StreamMessages
    stream and acknowledges each response's messages on it in one request. Latency:
    until all GROUP messages arrived."""
    relay = actors.relay
    arrivals: dict[bytes, asyncio.Future[None]] = {}
    streams = [relay.StreamMessages(metadata=bearer(token)) for token in actors.group_tokens]

    async def receive(stream: Any) -> None:
        async for response in stream:
            for message in response.messages:
                waiter = arrivals.pop(message.body, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            ids = [message.message_id for message in response.messages]
            await stream.write(relay_pb.StreamMessagesRequest(acknowledged_message_ids=ids))

    receivers = [asyncio.create_task(receive(stream)) for stream in streams]

    async def deliver(n: int) -> None:
        loop = asyncio.get_running_loop()
        outgoing, waits = [], []
        for i in range(GROUP):
            body = n.to_bytes(8, "big") + i.to_bytes(2, "big") + PAYLOAD
            arrivals[body] = loop.create_future()
            waits.append(arrivals[body])
            outgoing.append(relay_pb.OutgoingMessage(recipient_id=f"bench-member{i}", body=body))
        request = relay_pb.SendMessagesRequest(messages=outgoing)
        await relay.SendMessages(request, metadata=bearer(actors.token), timeout=10)
        await asyncio.wait_for(asyncio.gather(*waits), 10)

    try:
        yield deliver
    finally:
        for stream in streams:
            stream.cancel()
        for receiver in receivers:
            receiver.cancel()


def per_message(result: load.Result, batch: int) -> load.Result:
    """A batched case counted in messages delivered (each call carries `batch`)."""
    return load.Result(
        result.name, result.calls * batch, result.errors, result.seconds, result.p50_ms,
        result.p99_ms, {process: us / batch for process, us in result.cpu_us.items()},
    )  # fmt: skip


def service_pids(stack: Stack) -> dict[str, int]:
    return {
        name: service.process.pid
        for name, service in stack.services.items()
        if service.process is not None
    }
