"""The token cache's bound, with the production default of every service that has one.

Identity, relay and audit trust a validated token for TOKEN_CACHE_SECONDS (documented
default 2 s) before asking the session service again: a revoked token may pass there for
at most that long. The other tests run with the cache off; here no service is told a
value, so the default itself is what is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
from securemsg.audit.v1 import audit_service_pb2 as audit_pb
from securemsg.audit.v1 import audit_service_pb2_grpc as audit_grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc
from securemsg.session.v1 import session_service_pb2 as session_pb

from tests.support.stack import Stack
from tests.support.users import bearer, new_user, user_client

DOCUMENTED_BOUND = 2.0
# Each service makes its cache entry while answering the first call, so the entry's age
# is bounded by that call's start and end; calls are judged by when they were issued
# (still accepted) or answered (refused), so a slow machine cannot fail a correct
# service. The slack only covers clock granularity; a default of a minute, or of 1 s,
# falls far outside it.
SLACK = 0.3
CACHING = ("identity", "relay", "audit")


def status(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def test_a_revoked_token_passes_nowhere_longer_than_the_default_cache_bound(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path, ("identity", "session", "relay", "audit"))
    for name in CACHING:
        del stack[name].env["TOKEN_CACHE_SECONDS"]  # the production default
    stack.start()
    client = user_client(stack)
    channels = {name: stack.channel(name) for name in CACHING}
    try:
        token = client.login("alice", new_user(client, "alice"))
        metadata = bearer(token)
        calls: dict[str, Callable[[], object]] = {
            "identity": lambda: client.identity.GetOwnProfile(
                identity_pb.GetOwnProfileRequest(), metadata=metadata, timeout=5
            ),
            "relay": lambda: relay_grpc.RelayServiceStub(channels["relay"]).FetchMessages(
                relay_pb.FetchMessagesRequest(), metadata=metadata, timeout=5
            ),
            "audit": lambda: audit_grpc.AuditServiceStub(channels["audit"]).ListAuditEvents(
                audit_pb.ListAuditEventsRequest(), metadata=metadata, timeout=5
            ),
        }
        made_between: dict[str, tuple[float, float]] = {}  # the cache entry's making
        for name, call in calls.items():
            started = time.monotonic()
            call()
            made_between[name] = (started, time.monotonic())
        client.session.DeleteSession(session_pb.DeleteSessionRequest(), metadata=metadata)

        refused_after: dict[str, float] = {}
        while len(refused_after) < len(calls):
            for name, call in calls.items():
                if name in refused_after:
                    continue
                issued = time.monotonic()
                code = status(call)
                earliest, latest = made_between[name]
                if code == "OK":
                    age = issued - latest
                    assert age <= DOCUMENTED_BOUND + SLACK, (
                        f"{name} still accepts a revoked token {age:.2f} s after caching it"
                    )
                    continue
                assert code == "UNAUTHENTICATED", name
                refused_after[name] = time.monotonic() - earliest
            time.sleep(0.05)
        for name, after in refused_after.items():
            # Passing for a while is the documented cache; refusing sooner would mean the
            # default is not what the README says.
            assert after >= DOCUMENTED_BOUND - SLACK, f"{name} refused after only {after:.2f} s"
    finally:
        for channel in channels.values():
            channel.close()
        client.close()
        stack.stop()
