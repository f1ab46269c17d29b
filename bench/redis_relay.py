"""Relay delivery with its queues in Redis, one and two replicas, beside the in-memory relay
and a bare Redis list, per message and batched, measured interleaved in one run.

The per-message relay cases are the delivery case of bench/rpc_cases.py (send, live
SubscribeMessages push, AcknowledgeMessages; latency from send to arrival); the batched
ones its batched case (one SendMessages to GROUP recipients, each on one StreamMessages
stream acknowledging every response on it; latency until all GROUP arrived). The Redis is
private and hardened as in production (tests/support/redis.py). With two replicas the
senders alternate between them and the recipients listen half on each, so half the
pushes cross from one replica to the other through Redis, as round-robin load balancing
would have it. On a 2-core machine a second replica shows the cost of sharing the cores
and Redis, not a gain.

Every relay case also keeps a ledger (`Ledger`): which messages the relay accepted and
which reached their recipient, and how often. After the run each must have arrived once,
and the relays' Redis must hold no message (every acknowledgement deleted its message);
`compare` says which case broke that, rather than printing figures of a broken relay.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc

from bench import load, redis_queue
from bench.rpc_cases import GROUP, PAYLOAD, UNLIMITED, bearer
from tests.support.redis import RedisServer, prefix, relay_env
from tests.support.replicas import add_replica
from tests.support.stack import ServiceProcess, Stack
from tests.support.users import new_user, user_client

SERVICES = ("identity", "session", "relay", "audit")
MEMORY = "relay delivery [memory]"
ONE = "relay delivery [Redis x1]"
TWO = "relay delivery [Redis x2]"
BATCHED_MEMORY = "relay batched [memory]"
BATCHED_ONE = "relay batched [Redis x1]"
BATCHED_TWO = "relay batched [Redis x2]"
PIPELINE = f"Redis pipeline ({GROUP} rpush, blmpop)"  # redis_queue.batched_delivery
BATCHED_CASES = (BATCHED_MEMORY, BATCHED_ONE, BATCHED_TWO, PIPELINE)
SETTLE_SECONDS = 10.0  # for the last acknowledgements to land before the ledgers close


class DeliveryError(AssertionError):
    """A relay case lost, duplicated or left behind a message."""


@dataclass
class Ledger:
    """What one case's relay accepted and what reached a recipient, by message (the
    number its body starts with), so a run proves delivery exactly once."""

    name: str
    accepted: set[bytes] = field(default_factory=set)
    uncertain: set[bytes] = field(default_factory=set)  # the send failed or timed out
    delivered: set[bytes] = field(default_factory=set)
    duplicates: int = 0

    @staticmethod
    def key(body: bytes) -> bytes:
        return body[:10]  # the call number and the position in its batch

    def arrived(self, body: bytes) -> None:
        key = self.key(body)
        if key in self.delivered:
            self.duplicates += 1
        self.delivered.add(key)

    def sent(self, bodies: list[bytes], ok: bool) -> None:
        (self.accepted if ok else self.uncertain).update(self.key(b) for b in bodies)

    @property
    def missing(self) -> int:
        return len(self.accepted - self.delivered)

    @property
    def unexpected(self) -> int:
        return len(self.delivered - self.accepted - self.uncertain)

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.accepted)} accepted, {len(self.delivered)} delivered, "
            f"{self.missing} missing, {self.duplicates} duplicates, {self.unexpected} never "
            f"accepted, {len(self.uncertain)} in failed sends"
        )

    def broken(self) -> bool:
        return bool(self.missing or self.duplicates or self.unexpected)


@dataclass(frozen=True)
class Sink:
    """A recipient listening on one relay process."""

    relay: Any  # RelayService stub of the process it subscribes to
    user_id: str
    token: str


@asynccontextmanager
async def spread_delivery(
    senders: list[Any], token: str, sinks: list[Sink], ledger: Ledger
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
            ledger.arrived(message.body)
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
        try:
            await sender.SendMessage(request, metadata=bearer(token), timeout=10)
        except BaseException:
            ledger.sent([body], ok=False)
            raise
        ledger.sent([body], ok=True)
        await asyncio.wait_for(arrived, 10)

    try:
        yield deliver
    finally:
        for stream in streams:
            stream.cancel()
        for receiver in receivers:
            receiver.cancel()


@asynccontextmanager
async def spread_batched(
    senders: list[Any], token: str, sinks: list[Sink], ledger: Ledger
) -> AsyncIterator[load.Call]:
    """Call n is one SendMessages through senders[n % len(senders)] to every sink; each
    sink holds one StreamMessages stream on its relay and acknowledges each response on
    it. With one sender and sinks on one relay it is rpc_cases.relay_batched_delivery."""
    arrivals: dict[bytes, asyncio.Future[None]] = {}
    streams = [sink.relay.StreamMessages(metadata=bearer(sink.token)) for sink in sinks]

    async def receive(stream: Any) -> None:
        async for response in stream:
            for message in response.messages:
                ledger.arrived(message.body)
                waiter = arrivals.pop(message.body, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            ids = [message.message_id for message in response.messages]
            await stream.write(relay_pb.StreamMessagesRequest(acknowledged_message_ids=ids))

    receivers = [asyncio.create_task(receive(stream)) for stream in streams]

    async def deliver(n: int) -> None:
        loop = asyncio.get_running_loop()
        bodies = [n.to_bytes(8, "big") + i.to_bytes(2, "big") + PAYLOAD for i in range(len(sinks))]
        waits = []
        for body in bodies:
            arrivals[body] = loop.create_future()
            waits.append(arrivals[body])
        request = relay_pb.SendMessagesRequest(
            messages=[
                relay_pb.OutgoingMessage(recipient_id=sink.user_id, body=body)
                for sink, body in zip(sinks, bodies, strict=True)
            ]
        )
        try:
            await senders[n % len(senders)].SendMessages(
                request, metadata=bearer(token), timeout=10
            )
        except BaseException:
            ledger.sent(bodies, ok=False)
            raise
        ledger.sent(bodies, ok=True)
        await asyncio.wait_for(asyncio.gather(*waits), 10)

    try:
        yield deliver
    finally:
        for stream in streams:
            stream.cancel()
        for receiver in receivers:
            receiver.cancel()


def _users(stack: Stack, names: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """A sender's token, and a recipient (user id, token) for each of `names`."""
    client = user_client(stack)
    try:
        token = client.login("bench-sender", new_user(client, "bench-sender"))
        recipients = [(name, client.login(name, new_user(client, name))) for name in names]
    finally:
        client.close()
    return token, recipients


def _names(label: str, count: int) -> list[str]:
    return [f"bench-{label}{i}" for i in range(count)]


def _channel(stack: Stack, process: ServiceProcess) -> grpc.aio.Channel:
    ca = (stack.layout.tls / "ca.pem").read_bytes()
    return grpc.aio.secure_channel(process.env["LISTEN_ADDRESS"], grpc.ssl_channel_credentials(ca))


async def _settle(ledgers: list[Ledger], server: RedisServer, key_prefix: str) -> None:
    """Waits for the last deliveries and acknowledgements, then raises DeliveryError
    unless every accepted message arrived exactly once and the relays' Redis holds none
    (each acknowledgement deleted its message, whichever replica took it)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + SETTLE_SECONDS
    left = -1
    while loop.time() < give_up:
        with server.admin() as admin:
            left = int(admin.hget(f"{key_prefix}totals", "messages") or 0)
        if left == 0 and not any(ledger.missing for ledger in ledgers):
            break
        await asyncio.sleep(0.1)
    problems = [ledger.summary() for ledger in ledgers if ledger.broken()]
    if left:
        problems.append(f"{left} messages still queued in the relays' Redis after every delivery")
    if problems:
        raise DeliveryError("relay delivery not exactly once:\n  " + "\n  ".join(problems))


async def compare(
    root: Path, *, concurrency: int, seconds: float, rounds: int, pids: dict[str, int]
) -> tuple[list[load.Result], list[Ledger]]:
    """The eight cases interleaved (batched ones counted per message); their processes'
    pids go into `pids` for CPU use. Raises DeliveryError unless every relay case
    delivered each message exactly once; returns the results and the ledgers."""
    server = RedisServer()
    key_prefix = prefix()
    async with AsyncExitStack() as cleanup:
        server.start()  # first: the relay's REDIS_URL names its port
        cleanup.callback(server.stop)
        shared = {"relay": {**UNLIMITED["relay"], **relay_env(server, key_prefix)}}
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
        # Each case has recipients of its own: a user's every stream gets every message.
        token_m, users_m = _users(memory, _names("sink", 1) + _names("memory", GROUP))
        token_r, users_r = _users(
            on_redis, _names("sink", 3) + _names("one", GROUP) + _names("two", GROUP)
        )
        sink_m, group_m = users_m[0], users_m[1:]
        single, *pair = users_r[:3]
        group_one, group_two = users_r[3 : 3 + GROUP], users_r[3 + GROUP :]
        alternate = (relay_a, relay_b)
        ledgers = {
            name: Ledger(name)
            for name in (MEMORY, ONE, TWO, BATCHED_MEMORY, BATCHED_ONE, BATCHED_TWO)
        }
        cases = [
            (MEMORY, spread_delivery([in_memory], token_m, [Sink(in_memory, *sink_m)], ledgers[MEMORY])),
            (ONE, spread_delivery([relay_a], token_r, [Sink(relay_a, *single)], ledgers[ONE])),
            (TWO, spread_delivery(
                list(alternate), token_r,
                [Sink(relay, *user) for relay, user in zip(alternate, pair, strict=True)],
                ledgers[TWO],
            )),
            (redis_queue.NAME, redis_queue.delivery(pids)),
            (BATCHED_MEMORY, spread_batched(
                [in_memory], token_m, [Sink(in_memory, *user) for user in group_m],
                ledgers[BATCHED_MEMORY],
            )),
            (BATCHED_ONE, spread_batched(
                [relay_a], token_r, [Sink(relay_a, *user) for user in group_one],
                ledgers[BATCHED_ONE],
            )),
            (BATCHED_TWO, spread_batched(
                list(alternate), token_r,
                [Sink(alternate[i % 2], *user) for i, user in enumerate(group_two)],
                ledgers[BATCHED_TWO],
            )),
            (PIPELINE, redis_queue.batched_delivery(GROUP, pids, "pipeline's redis")),
        ]  # fmt: skip
        calls = [(name, await cleanup.enter_async_context(case)) for name, case in cases]
        results = await load.interleaved(
            calls, concurrency=concurrency, seconds=seconds, rounds=rounds,
            meter=load.Meter(pids),
        )  # fmt: skip
        await _settle(list(ledgers.values()), server, key_prefix)
        return results, list(ledgers.values())
    raise AssertionError("unreachable")
