"""Calls between services reach a peer within seconds of it being there again.

What a freshly started or restarted deployment meets: a peer's name that does not
resolve yet (its container is not created yet, or is being recreated), a name still
pointing where its replica used to be (a container recreated with a new address), and a
peer that refuses connections for a while (still starting, or restarting). gRPC's
defaults would retry the missing name 1.6 times later each time (towards 120 s), wait
for the next DNS resolution up to 30 s and back off reconnecting towards 120 s;
services.common.channels makes each of them seconds. Real gRPC servers, a real DNS
server and real sockets on loopback; no containers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channels import open_channel
from services.common.errors import Unavailable
from services.common.peer_client import call
from tests.support.dns import LoopbackDns
from tests.support.stack import PortReservation

# A peer is answered within this many seconds of being reachable again.
WITHIN_SECONDS = 3.0


async def serve_health(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)  # type: ignore[attr-defined]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def check(channel: grpc.aio.Channel, deadline_seconds: float = 1.0) -> None:
    await call(
        health_pb2_grpc.HealthStub(channel).Check,
        health_pb2.HealthCheckRequest(),
        unavailable="peer unreachable",
        idempotent=True,
        deadline_seconds=deadline_seconds,
    )


async def seconds_until_answered(channel: grpc.aio.Channel, give_up: float = 15.0) -> float:
    """How long after now the first call through `channel` succeeds."""
    started = time.monotonic()
    while True:
        try:
            await check(channel)
        except Unavailable:
            if time.monotonic() - started > give_up:
                raise
            continue
        return time.monotonic() - started


def gaps(started: float, events: list[float], ended: float) -> list[float]:
    """The times between `started`, each event and `ended`, rounded for messages."""
    times = [started, *events, ended]
    return [round(later - earlier, 2) for earlier, later in itertools.pairwise(times)]


@pytest.fixture
async def dns() -> AsyncIterator[LoopbackDns]:
    server = await LoopbackDns.start()
    yield server
    server.close()


async def test_a_peer_whose_name_moved_is_reached_at_its_new_address_within_seconds(
    dns: LoopbackDns,
) -> None:
    reservation = PortReservation(1)
    (port,) = reservation.ports
    server = await serve_health(port)
    # The name still points where the replica was: nothing listens there any more.
    dns.answer("identity.test", "127.0.0.2")
    channel = open_channel(f"dns://127.0.0.1:{dns.port}/identity.test:{port}", None)
    try:
        with pytest.raises(Unavailable):
            await check(channel)
        assert dns.queries > 0
        dns.answer("identity.test", "127.0.0.1")
        assert await seconds_until_answered(channel) < WITHIN_SECONDS
    finally:
        await channel.close(grace=None)
        await server.stop(None)
        reservation.close()


async def test_a_peer_back_after_an_outage_is_reached_within_seconds() -> None:
    reservation = PortReservation(1)
    (port,) = reservation.ports
    attempts: list[float] = []

    async def not_ready(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A peer still starting: the connection is closed before gRPC can speak on it.
        attempts.append(time.monotonic())
        writer.close()

    refusing = await asyncio.start_server(not_ready, "127.0.0.1", port, reuse_address=True)
    channel = open_channel(f"127.0.0.1:{port}", None)
    server: grpc.aio.Server | None = None
    try:
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 10:  # the outage: every call fails
            with pytest.raises(Unavailable):
                await check(channel)
        refusing.close()
        await refusing.wait_closed()
        outage_ended = time.monotonic()
        # However long the outage, the channel keeps trying every few seconds...
        assert len(attempts) >= 4, attempts
        assert max(gaps(outage_started, attempts, outage_ended)) < WITHIN_SECONDS
        # ...so the peer, back, answers within seconds.
        server = await serve_health(port)
        assert await seconds_until_answered(channel) < WITHIN_SECONDS
    finally:
        await channel.close(grace=None)
        if server is not None:
            await server.stop(None)
        reservation.close()


async def test_a_peer_whose_name_appears_late_is_reached_within_seconds(dns: LoopbackDns) -> None:
    reservation = PortReservation(1)
    (port,) = reservation.ports
    server = await serve_health(port)
    channel = open_channel(f"dns://127.0.0.1:{dns.port}/audit.test:{port}", None)
    try:
        absent_since = time.monotonic()
        while time.monotonic() - absent_since < 10:  # the peer's name does not exist yet
            with pytest.raises(Unavailable):
                await check(channel)
        absent_until = time.monotonic()
        # The name is looked up again every few seconds however long it was missing...
        assert max(gaps(absent_since, dns.asked_at, absent_until)) < WITHIN_SECONDS
        # ...so once it exists, the peer answers within seconds.
        dns.answer("audit.test", "127.0.0.1")
        assert await seconds_until_answered(channel) < WITHIN_SECONDS
    finally:
        await channel.close(grace=None)
        await server.stop(None)
        reservation.close()
