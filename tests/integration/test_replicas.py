"""The scale-out promise end to end: two replicas of every service on PostgreSQL and
Redis, nginx in front (the stack of `make run-scaled`), one replica of each killed with
kill -9 in the middle of a mixed load.

Many clients register, log in, fetch a popular user's bundle (one-time prekeys) and send
(with a client_message_id, retried after a failure); recipients follow their messages
live and acknowledge each one, subscribing again when their stream breaks. Everything
goes through the proxy, as clients and the operator would. Afterwards: every
acknowledged registration exists, every issued token validates, prekeys are distinct and
conserved, every acknowledged send is delivered exactly once and in order per sender,
and the audit chain verifies with exactly one event per committed registration and login.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from securemsg.audit.v1 import audit_admin_service_pb2 as audit_admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as audit_admin_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as identity_internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as identity_internal_grpc
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.session.v1 import session_internal_service_pb2 as session_internal_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as session_internal_grpc

from services.client.keys import UserKeys
from services.client.sdk import UserClient
from services.launcher.topology import SERVICES
from tests.support.postgres import PostgresServer
from tests.support.redis import RedisServer
from tests.support.scaled import ScaledStack
from tests.support.users import bearer, new_user

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORKERS = 8
RECIPIENTS = 3
SENDS_PER_USER = 3
LOAD_SECONDS = 7.0
KILL_AFTER_SECONDS = 3.0
POPULAR_PREKEYS = 100


@pytest.fixture
def scaled(
    tmp_path: Path, postgres: PostgresServer, redis_server: RedisServer
) -> Iterator[ScaledStack]:
    stack = ScaledStack(
        tmp_path,
        postgres,
        redis_server,
        extra_env={
            name: {
                "AUDIT_SHIP_IDLE_SECONDS": "0.05",
                # Every client of this test has one address (the proxy names it).
                "LOGIN_CHALLENGES_PER_MINUTE": "1000000",
            }
            for name in SERVICES
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@dataclass
class Record:
    """What the clients were told (acknowledged) and what the recipients received."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    registered: list[tuple[str, float]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    prekeys: list[int] = field(default_factory=list)
    sent: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> sender, to, seq
    received: dict[str, list[tuple[str, bytes]]] = field(default_factory=lambda: defaultdict(list))
    acked: set[str] = field(default_factory=set)
    after_ack: list[str] = field(default_factory=list)  # delivered again once acknowledged
    resubscribed: int = 0
    failed_at: list[float] = field(default_factory=list)  # calls that failed, when


def _send(client: UserClient, token: str, to: str, body: bytes, client_id: str) -> str:
    """Sends until acknowledged: a retry of a send whose reply was lost (its replica was
    killed) carries the same client_message_id, so the relay queues it once."""
    give_up = time.monotonic() + 30
    while True:
        try:
            reply = client.relay.SendMessage(
                relay_pb.SendMessageRequest(
                    recipient_id=to, body=body, client_message_id=client_id
                ),
                metadata=bearer(token),
                timeout=5,
            )
            return str(reply.message_id)
        except grpc.RpcError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.1)


def _acknowledge(client: UserClient, token: str, message_id: str) -> None:
    give_up = time.monotonic() + 30
    while True:
        try:
            client.acknowledge(token, [message_id])
            return
        except grpc.RpcError:
            if time.monotonic() > give_up:
                raise
            time.sleep(0.1)


def _follow(
    stack: ScaledStack, user: str, token: str, record: Record, done: threading.Event
) -> None:
    """A recipient's device: subscribes, acknowledges each message, subscribes again
    whenever its stream breaks (its relay replica was killed) until `done`."""
    with UserClient(stack.endpoints) as client:
        while not done.is_set():
            stream = client.relay.SubscribeMessages(
                relay_pb.SubscribeMessagesRequest(), metadata=bearer(token), timeout=60
            )
            stopper = threading.Thread(target=lambda s=stream: (done.wait(), s.cancel()))
            stopper.start()
            try:
                for item in stream:
                    message = item.message
                    with record.lock:
                        if message.message_id in record.acked:
                            record.after_ack.append(message.message_id)
                        record.received[message.message_id].append((user, message.body))
                    _acknowledge(client, token, message.message_id)
                    with record.lock:
                        record.acked.add(message.message_id)
            except grpc.RpcError:
                if not done.is_set():
                    with record.lock:
                        record.resubscribed += 1
                    time.sleep(0.1)


def _work(
    stack: ScaledStack, worker: int, recipients: list[str], record: Record, stop_at: float
) -> None:
    with UserClient(stack.endpoints) as client:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            user = f"w{worker}-{n}"
            keys = UserKeys.generate(1)
            try:
                client.register(user, f"Alias {user}", keys)
                with record.lock:
                    record.registered.append((user, time.monotonic()))
                token = client.login(user, keys)
                with record.lock:
                    record.tokens.append(token)
                bundle = client.bundle(token, "popular")
                if bundle.HasField("one_time_prekey"):
                    with record.lock:
                        record.prekeys.append(bundle.one_time_prekey.key_id)
            except grpc.RpcError:
                with record.lock:  # a replica killed under this call: nothing acknowledged
                    record.failed_at.append(time.monotonic())
                continue
            to = recipients[worker % len(recipients)]
            for seq in range(SENDS_PER_USER):
                message_id = _send(client, token, to, f"{user}|{seq}".encode(), f"{user}-{seq}")
                with record.lock:
                    record.sent[message_id] = (user, to, seq)


def _rpc_count(metrics_port: int) -> float:
    """RPCs a replica has handled, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("securemsg_rpc_total{")
    )


def test_two_replicas_of_every_service_behind_the_proxy_survive_kill_9_of_one_of_each(
    scaled: ScaledStack,
) -> None:
    stack = scaled
    setup = UserClient(stack.endpoints)
    popular = new_user(setup, "popular", one_time=POPULAR_PREKEYS)
    recipients = [f"inbox{i}" for i in range(RECIPIENTS)]
    record = Record()
    done = threading.Event()
    followers = []
    inbox_tokens = []
    for name in recipients:
        keys = new_user(setup, name)
        token = setup.login(name, keys)
        inbox_tokens.append(token)
        follower = threading.Thread(target=_follow, args=(stack, name, token, record, done))
        follower.start()
        followers.append(follower)

    stop_at = time.monotonic() + LOAD_SECONDS
    workers = [
        threading.Thread(target=_work, args=(stack, w, recipients, record, stop_at))
        for w in range(WORKERS)
    ]
    try:
        for thread in workers:
            thread.start()
        time.sleep(KILL_AFTER_SECONDS)
        # The proxy balanced per call: both replicas of each service served calls.
        for name in SERVICES:
            served = [_rpc_count(r.metrics) for r in stack.plan[name]]
            assert all(count > 0 for count in served), (name, served)
        for name in SERVICES:
            stack.replicas[name][0].kill()  # kill -9 midway
        killed_at = time.monotonic()
        for thread in workers:
            thread.join()

        # Every acknowledged send reaches its recipient, then the followers stop.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with record.lock:
                if set(record.sent) <= record.acked:
                    break
            time.sleep(0.2)
    finally:
        done.set()
        for thread in [*workers, *followers]:
            thread.join(timeout=30)
    setup.close()

    registered = [user for user, _ in record.registered]
    print(
        f"replica test: {len(registered)} registrations, {len(record.tokens)} logins, "
        f"{len(record.prekeys)} prekeys handed out, {len(record.sent)} sends delivered, "
        f"{record.resubscribed} streams resubscribed after the kill"
    )
    assert len(registered) > 20, stack.logs()
    assert any(at > killed_at for _, at in record.registered), "nothing served after the kill"
    # Only calls under way at the kill may fail: the proxy sends the rest to the survivors.
    assert len([at for at in record.failed_at if at > killed_at]) <= 2 * WORKERS
    assert record.resubscribed >= 1, "no stream broke: the killed relay held none"

    # Every acknowledged registration exists; every issued token validates (through the
    # proxy's operator ports, to the survivors).
    with stack.operator_channel("identity", "session") as channel:
        identity = identity_internal_grpc.IdentityInternalServiceStub(channel)
        for user in registered:
            status = identity.GetUserStatus(
                identity_internal_pb.GetUserStatusRequest(user_id=user), timeout=10
            )
            assert status.active, user
    with stack.operator_channel("session", "relay") as channel:
        sessions = session_internal_grpc.SessionInternalServiceStub(channel)
        for token in record.tokens:
            sessions.ValidateSession(
                session_internal_pb.ValidateSessionRequest(token=token), timeout=10
            )

    # Prekeys: distinct, and conserved (a reply lost to the kill is the only gap allowed).
    assert len(record.prekeys) == len(set(record.prekeys))
    with psycopg.connect(stack.database_urls["identity"]) as conn:
        users = conn.execute("SELECT count(*) FROM users").fetchone()[0]  # type: ignore[index]
        pool = {
            row[0]
            for row in conn.execute(
                "SELECT key_id FROM one_time_prekeys WHERE user_row = (SELECT min(id) FROM users)"
            ).fetchall()
        }
    uploaded = {k.key_id for k in popular.one_time_protos()}
    assert not pool & set(record.prekeys)
    assert pool | set(record.prekeys) <= uploaded
    assert len(pool) + len(record.prekeys) >= len(uploaded) - WORKERS
    assert users >= len(registered) + 1 + RECIPIENTS

    # Every acknowledged send delivered exactly once, to its recipient, in order per sender.
    assert record.sent, "no send was acknowledged"
    assert set(record.sent) <= set(record.received), "acknowledged sends never delivered"
    assert record.after_ack == [], "delivered again after it was acknowledged"
    bodies: dict[bytes, set[str]] = defaultdict(set)
    order: dict[tuple[str, str], list[int]] = defaultdict(list)
    for message_id, deliveries in record.received.items():
        for _, body in deliveries:
            bodies[body].add(message_id)
        if message_id in record.sent:
            sender, to, seq = record.sent[message_id]
            assert {who for who, _ in deliveries} == {to}
    assert all(len(ids) == 1 for ids in bodies.values()), "a retried send was queued twice"
    for message_id in record.received:  # in the order of first delivery
        if message_id in record.sent:
            sender, to, seq = record.sent[message_id]
            order[(sender, to)].append(seq)
    assert all(seqs == sorted(seqs) for seqs in order.values()), order
    with UserClient(stack.endpoints) as client:  # acknowledged means gone from Redis
        for token in inbox_tokens:
            assert client.fetch(token) == []

    # The audit chain: gapless, verified, one event per committed registration and login.
    with psycopg.connect(stack.database_urls["session"]) as conn:
        logins = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]  # type: ignore[index]
    deadline = time.monotonic() + 40
    while True:
        with stack.operator_channel("audit", "operator") as channel:
            audit_stats = audit_admin_grpc.AuditAdminServiceStub(channel).GetAuditStats(
                audit_admin_pb.GetAuditStatsRequest(), timeout=10
            )
        by_action = dict(audit_stats.events_by_action)
        if (
            by_action.get("user_registered", 0) == users
            and by_action.get("user_login", 0) == logins
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert by_action.get("user_registered", 0) == users
    assert by_action.get("user_login", 0) == logins
    with stack.operator_channel("audit", "operator") as channel:
        verdict = audit_admin_grpc.AuditAdminServiceStub(channel).VerifyAuditLog(
            audit_admin_pb.VerifyAuditLogRequest(), timeout=30
        )
    assert verdict.ok, verdict.problem
    assert verdict.checked_count == verdict.total_events == audit_stats.total_events
