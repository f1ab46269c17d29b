"""Key rotation of every persistent service at once, under load, through a crash.

Identity, session and audit hold rows made over RPC (users, sessions, audit events from
the outboxes and from direct appends). Each is restarted with a new master key and its
old one while clients keep registering, logging in, checking tokens, appending and
reading events; halfway all three are killed with SIGKILL and started again, and the
rotation resumes. No call may fail outside the crash. Afterwards each service starts
with the new key alone, and every row is read back: each user logs in and reads its
profile, each session token validates, each appended event comes back with its user
and details, and the audit chain verifies.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from securemsg.admin.v1 import database_admin_service_pb2 as admin_pb
from securemsg.admin.v1 import database_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_admin_service_pb2 as audit_admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as audit_admin_grpc

from services.client.keys import UserKeys
from tests.support.audit import append, events, operator_list
from tests.support.stack import Stack
from tests.support.users import new_user, user_client, validate

PERSISTENT = ("identity", "session", "audit")
SLOW_ROTATION = {"KEY_ROTATION_BATCH_SIZE": "25", "KEY_ROTATION_PAUSE_SECONDS": "0.05"}


def rotation_status(stack: Stack, service: str) -> admin_pb.GetKeyRotationStatusResponse:
    with stack.channel(service, cert="operator") as channel:
        return admin_grpc.DatabaseAdminServiceStub(channel).GetKeyRotationStatus(
            admin_pb.GetKeyRotationStatusRequest(), timeout=30
        )


class World:
    """What the clients were told was stored, to read back afterwards."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users: dict[str, tuple[str, UserKeys]] = {}  # user id -> (alias, keys)
        self.tokens: dict[str, str] = {}  # token -> user id
        self.appended: dict[str, tuple[str, dict[str, str]]] = {}  # event id -> user, details
        self.errors: list[str] = []

    def register(self, stack: Stack, user_id: str) -> None:
        client = user_client(stack)
        alias = f"Alias of {user_id}"
        keys = new_user(client, user_id, alias=alias, one_time=2)
        token = client.login(user_id, keys)
        client.close()
        with self.lock:
            self.users[user_id] = (alias, keys)
            self.tokens[token] = user_id

    def append_events(self, stack: Stack, count: int) -> None:
        batch = events(count, user_id=f"audited{uuid.uuid4().hex[:6]}")
        append(stack, batch)
        with self.lock:
            for event in batch:
                self.appended[event.event_id] = (event.user_id, dict(event.details))


def load(stack: Stack, world: World, stop: threading.Event, worker: int) -> None:
    """Writes and reads on every service until stopped; any failure is recorded."""
    n = 0
    while not stop.is_set():
        try:
            world.register(stack, f"w{worker}-{n}-{uuid.uuid4().hex[:4]}")
            world.append_events(stack, 10)
            with world.lock:
                token, user_id = next(reversed(world.tokens.items()))
            assert validate(stack, token).user_id == user_id
            assert operator_list(stack, user_id=next(iter(world.appended.values()))[0])
        except Exception as exc:  # reported by the test
            world.errors.append(f"worker {worker}: {exc!r}")
        n += 1


def under_load(stack: Stack, world: World, until: Callable[[], bool], timeout: float) -> None:
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(stack, world, stop, w)) for w in range(3)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "rotation did not get there in time"
            time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def test_all_three_rotate_under_load_through_a_crash_and_every_row_reads_back(
    tmp_path: Path,
) -> None:
    stack = Stack(
        tmp_path,
        PERSISTENT,
        extra_env={name: SLOW_ROTATION for name in PERSISTENT}
        | {"session": {**SLOW_ROTATION, "LOGIN_CHALLENGES_PER_MINUTE": "100000"}},
    )
    stack.start()
    world = World()
    try:
        for n in range(25):
            world.register(stack, f"before{n}")
        for _ in range(30):
            world.append_events(stack, 25)

        for service in PERSISTENT:  # a new primary key, the old one beside it
            stack[service].stop()
            stack.layout.rotate_key(service)
            stack[service].env["DB_ENCRYPTION_OLD_KEYS_FILE"] = str(
                stack.layout.old_keys_file(service)
            )
        stack.start()

        def some_progress() -> bool:
            return all(rotation_status(stack, s).rows_done > 0 for s in PERSISTENT)

        under_load(stack, world, some_progress, timeout=60)
        assert not all(rotation_status(stack, s).old_keys_retirable for s in PERSISTENT)
        for service in PERSISTENT:
            stack[service].kill()  # mid-rotation
        stack.start()

        def done() -> bool:
            return all(rotation_status(stack, s).old_keys_retirable for s in PERSISTENT)

        under_load(stack, world, done, timeout=120)
        assert world.errors == []
        for service in PERSISTENT:
            status = rotation_status(stack, service)
            assert (status.rows_remaining, status.old_keys_retirable) == (0, True), service

        for service in PERSISTENT:  # the old keys are not needed any more
            stack[service].stop()
            del stack[service].env["DB_ENCRYPTION_OLD_KEYS_FILE"]
        stack.start()
        for service in PERSISTENT:
            assert list(rotation_status(stack, service).loaded_key_versions) == [2], service

        client = user_client(stack)
        for user_id, (alias, keys) in world.users.items():
            assert client.profile(client.login(user_id, keys)).alias == alias
        client.close()
        for token, user_id in world.tokens.items():
            assert validate(stack, token).user_id == user_id
        stored = {e.event_id: e for e in operator_list(stack)}
        for event_id, (user_id, details) in world.appended.items():
            assert (stored[event_id].user_id, dict(stored[event_id].details)) == (
                user_id,
                details,
            )
        with stack.channel("audit", cert="operator") as channel:
            verified = audit_admin_grpc.AuditAdminServiceStub(channel).VerifyAuditLog(
                audit_admin_pb.VerifyAuditLogRequest(), timeout=60
            )
        assert verified.ok, verified.problem
        assert verified.checked_count == len(stored)
    finally:
        stack.stop()
