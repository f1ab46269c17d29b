"""The peer a user might pick instead of the relay: a Redis list per recipient.

Redis runs from Debian's package with persistence off (`save ""`, `appendonly no`), as
memory-only as the relay; the same concurrency and payload drive RPUSH + BLPOP (which
fetches and deletes in one step) that the relay case drives through send, stream, ack.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as redis

from bench import load
from bench.rpc_cases import PAYLOAD
from tests.support.stack import free_port


@asynccontextmanager
async def redis_server(
    pids: dict[str, int] | None = None, pid_name: str = "redis"
) -> AsyncIterator[int]:
    """A private redis-server; its pid goes into `pids` (as `pid_name`) when given."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (apt install redis-server)")
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if pids is not None:
        pids[pid_name] = process.pid
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                await client.ping()
                break
            except redis.ConnectionError:
                await asyncio.sleep(0.05)
        await client.aclose()
        yield port
    finally:
        process.terminate()
        await process.wait()


NAME = "Redis list (rpush, blpop)"
BATCHED = "Redis lists, batched (pipelined rpush, blmpop)"


@asynccontextmanager
async def delivery(pids: dict[str, int] | None = None) -> AsyncIterator[load.Call]:
    """RPUSH, then the consumer's BLPOP takes it; latency from push to arrival."""
    async with redis_server(pids) as port:
        producer = redis.Redis(port=port)
        consumer = redis.Redis(port=port)
        arrivals: dict[bytes, asyncio.Future[None]] = {}

        async def receive() -> None:
            while True:
                popped = await consumer.blpop(["inbox:bob"], timeout=1)
                if popped is None:
                    continue
                body = popped[1]
                waiter = arrivals.pop(body if isinstance(body, bytes) else body.encode(), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

        receiver = asyncio.create_task(receive())

        async def deliver(n: int) -> None:
            body = n.to_bytes(8, "big") + PAYLOAD
            arrived = asyncio.get_running_loop().create_future()
            arrivals[body] = arrived
            await producer.rpush("inbox:bob", body)
            await asyncio.wait_for(arrived, 10)

        try:
            yield deliver
        finally:
            receiver.cancel()
            await producer.aclose()
            await consumer.aclose()


@asynccontextmanager
async def batched_delivery(
    recipients: int, pids: dict[str, int] | None = None, pid_name: str = "redis"
) -> AsyncIterator[load.Call]:
    """One call = one message to each of `recipients` lists in one pipelined round trip;
    each list's consumer takes up to 100 at a time (BLMPOP). Latency: until all arrived.
    Its server's pid goes into `pids` as `pid_name`."""
    async with redis_server(pids, pid_name) as port:
        producer = redis.Redis(port=port)
        consumers = [redis.Redis(port=port) for _ in range(recipients)]
        arrivals: dict[bytes, asyncio.Future[None]] = {}

        async def receive(consumer: redis.Redis, key: str) -> None:
            while True:
                popped = await consumer.blmpop(1, 1, key, direction="LEFT", count=100)
                for body in popped[1] if popped else ():
                    waiter = arrivals.pop(body, None)  # type: ignore[arg-type]
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)

        receivers = [
            asyncio.create_task(receive(consumer, f"inbox:{i}"))
            for i, consumer in enumerate(consumers)
        ]

        async def deliver(n: int) -> None:
            loop = asyncio.get_running_loop()
            waits = []
            pipe = producer.pipeline(transaction=False)
            for i in range(recipients):
                body = n.to_bytes(8, "big") + i.to_bytes(2, "big") + PAYLOAD
                arrivals[body] = loop.create_future()
                waits.append(arrivals[body])
                pipe.rpush(f"inbox:{i}", body)
            await pipe.execute()
            await asyncio.wait_for(asyncio.gather(*waits), 10)

        try:
            yield deliver
        finally:
            for receiver in receivers:
                receiver.cancel()
            await producer.aclose()
            for consumer in consumers:
                await consumer.aclose()
