"""Load: many clients mixing every flow; nothing lost, nothing duplicated, memory flat.

Fast by default (make test); `make soak` sets LOAD_CLIENTS=50 and LOAD_SECONDS=120 and
prints the figures.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from securemsg.audit.v1 import audit_admin_service_pb2 as audit_admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as audit_admin_grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.relay.v1 import relay_service_pb2_grpc as relay_grpc

from tests.support.audit import audit_total, operator_list
from tests.support.stack import PACKAGES, Stack
from tests.support.users import bearer, new_user, user_client

CLIENTS = int(os.environ.get("LOAD_CLIENTS", "20"))
SECONDS = float(os.environ.get("LOAD_SECONDS", "8"))
RELAXED = {
    "session": {"LOGIN_CHALLENGES_PER_MINUTE": "1000000"},
    "relay": {
        "RELAY_SENDS_PER_MINUTE": "1000000",
        "RELAY_MAX_QUEUE_MESSAGES": "100000",
        "RELAY_MAX_SENDER_MESSAGES": "100000",
    },
}


class History:
    """What the clients were told happened, to check the servers against."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[str, tuple[str, bytes]] = {}  # message id -> (recipient, body)
        self.received: Counter[str] = Counter()
        self.logins = 0
        self.requests = 0
        self.errors: list[str] = []


def user_loop(
    stack: Stack, me: str, keys: object, others: list[str], history: History, stop: float
) -> None:
    client = user_client(stack)
    token = client.login(me, keys)  # type: ignore[arg-type]
    with history.lock:
        history.logins += 1
    rng = random.Random(me)
    with stack.channel("relay") as channel:
        relay = relay_grpc.RelayServiceStub(channel)
        while time.monotonic() < stop:
            action = rng.random()
            try:
                if action < 0.45:
                    to = rng.choice(others)
                    body = os.urandom(32) + me.encode()
                    sent = relay.SendMessage(
                        relay_pb.SendMessageRequest(recipient_id=to, body=body),
                        metadata=bearer(token), timeout=10,
                    )  # fmt: skip
                    with history.lock:
                        history.sent[sent.message_id] = (to, body)
                elif action < 0.75:
                    drain(relay, token, me, history)
                elif action < 0.9:
                    client.identity.GetKeyBundle(
                        identity_pb.GetKeyBundleRequest(user_id=rng.choice(others)),
                        metadata=bearer(token), timeout=10,
                    )  # fmt: skip
                else:
                    token = client.login(me, keys)  # type: ignore[arg-type]
                    with history.lock:
                        history.logins += 1
                with history.lock:
                    history.requests += 1
            except grpc.RpcError as exc:
                with history.lock:
                    history.errors.append(f"{exc.code().name}: {exc.details()}")
        drain(relay, token, me, history)
    client.close()


def drain(relay: relay_grpc.RelayServiceStub, token: str, me: str, history: History) -> int:
    fetched = relay.FetchMessages(
        relay_pb.FetchMessagesRequest(), metadata=bearer(token), timeout=10
    ).messages
    if fetched:
        ids = [m.message_id for m in fetched]
        relay.AcknowledgeMessages(
            relay_pb.AcknowledgeMessagesRequest(message_ids=ids), metadata=bearer(token), timeout=10
        )
        with history.lock:
            for message in fetched:
                history.received[message.message_id] += 1
                expected = history.sent.get(message.message_id)
                if expected is not None and expected != (me, message.body):
                    history.errors.append("a message reached the wrong user or changed")
    return len(fetched)


def test_mixed_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    stack = Stack(tmp_path, tuple(PACKAGES), extra_env=RELAXED)
    stack.start()
    try:
        setup = user_client(stack)
        users = {f"load{i:03}": new_user(setup, f"load{i:03}", one_time=50) for i in range(CLIENTS)}
        setup.close()
        history = History()
        stop = time.monotonic() + SECONDS
        rss_start = {name: stack[name].rss_bytes() for name in PACKAGES}
        threads = [
            threading.Thread(
                target=user_loop,
                args=(stack, me, keys, [u for u in users if u != me], history, stop),
            )
            for me, keys in users.items()
        ]
        for thread in threads:
            thread.start()
        halfway = None
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            if halfway is None and time.monotonic() > stop - SECONDS / 2:
                halfway = {name: stack[name].rss_bytes() for name in PACKAGES}
        for thread in threads:
            thread.join()
        rss_end = {name: stack[name].rss_bytes() for name in PACKAGES}

        # Whatever was sent last may still be queued: each user drains once more.
        final = user_client(stack)
        with stack.channel("relay") as channel:
            relay = relay_grpc.RelayServiceStub(channel)
            for me, keys in users.items():
                token = final.login(me, keys)
                history.logins += 1
                while drain(relay, token, me, history):
                    pass
        final.close()

        expected_events = CLIENTS + history.logins  # registrations + logins
        deadline = time.monotonic() + 60
        while audit_total(stack) < expected_events and time.monotonic() < deadline:
            time.sleep(0.3)
        events = operator_list(stack)
        with stack.channel("audit", cert="operator") as channel:
            intact = audit_admin_grpc.AuditAdminServiceStub(channel).VerifyAuditLog(
                audit_admin_pb.VerifyAuditLogRequest(), timeout=60
            )
    finally:
        stack.stop()

    lost = set(history.sent) - set(history.received)
    duplicated = [m for m, n in history.received.items() if n > 1]
    growth = {name: (rss_end[name] - (halfway or rss_start)[name]) / 2**20 for name in PACKAGES}
    print(
        f"\nload: {CLIENTS} clients, {SECONDS:.0f} s, {history.requests} requests, "
        f"{len(history.errors)} errors, {len(history.sent)} messages, {len(lost)} lost, "
        f"{len(duplicated)} duplicated, {len(events)} audit events for {expected_events} expected; "
        "peak RSS MiB: "
        + ", ".join(f"{n} {max(rss_start[n], rss_end[n]) / 2**20:.0f}" for n in PACKAGES)
    )
    assert history.errors == []
    assert history.sent
    assert lost == set()
    assert duplicated == []
    assert len(events) == expected_events
    assert len({e.event_id for e in events}) == len(events)
    assert Counter(e.action for e in events) == {
        "user_registered": CLIENTS,
        "user_login": history.logins,
    }
    assert intact.ok
    for name, mib in growth.items():  # flat: the second half of the run adds little
        assert mib < 40, (name, mib)
