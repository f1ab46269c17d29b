"""Relay delivery with its queues in Redis, one and two replicas, beside the in-memory relay
and a bare Redis list, measured interleaved in one run.

Every relay case is the delivery case of bench/rpc_cases.py (send, live
SubscribeMessages push, AcknowledgeMessages; latency from send to arrival). The Redis is
private and hardened as in production (tests/support/redis.py). With two replicas the
senders alternate between them and the two recipients listen one on each, so half the
pushes cross from one replica to the other through Redis, as round-robin load balancing
would have it. On a 2-core machine a second replica shows the cost of sharing the cores
and Redis, not a gain.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc

from bench import load, redis_queue
from bench.rpc_cases import PAYLOAD, UNLIMITED, bearer
from tests.support.redis import RedisServer, prefix, relay_env
from tests.support.replicas import add_replica
from tests.support.stack import ServiceProcess, Stack
from tests.support.users import new_user, user_client

SERVICES = ("identity", "session", "relay", "audit")
MEMORY = "relay delivery [memory]"
ONE = "relay delivery [Redis x1]"
TWO = "relay delivery [Redis x2]"


@dataclass(frozen=True)
class Sink:
    """A recipient listening on one relay process."""

    relay: Any  # RelayService stub of the process it subscribes to
    user_id: str
    token: str


@asynccontextmanager
async def spread_delivery(
    senders: list[Any], token: str, sinks: list[Sink]
) -> AsyncIterator[load.Call]:
    """Call n sends through senders[n % len(senders)] to sinks[(n // len(senders)) %
    len(sinks)]; with one of each it is exactly rpc_cases.relay_delivery."""
    arrivals: dict[bytes, asyncio.Future[None]] = {}
    streams = [
        sink.relay.SubscribeMessages(
            relay_pb.SubscribeMessagesRequest(), metadata=bearer(sink.token)
        )
        for sink in sinks
    ]

    async def receive(sink: Sink, stream: Any) -> None:
        async for item in stream:
            message = item.message
            waiter = arrivals.pop(message.body, None)
            await sink.relay.AcknowledgeMessages(
                relay_pb.AcknowledgeMessagesRequest(message_ids=[message.message_id]),
                metadata=bearer(sink.token),
                timeout=10,
            )
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    receivers = [
        asyncio.create_task(receive(sink, stream))
        for sink, stream in zip(sinks, streams, strict=True)
    ]

    async def deliver(n: int) -> None:
        sender = senders[n % len(senders)]
        sink = sinks[(n // len(senders)) % len(sinks)]
        body = n.to_bytes(8, "big") + PAYLOAD
        arrived = asyncio.get_running_loop().create_future()
        arrivals[body] = arrived
        request = relay_pb.SendMessageRequest(recipient_id=sink.user_id, body=body)
        await sender.SendMessage(request, metadata=bearer(token), timeout=10)
        await asyncio.wait_for(arrived, 10)

    try:
        yield deliver
    finally:
        for stream in streams:
            stream.cancel()
        for receiver in receivers:
            receiver.cancel()


def _users(stack: Stack, sinks: int) -> tuple[str, list[tuple[str, str]]]:
    """A sender's token, and `sinks` recipients (user id, token)."""
    client = user_client(stack)
    try:
        token = client.login("bench-sender", new_user(client, "bench-sender"))
        recipients = [
            (f"bench-sink{i}", client.login(f"bench-sink{i}", new_user(client, f"bench-sink{i}")))
            for i in range(sinks)
        ]
    finally:
        client.close()
    return token, recipients


def _channel(stack: Stack, process: ServiceProcess) -> grpc.aio.Channel:
    ca = (stack.layout.tls / "ca.pem").read_bytes()
    return grpc.aio.secure_channel(process.env["LISTEN_ADDRESS"], grpc.ssl_channel_credentials(ca))


async def compare(
    root: Path, *, concurrency: int, seconds: float, rounds: int, pids: dict[str, int]
) -> list[load.Result]:
    """The four cases interleaved; their processes' pids go into `pids` for CPU use."""
    server = RedisServer()
    async with AsyncExitStack() as cleanup:
        server.start()  # first: the relay's REDIS_URL names its port
        cleanup.callback(server.stop)
        shared = {"relay": {**UNLIMITED["relay"], **relay_env(server, prefix())}}
        memory = Stack(root / "relay-memory", SERVICES, extra_env=UNLIMITED)
        cleanup.callback(memory.stop)
        memory.start()
        on_redis = Stack(root / "relay-redis", SERVICES, extra_env={**UNLIMITED, **shared})
        cleanup.callback(on_redis.stop)
        on_redis.start()
        replica = add_replica(on_redis, "relay", "b")
        cleanup.callback(replica.stop)
        replica.start()
        with server.admin() as admin:
            redis_pid = int(admin.info("server")["process_id"])
        pids.update(
            {
                "relay memory": memory["relay"].pid,
                "relay redis a": on_redis["relay"].pid,
                "relay redis b": replica.pid,
                "relay's redis": redis_pid,
            }
        )
        channels = [
            await cleanup.enter_async_context(_channel(stack, process))
            for stack, process in (
                (memory, memory["relay"]),
                (on_redis, on_redis["relay"]),
                (on_redis, replica),
            )
        ]
        # Any: the generated stubs type only the synchronous flavour of these calls.
        stubs: list[Any] = [relay_grpc.RelayServiceStub(c) for c in channels]
        in_memory, relay_a, relay_b = stubs
        token_m, sinks_m = _users(memory, 1)
        token_r, sinks_r = _users(on_redis, 3)
        (single_id, single_token), *pair = sinks_r
        cases = [
            (MEMORY, spread_delivery([in_memory], token_m, [Sink(in_memory, *sinks_m[0])])),
            (ONE, spread_delivery([relay_a], token_r, [Sink(relay_a, single_id, single_token)])),
            (
                TWO,
                spread_delivery(
                    [relay_a, relay_b],
                    token_r,
                    [
                        Sink(relay, *user)
                        for relay, user in zip((relay_a, relay_b), pair, strict=True)
                    ],
                ),
            ),
            (redis_queue.NAME, redis_queue.delivery(pids)),
        ]
        calls = [(name, await cleanup.enter_async_context(case)) for name, case in cases]
        return await load.interleaved(
            calls, concurrency=concurrency, seconds=seconds, rounds=rounds,
            meter=load.Meter(pids),
        )  # fmt: skip
    raise AssertionError("unreachable")
