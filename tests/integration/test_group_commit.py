"""Group commit seen from outside: nothing is acknowledged before it is committed.

Under concurrent registrations and one-time prekey fetches, the identity process is
frozen (SIGSTOP) again and again and its committed state read from outside: every
prekey already acknowledged to a client must be gone from it. Then a kill -9: after a
restart every acknowledged registration is there, and no acknowledged prekey came back.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from securemsg.identity.v1 import identity_internal_service_pb2 as internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.identity.v1 import identity_service_pb2 as pb

from services.client.keys import UserKeys
from tests.support.stack import Stack
from tests.support.users import bearer, new_user, registration, user_client

WORKERS = 6
POOL = 1000  # the most one user may hold
FREEZES = 40


@pytest.mark.sqlite_only  # group commit is SQLite's writer; the test reads identity.db itself
def test_a_kill_9_under_concurrent_writes_loses_nothing_acknowledged(stack: Stack) -> None:
    client = user_client(stack)
    popular = new_user(client, "popular", one_time=100)
    popular_token = client.login("popular", popular)
    for _ in range(POOL // 100 - 1):
        client.upload_prekeys(popular_token, popular.one_time_protos(popular.add_one_time(100)))
    token = client.login("fan", new_user(client, "fan", one_time=0))
    keys = [UserKeys.generate(0) for _ in range(WORKERS)]
    registered: list[tuple[str, bytes]] = []  # acknowledged, with their verify keys
    handed_out: list[int] = []  # one-time prekey ids acknowledged to the fan
    stop = threading.Event()

    def registering(worker: int) -> None:
        n = 0
        while not stop.is_set():
            user_id, n = f"w{worker}-{n}", n + 1
            try:
                client.identity.RegisterUser(registration(user_id, keys[worker]), timeout=10)
            except grpc.RpcError:
                continue  # not acknowledged: may or may not exist after the kill
            registered.append((user_id, keys[worker].verify_key))

    def fetching(_: int) -> None:
        while not stop.is_set():
            try:
                bundle = client.identity.GetKeyBundle(
                    pb.GetKeyBundleRequest(user_id="popular"), metadata=bearer(token), timeout=10
                ).bundle
            except grpc.RpcError:
                continue
            if bundle.HasField("one_time_prekey"):
                handed_out.append(bundle.one_time_prekey.key_id)

    jobs: list[Callable[[int], None]] = [registering] * WORKERS + [fetching] * WORKERS
    threads = [threading.Thread(target=job, args=(i % WORKERS,)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    identity = stack["identity"]
    try:
        # Both kinds of write in full flow (no time limit: the test's timeout ends a hang).
        while len(registered) < 20 or len(handed_out) < 10:
            time.sleep(0.01)
        frozen_checks = 0
        assert identity.process is not None
        while frozen_checks < FREEZES and len(handed_out) < POOL - 100:
            if _acknowledged_prekeys_are_gone(stack, identity.process.pid, handed_out):
                frozen_checks += 1
            time.sleep(0.005)
        assert frozen_checks > 0, "the pool ran dry before any check"
        while len(registered) < 60:
            time.sleep(0.01)
        identity.kill()
        acknowledged_users = list(registered)
        acknowledged_keys = list(handed_out)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    client.close()

    identity.start()
    with stack.channel("identity", cert="session") as channel:
        stub = internal_grpc.IdentityInternalServiceStub(channel)
        for user_id, verify_key in acknowledged_users:
            reply = stub.GetVerifyKey(internal_pb.GetVerifyKeyRequest(user_id=user_id), timeout=10)
            assert reply.verify_key == verify_key, f"{user_id} was acknowledged, then lost"
    identity.stop()

    db = sqlite3.connect(f"file:{stack.db_path('identity')}?mode=ro", uri=True)
    try:
        left = {row[0] for row in db.execute("SELECT key_id FROM one_time_prekeys")}
    finally:
        db.close()
    assert len(acknowledged_keys) == len(set(acknowledged_keys))
    assert not left & set(acknowledged_keys), "an acknowledged one-time prekey came back"
    assert len(left) + len(acknowledged_keys) <= POOL


def _acknowledged_prekeys_are_gone(stack: Stack, pid: int, handed_out: list[int]) -> bool:
    """Freezes identity, reads what it has committed, lets it go on. False if the file
    could not be read at that instant (frozen mid-way through a wal-index update)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        acknowledged = set(handed_out)  # every reply counted here arrived before the freeze
        db = sqlite3.connect(f"file:{stack.db_path('identity')}?mode=ro", uri=True, timeout=0.5)
        try:
            left = {row[0] for row in db.execute("SELECT key_id FROM one_time_prekeys")}
        except sqlite3.OperationalError:
            return False
        finally:
            db.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert not left & acknowledged, "a prekey was acknowledged before its removal committed"
    return True
