"""Calls between services spread over a peer's replicas and survive losing one."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.channels import channel_target, open_channel
from services.common.errors import StartupError
from services.common.peer_client import call


class CountingHealth(health.aio.HealthServicer):  # type: ignore[misc, name-defined]
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def Check(self, request: object, context: object) -> health_pb2.HealthCheckResponse:
        self.calls += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def replica() -> tuple[grpc.aio.Server, CountingHealth, int]:
    server = grpc.aio.server()
    servicer = CountingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, port


def test_addresses_name_one_peer_a_dns_name_or_a_static_list() -> None:
    assert channel_target("127.0.0.1:50061") == "127.0.0.1:50061"
    assert channel_target("dns:///identity:50061") == "dns:///identity:50061"
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(StartupError, match="DNS name"):
        channel_target("identity-1:1,identity-2:1")


async def test_calls_go_round_robin_and_retries_skip_a_dead_replica() -> None:
    (first, one, port1), (second, two, port2) = await replica(), await replica()
    channel = open_channel(f"127.0.0.1:{port1},127.0.0.1:{port2}", None)
    check = health_pb2_grpc.HealthStub(channel).Check
    try:
        for _ in range(20):
            await call(check, health_pb2.HealthCheckRequest(), unavailable="x", idempotent=True)
        assert one.calls + two.calls == 20
        assert min(one.calls, two.calls) >= 8  # per call, not per connection
        await first.stop(None)
        before = two.calls
        for _ in range(10):  # every call still answered: the live replica takes them
            await call(check, health_pb2.HealthCheckRequest(), unavailable="x", idempotent=True)
        assert two.calls == before + 10
    finally:
        await channel.close(grace=None)
        await second.stop(None)
