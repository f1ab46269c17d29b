"""Hot paths of the real services, and the bare echo ceiling, under the same load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
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


async def echo_ceiling(stack: Stack, concurrency: int, seconds: float) -> load.Result:
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

            return await load.run("echo (ceiling)", call, concurrency=concurrency, seconds=seconds)
    finally:
        server.terminate()
        await server.wait()


async def hot_paths(stack: Stack, concurrency: int, seconds: float) -> list[load.Result]:
    client = user_client(stack)
    reader_keys = new_user(client, "bench-reader")
    token = client.login("bench-reader", reader_keys)
    for i in range(50):
        new_user(client, f"bench-peer{i}", one_time=100)
    new_user(client, "bench-inbox", one_time=0)
    inbox_token = (
        client.login("bench-inbox", new_user(client, "bench-inbox2", one_time=0)) if False else ""
    )
    inbox_keys = UserKeys.generate(0)
    client.identity.RegisterUser(registration("bench-sink", inbox_keys), timeout=10)
    sink_token = client.login("bench-sink", inbox_keys)
    del inbox_token
    client.close()

    # Registration requests are made ahead: key generation is the client's cost.
    prepared = [
        registration(f"bench-new-{n}", UserKeys.generate(5))
        for n in range(int(seconds * 1500) + 1000)
    ]
    results = []
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
            await identity.RegisterUser(prepared[n % len(prepared)], timeout=10)

        async def bundle(n: int) -> None:
            request = identity_pb.GetKeyBundleRequest(user_id=f"bench-peer{n % 50}")
            await identity.GetKeyBundle(request, metadata=bearer(token), timeout=10)

        async def validate_session(_: int) -> None:
            await validate.ValidateSession(
                internal_pb.ValidateSessionRequest(token=token), timeout=10
            )

        async def send(_: int) -> None:
            request = relay_pb.SendMessageRequest(recipient_id="bench-sink", body=PAYLOAD)
            await relay.SendMessage(request, metadata=bearer(token), timeout=10)

        batch = 50

        async def append(_: int) -> None:
            now = convert.timestamp(time.time())
            events = [
                audit_event_pb2.AuditEvent(
                    event_id=uuid.uuid4().hex, action="user_login", source="identity",
                    user_id="bench-peer1", occur_time=now, details={"ip": "10.0.0.1"},
                )
                for _ in range(batch)
            ]  # fmt: skip
            await ingest.AppendAuditEvents(
                ingest_pb.AppendAuditEventsRequest(events=events), timeout=10
            )

        async def list_events(_: int) -> None:
            await audit.ListAuditEvents(audit_pb.ListAuditEventsRequest(page_size=50), timeout=10)

        for name, call in (
            ("register user", register),
            ("get key bundle", bundle),
            ("validate session", validate_session),
            ("relay send", send),
            (f"audit append ({batch}/call)", append),
            ("audit list (50/page)", list_events),
        ):
            results.append(await load.run(name, call, concurrency=concurrency, seconds=seconds))
        results.append(await relay_delivery(relay, token, sink_token, concurrency, seconds))
    return results


async def relay_delivery(
    relay: Any,
    sender_token: str,
    recipient_token: str,
    concurrency: int,
    seconds: float,
) -> load.Result:
    """send -> live stream -> ack; latency from send to arrival on the stream."""
    # Drain what earlier cases queued, so the stream starts empty.
    while True:
        page = await relay.FetchMessages(
            relay_pb.FetchMessagesRequest(max_messages=1000), metadata=bearer(recipient_token)
        )
        if not page.messages:
            break
        ids = [m.message_id for m in page.messages]
        await relay.AcknowledgeMessages(
            relay_pb.AcknowledgeMessagesRequest(message_ids=ids), metadata=bearer(recipient_token)
        )
    arrivals: dict[bytes, asyncio.Future[None]] = {}
    stream = relay.SubscribeMessages(
        relay_pb.SubscribeMessagesRequest(), metadata=bearer(recipient_token)
    )

    async def receive() -> None:
        async for item in stream:
            message = item.message
            waiter = arrivals.pop(message.body, None)
            await relay.AcknowledgeMessages(
                relay_pb.AcknowledgeMessagesRequest(message_ids=[message.message_id]),
                metadata=bearer(recipient_token),
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
        await relay.SendMessage(request, metadata=bearer(sender_token), timeout=10)
        await asyncio.wait_for(arrived, 10)

    try:
        return await load.run(
            "relay delivery (send, stream, ack)", deliver, concurrency=concurrency, seconds=seconds
        )
    finally:
        stream.cancel()
        receiver.cancel()


def start_stack(root: Path) -> Stack:
    stack = Stack(root, ("identity", "session", "relay", "audit"), extra_env=UNLIMITED)
    stack.start()
    return stack
