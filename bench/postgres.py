"""The persistent services' hot paths on PostgreSQL, with one and with two replicas of each.

Same closed loop and concurrency as the SQLite hot paths (bench/rpc_cases.py), in the
same run: the ratios printed are PostgreSQL over SQLite for the same call. With two
replicas, the benchmark client spreads calls over both (as round-robin load balancing
would); on a 2-core machine the second replica mostly shows the cost of sharing the
cores and the database, not a gain.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from securemsg.audit.v1 import audit_event_pb2
from securemsg.audit.v1 import audit_ingest_service_pb2 as ingest_pb
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.identity.v1 import identity_service_pb2_grpc as identity_grpc
from securemsg.session.v1 import session_internal_service_pb2 as internal_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as internal_grpc

from bench import load
from bench.rpc_cases import UNLIMITED, bearer
from services.client.keys import UserKeys
from services.common import convert
from tests.support.replicas import add_replica
from tests.support.stack import ServiceProcess, Stack
from tests.support.users import new_user, registration, user_client

PERSISTENT = ("identity", "session", "audit")


def _channel(stack: Stack, process: ServiceProcess, cert: str | None) -> grpc.aio.Channel:
    tls = stack.layout.tls
    ca = (tls / "ca.pem").read_bytes()
    if cert is None:
        return grpc.aio.secure_channel(
            process.env["LISTEN_ADDRESS"], grpc.ssl_channel_credentials(ca)
        )
    credentials = grpc.ssl_channel_credentials(
        ca, (tls / f"{cert}.key").read_bytes(), (tls / f"{cert}.pem").read_bytes()
    )
    return grpc.aio.secure_channel(process.env["INTERNAL_LISTEN_ADDRESS"], credentials)


async def hot_paths(
    root: Path, replicas: int, concurrency: int, seconds: float
) -> list[load.Result]:
    stack = Stack(root, PERSISTENT, extra_env=UNLIMITED, backend="postgres")
    stack.start()
    extra = [add_replica(stack, name, "b") for name in PERSISTENT for _ in range(replicas - 1)]
    try:
        for process in extra:
            process.start()
        return await _measure(stack, extra, replicas, concurrency, seconds)
    finally:
        for process in extra:
            process.stop()
        stack.stop()


async def _measure(
    stack: Stack, extra: list[ServiceProcess], replicas: int, concurrency: int, seconds: float
) -> list[load.Result]:
    client = user_client(stack)
    token = client.login("bench-reader", new_user(client, "bench-reader"))
    for i in range(50):
        new_user(client, f"bench-peer{i}", one_time=100)
    client.close()
    prepared = [
        registration(f"bench-new-{n}", UserKeys.generate(5))
        for n in range(int(seconds * 1500) + 1000)
    ]
    processes = {name: [stack[name], *(p for p in extra if p.name == name)] for name in PERSISTENT}
    channels = {
        (name, cert): [_channel(stack, p, cert) for p in processes[name]]
        for name, cert in (("identity", None), ("session", "relay"), ("audit", "identity"))
    }
    # Any: the generated stubs type only the synchronous flavour of these calls.
    identity: list[Any] = [identity_grpc.IdentityServiceStub(c) for c in channels["identity", None]]
    session: list[Any] = [
        internal_grpc.SessionInternalServiceStub(c) for c in channels["session", "relay"]
    ]
    ingest: list[Any] = [
        ingest_grpc.AuditIngestServiceStub(c) for c in channels["audit", "identity"]
    ]
    label = f"PostgreSQL x{replicas}"

    async def register(n: int) -> None:
        await identity[n % replicas].RegisterUser(prepared[n % len(prepared)], timeout=10)

    async def bundle(n: int) -> None:
        request = identity_pb.GetKeyBundleRequest(user_id=f"bench-peer{n % 50}")
        await identity[n % replicas].GetKeyBundle(request, metadata=bearer(token), timeout=10)

    async def validate(n: int) -> None:
        await session[n % replicas].ValidateSession(
            internal_pb.ValidateSessionRequest(token=token), timeout=10
        )

    async def append(n: int) -> None:
        now = convert.timestamp(time.time())
        events = [
            audit_event_pb2.AuditEvent(
                event_id=uuid.uuid4().hex, action="user_login", source="identity",
                user_id="bench-peer1", occur_time=now, details={"ip": "10.0.0.1"},
            )
            for _ in range(50)
        ]  # fmt: skip
        await ingest[n % replicas].AppendAuditEvents(
            ingest_pb.AppendAuditEventsRequest(events=events), timeout=10
        )

    results = []
    try:
        for name, call in (
            ("register user", register),
            ("get key bundle", bundle),
            ("validate session", validate),
            ("audit append (50/call)", append),
        ):
            result = await load.run(
                f"{name} [{label}]", call, concurrency=concurrency, seconds=seconds
            )
            results.append(result)
    finally:
        for group in channels.values():
            for channel in group:
                await channel.close(grace=None)
    return results
