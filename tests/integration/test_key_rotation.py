"""Online key rotation of a real identity service holding 10,000 users."""

from __future__ import annotations

import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from securemsg.admin.v1 import database_admin_service_pb2 as admin_pb
from securemsg.admin.v1 import database_admin_service_pb2_grpc as admin_grpc
from securemsg.identity.v1 import identity_service_pb2 as pb

from services.common.audit_events import AuditRecord
from services.common.outbox import SqliteOutbox
from services.common.postgres.keys import open_pg_database
from services.common.postgres.outbox import PgOutbox
from services.common.sqlite import open_database
from services.identity import postgres_store
from services.identity.keys import SignedKey
from services.identity.model import IdentityStore, NewUser
from services.identity.store import MIGRATIONS, SqliteIdentityStore
from tests.support.stack import Stack
from tests.support.users import bearer, new_user, user_client

SEEDED = 10_000


def seed(stack: Stack, count: int) -> None:
    """Fills identity's database directly (registering over RPC would take minutes)."""
    key_text = stack.layout.key_file("identity").read_text()
    store: IdentityStore
    if stack.backend == "postgres":
        url = Path(stack["identity"].env["DATABASE_URL_FILE"]).read_text()
        pg = open_pg_database(
            url,
            service="identity",
            master_key=key_text,
            kdf_iterations=100_000,
            migrations=postgres_store.MIGRATIONS,
        )
        pg_outbox = PgOutbox(pg.database, pg.keyring, "identity", "seeder")
        store, close = (
            postgres_store.PostgresIdentityStore(pg.database, pg.keyring, pg_outbox),
            pg.database.close,
        )
    else:
        opened = open_database(
            stack.db_path("identity"),
            service="identity",
            master_key=key_text,
            kdf_iterations=100_000,
            migrations=MIGRATIONS,
            synchronous="NORMAL",
        )
        outbox = SqliteOutbox(opened.database, opened.keyring, "identity")
        store, close = (
            SqliteIdentityStore(opened.database, opened.keyring, outbox),
            opened.database.close,
        )
    key = SignedKey(1, bytes(32), bytes(64))
    pq = SignedKey(1, bytes(1184), bytes(64))

    def add(i: int) -> None:
        store.add_user(
            NewUser(f"seed{i:05}", f"Seed {i}", {}, bytes(32), bytes(32), key, pq, [], time.time()),
            AuditRecord("user_registered", f"seed{i:05}"),
        )

    # PostgreSQL takes concurrent writers (a round trip per statement); SQLite has one.
    with ThreadPoolExecutor(8 if stack.backend == "postgres" else 1) as pool:
        list(pool.map(add, range(count)))
    close()


def rotation_status(stack: Stack) -> admin_pb.GetKeyRotationStatusResponse:
    with stack.channel("identity", cert="operator") as channel:
        return admin_grpc.DatabaseAdminServiceStub(channel).GetKeyRotationStatus(
            admin_pb.GetKeyRotationStatusRequest(), timeout=30
        )


def rotate_to_new_key(stack: Stack, **extra: str) -> str:
    """Restarts identity with a new primary key and the old one; returns the old key."""
    identity = stack["identity"]
    identity.stop()
    old = stack.layout.key_file("identity").read_text()
    stack.layout.key_file("identity").write_text(secrets.token_urlsafe(32))
    identity.env.update({"DB_ENCRYPTION_OLD_KEYS": old, **extra})
    identity.start()
    return old


@pytest.mark.timeout(300)  # seeding and re-encrypting 20,000 rows on a shared 2-core machine
def test_rotation_under_load_fails_no_rpc_and_retires_the_old_key(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity", "session"), extra_env={
        "identity": {"KEY_ROTATION_BATCH_SIZE": "200", "KEY_ROTATION_PAUSE_SECONDS": "0.02"},
        "session": {"LOGIN_CHALLENGES_PER_MINUTE": "10000"},
    })  # fmt: skip
    stack["identity"].start()
    stack["identity"].stop()  # create the database, then fill it
    seed(stack, SEEDED)
    stack.start()
    client = user_client(stack)
    reader_token = client.login("reader", new_user(client, "reader"))
    old_key = rotate_to_new_key(stack)

    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def read_and_write(worker: int) -> None:
        own = user_client(stack)
        n = 0
        while not stop.is_set():
            try:
                user = f"seed{(worker * 997 + n * 31) % SEEDED:05}"
                bundle = own.identity.GetKeyBundle(
                    pb.GetKeyBundleRequest(user_id=user), metadata=bearer(reader_token), timeout=10
                ).bundle
                assert bundle.user_id == user
                if n % 5 == 0:
                    new_user(own, f"w{worker}-{n}", one_time=1)
                calls[0] += 1
            except BaseException as exc:  # collected; the assertion below reports them
                errors.append(exc)
            n += 1
        own.close()

    workers = [threading.Thread(target=read_and_write, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 120
        while not (status := rotation_status(stack)).old_keys_retirable:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert errors == []
    assert calls[0] > 50
    assert status.rows_remaining == 0
    assert status.rows_done >= 2 * SEEDED  # users and their outbox events

    # The old key is no longer needed: identity starts and serves with the new one alone.
    identity = stack["identity"]
    identity.stop()
    del identity.env["DB_ENCRYPTION_OLD_KEYS"]
    identity.start()
    for user in ("seed00000", "seed09999", "reader"):
        bundle = client.identity.GetKeyBundle(
            pb.GetKeyBundleRequest(user_id=user), metadata=bearer(reader_token), timeout=10
        ).bundle
        assert bundle.user_id == user
    assert rotation_status(stack).loaded_key_versions == [2]
    identity.stop()
    identity.env["DB_ENCRYPTION_KEY"] = old_key  # and the old key alone no longer unlocks it
    identity.env["DB_ENCRYPTION_KEY_FILE"] = ""
    code, output = identity.run_to_exit()
    assert code == 2
    assert "unlocks only retired key version 1" in output
    client.close()
    stack.stop()


def test_a_restart_mid_rotation_resumes_where_it_stopped(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity",), extra_env={
        "identity": {"KEY_ROTATION_BATCH_SIZE": "100", "KEY_ROTATION_PAUSE_SECONDS": "0.05"},
    })  # fmt: skip
    stack["identity"].start()
    stack["identity"].stop()
    seed(stack, 3000)
    stack["identity"].start()
    rotate_to_new_key(stack)
    deadline = time.monotonic() + 30
    while rotation_status(stack).rows_done < 1000:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stack["identity"].kill()  # mid-rotation
    stack["identity"].start()
    first = rotation_status(stack)
    # Resumed, not restarted: 3000 each of users rows, factors rows and outbox events.
    assert 0 < first.rows_remaining < 9000
    deadline = time.monotonic() + 60
    while not rotation_status(stack).old_keys_retirable:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    stack.stop()


def test_rotation_status_needs_the_operator_certificate(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity",))
    stack.start()
    try:
        with stack.channel("identity", cert="relay") as channel:
            stub = admin_grpc.DatabaseAdminServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.GetKeyRotationStatus(admin_pb.GetKeyRotationStatusRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert rotation_status(stack).old_keys_retirable  # nothing to rotate
    finally:
        stack.stop()
