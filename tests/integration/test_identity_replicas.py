"""Identity replicas on one Redis share their limits: real processes on PostgreSQL and
Redis, called directly (past the proxy) so the test chooses which replica each call
reaches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from securemsg.identity.v1 import identity_service_pb2_grpc as identity_grpc

from services.client.keys import UserKeys
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.scaled import ScaledStack
from tests.support.users import registration

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REGISTRATIONS_PER_MINUTE = 3


@pytest.fixture
def identity_replicas(
    tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer
) -> Iterator[ScaledStack]:
    stack = ScaledStack(
        tmp_path,
        postgres,
        redis_server,
        services=("identity",),
        extra_env={"identity": {"REGISTRATIONS_PER_MINUTE": str(REGISTRATIONS_PER_MINUTE)}},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def test_registrations_from_one_address_are_counted_across_identity_replicas(
    identity_replicas: ScaledStack, redis_server: RedisServer
) -> None:
    channels = [
        identity_replicas.replica_endpoints("identity", i).channel("identity") for i in (0, 1)
    ]
    a, b = (identity_grpc.IdentityServiceStub(channel) for channel in channels)
    try:
        # One address (loopback) alternating between replicas: each replica alone has
        # seen fewer than the limit, together they have seen it.
        for number, replica in enumerate((a, b, a)):
            replica.RegisterUser(registration(f"limited{number}", UserKeys.generate(0)))
        for replica in (b, a):
            with pytest.raises(grpc.RpcError) as refused:
                replica.RegisterUser(registration("onetoomany", UserKeys.generate(0)))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too many registrations from your address" in (refused.value.details() or "")
    finally:
        for channel in channels:
            channel.close()

    # Redis knows the count only under a blinded key: no user id, no address.
    key_prefix = identity_replicas.prefixes["identity"]
    with redis_server.admin() as admin:
        keys = list(admin.scan_iter(match=f"{key_prefix}*", count=1000))
        values = [admin.dump(key) or b"" for key in keys]
    assert any(b":rl:registrations:" in key for key in keys), keys
    for text in (*keys, *values):
        for secret in (b"limited", b"onetoomany", b"127.0.0.1"):
            assert secret not in text
