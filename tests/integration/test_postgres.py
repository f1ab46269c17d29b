"""Identity, session and audit as several processes over one PostgreSQL database.

Each test runs two real service processes (replicas) on one database and drives them
through their gRPC APIs, as a deployment with `--scale identity=2` would. These tests
always use PostgreSQL, whatever TEST_BACKEND says.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg
import pytest
from securemsg.audit.v1 import audit_admin_service_pb2 as audit_admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as audit_admin_grpc
from securemsg.audit.v1 import audit_ingest_service_pb2 as ingest_pb
from securemsg.audit.v1 import audit_ingest_service_pb2_grpc as ingest_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as identity_internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as identity_internal_grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.identity.v1 import identity_service_pb2_grpc as identity_grpc
from securemsg.session.v1 import session_internal_service_pb2 as internal_pb
from securemsg.session.v1 import session_internal_service_pb2_grpc as internal_grpc

from services.client.keys import UserKeys
from services.client.sdk import Endpoints, UserClient
from services.common.postgres.backup import libpq_environment
from tests.support.audit import append, audit_total, events, operator_list, verify
from tests.support.postgres import client_tool, running_server
from tests.support.replicas import add_replica, channel_to
from tests.support.stack import ServiceProcess, Stack
from tests.support.users import bearer, new_user, registration, user_client, validate

pytestmark = pytest.mark.integration

FAST_SHIPPING = {"AUDIT_SHIP_IDLE_SECONDS": "0.05"}


@pytest.fixture
def pg_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(
        tmp_path,
        ("identity", "session", "audit"),
        extra_env={"identity": FAST_SHIPPING, "session": FAST_SHIPPING},
        backend="postgres",
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def second_identity(pg_stack: Stack) -> Iterator[ServiceProcess]:
    replica = add_replica(pg_stack, "identity", "b")
    replica.start()
    yield replica
    replica.stop()


def identity_stubs(
    stack: Stack, replica: ServiceProcess
) -> tuple[identity_grpc.IdentityServiceStub, identity_grpc.IdentityServiceStub]:
    return (
        identity_grpc.IdentityServiceStub(stack.channel("identity")),
        identity_grpc.IdentityServiceStub(channel_to(stack, replica)),
    )


def test_a_prekey_is_handed_out_at_most_once_through_two_replicas(
    pg_stack: Stack, second_identity: ServiceProcess
) -> None:
    client = user_client(pg_stack)
    owner = new_user(client, "popular", one_time=60)
    token = client.login("fan", new_user(client, "fan"))
    stubs = identity_stubs(pg_stack, second_identity)

    def fetch(i: int) -> int | None:
        reply = stubs[i % 2].GetKeyBundle(
            identity_pb.GetKeyBundleRequest(user_id="popular"), metadata=bearer(token), timeout=20
        )
        bundle = reply.bundle
        return bundle.one_time_prekey.key_id if bundle.HasField("one_time_prekey") else None

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(fetch, range(70)))
    handed = [r for r in results if r is not None]
    assert len(handed) == len(set(handed)) == 60  # distinct, every uploaded key once
    assert results.count(None) == 10  # then bundles came without one
    left = stubs[1].GetPrekeyCount(
        identity_pb.GetPrekeyCountRequest(),
        metadata=bearer(client.login("popular", owner)),
        timeout=10,
    )
    assert left.one_time_prekey_count == 0  # handed out + remaining = uploaded


def test_one_registration_wins_through_two_replicas(
    pg_stack: Stack, second_identity: ServiceProcess
) -> None:
    stubs = identity_stubs(pg_stack, second_identity)
    start = threading.Barrier(10)

    def register(i: int) -> grpc.StatusCode:
        request = registration("contested", UserKeys.generate(1))
        start.wait()
        try:
            stubs[i % 2].RegisterUser(request, timeout=20)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(register, range(10)))
    assert codes.count(grpc.StatusCode.OK) == 1
    assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 9


def test_sliding_through_two_session_replicas_never_moves_a_deadline_back(
    pg_stack: Stack,
) -> None:
    replica = add_replica(pg_stack, "session", "b")
    replica.start()
    try:
        client = user_client(pg_stack)
        token = client.login("slider", new_user(client, "slider"))
        with channel_to(pg_stack, replica, cert="relay") as channel:
            other = internal_grpc.SessionInternalServiceStub(channel)
            seen: list[float] = []
            for i in range(20):
                if i % 2:
                    reply = other.ValidateSession(
                        internal_pb.ValidateSessionRequest(token=token), timeout=10
                    )
                else:
                    reply = validate(pg_stack, token)
                seen.append(reply.expire_time.ToDatetime().timestamp())
        assert seen == sorted(seen)
    finally:
        replica.stop()


def test_audit_appends_through_two_replicas_stay_gapless_and_verifiable(
    pg_stack: Stack,
) -> None:
    replica = add_replica(pg_stack, "audit", "b")
    replica.start()
    try:
        batches = [events(10) for _ in range(12)]

        def send(i: int) -> int:
            if i % 2:
                with channel_to(pg_stack, replica, cert="identity") as channel:
                    return int(
                        ingest_grpc.AuditIngestServiceStub(channel)
                        .AppendAuditEvents(
                            ingest_pb.AppendAuditEventsRequest(events=batches[i]), timeout=20
                        )
                        .appended_count
                    )
            return int(append(pg_stack, batches[i]).appended_count)

        with ThreadPoolExecutor(6) as pool:
            appended = sum(pool.map(send, range(12)))
        assert appended == 120
        result = verify(pg_stack)
        assert result.ok, result.problem
        assert result.checked_count == result.total_events == 120
    finally:
        replica.stop()


def test_kill_9_of_one_identity_replica_loses_nothing_and_the_other_keeps_serving(
    pg_stack: Stack, second_identity: ServiceProcess
) -> None:
    stubs = identity_stubs(pg_stack, second_identity)
    acknowledged: list[str] = []
    failures_on_b: list[grpc.StatusCode] = []
    lock = threading.Lock()
    stop = time.monotonic() + 3.0

    def work(worker: int) -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            user_id = f"k{worker}-{n}"
            try:
                stubs[worker % 2].RegisterUser(
                    registration(user_id, UserKeys.generate(1)), timeout=5
                )
            except grpc.RpcError as error:
                if worker % 2:
                    failures_on_b.append(error.code())
                continue
            with lock:
                acknowledged.append(user_id)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    killer = threading.Timer(1.5, lambda: os.kill(pg_stack["identity"].pid, signal.SIGKILL))
    for thread in threads:
        thread.start()
    killer.start()
    for thread in threads:
        thread.join()
    pg_stack["identity"].process = None
    assert failures_on_b == []  # the survivor never failed a call
    assert len(acknowledged) > 10
    for user_id in acknowledged:  # every acknowledged registration exists (ask the survivor)
        with pytest.raises(grpc.RpcError) as taken:
            stubs[1].RegisterUser(registration(user_id, UserKeys.generate(0)), timeout=10)
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS, user_id


def test_each_outbox_is_shipped_by_one_replica_and_survives_its_holder_being_killed(
    pg_stack: Stack, second_identity: ServiceProcess
) -> None:
    pg_stack["audit"].stop()  # events pile up in identity's outbox meanwhile
    stubs = identity_stubs(pg_stack, second_identity)
    users = [f"outbox-{i}" for i in range(30)]
    for i, user_id in enumerate(users):
        stubs[i % 2].RegisterUser(registration(user_id, UserKeys.generate(0)), timeout=10)
    with pg_stack.raw_database("identity") as conn:
        holder = conn.execute("SELECT holder FROM leases WHERE name = 'outbox/identity'")
        holders = holder.fetchall()
    assert len(holders) == 1  # one replica holds the shipping lease
    pg_stack["audit"].start()
    time.sleep(0.3)
    # Kill whichever replica holds the lease now, mid-shipping.
    first_pid = pg_stack["identity"].pid
    victim = pg_stack["identity"] if str(first_pid) in str(holders[0][0]) else second_identity
    victim.kill()
    deadline = time.monotonic() + 40  # lease expiry (15 s) plus shipping
    while True:
        registered = [
            e for e in operator_list(pg_stack, action="user_registered") if e.user_id in users
        ]
        if len(registered) >= len(users) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(e.user_id for e in registered) == sorted(users)  # each once, none lost
    assert verify(pg_stack).ok


def test_the_database_role_of_one_service_cannot_read_another_services_tables(
    pg_stack: Stack,
) -> None:
    identity_url = Path(pg_stack["identity"].env["DATABASE_URL_FILE"]).read_text()
    session_url = Path(pg_stack["session"].env["DATABASE_URL_FILE"]).read_text()
    session_db = psycopg.conninfo.conninfo_to_dict(session_url)["dbname"]
    intruder = psycopg.conninfo.make_conninfo(identity_url, dbname=session_db)
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(intruder, connect_timeout=5)


def dump_text(stack: Stack, name: str) -> str:
    """A plain-text pg_dump of one service's database, taken with its own role."""
    url = Path(stack[name].env["DATABASE_URL_FILE"]).read_text()
    result = subprocess.run(
        [client_tool("pg_dump"), "--format=plain", "--no-owner"],
        env=libpq_environment(url),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout


def revealed(dump: str, secret: str) -> bool:
    """Whether `secret` is in the dump as text, or inside any bytea value."""
    if secret in dump:
        return True
    blobs = (bytes.fromhex(h) for h in re.findall(r"\\\\x([0-9a-f]+)", dump))
    return any(secret.encode() in blob for blob in blobs)


def test_a_pg_dump_of_any_service_shows_no_planted_secret(pg_stack: Stack) -> None:
    client = user_client(pg_stack)
    planted = {
        "user id": "planted-user-7f3a9c",
        "alias": "Planted Alias Qx7",
        "metadata": "planted-metadata-value",
        "user agent": "PlantedAgent/9.93",
        "audit detail": "planted-audit-detail-5b1",
    }
    keys = new_user(
        client,
        planted["user id"],
        alias=planted["alias"],
        metadata={"device": planted["metadata"]},
    )
    token = client.login(planted["user id"], keys, user_agent=planted["user agent"])
    planted["token"] = token
    append(pg_stack, events(3, user_id=planted["user id"], action="user_login"))
    detail = events(1)
    detail[0].details["note"] = planted["audit detail"]
    append(pg_stack, detail)
    deadline = time.monotonic() + 20  # identity's and session's events reach audit
    while not any(e.user_id == planted["user id"] and e.source == "session"
                  for e in operator_list(pg_stack)):  # fmt: skip
        assert time.monotonic() < deadline, "session's audit events did not arrive"
        time.sleep(0.2)
    dumps = {name: dump_text(pg_stack, name) for name in ("identity", "session", "audit")}
    assert "CREATE TABLE public.users" in dumps["identity"]  # the scan reads real dumps
    assert "COPY public.audit_events" in dumps["audit"]
    for name, dump in dumps.items():
        for what, secret in {**planted, "address": "127.0.0.1"}.items():
            assert not revealed(dump, secret), f"{name}'s dump reveals the {what}"


def test_postgres_stopped_for_ten_seconds_gives_unavailable_fast_then_service_resumes(
    tmp_path: Path,
) -> None:
    with running_server() as server:
        if not server.private:
            pytest.fail("this test stops PostgreSQL: it needs a private server")
        stack = Stack(tmp_path, ("identity", "session"), postgres=server)
        stack.start()
        try:
            client = user_client(stack)
            token = client.login("steady", new_user(client, "steady"))
            identity = identity_grpc.IdentityServiceStub(stack.channel("identity"))
            outcomes: list[tuple[float, grpc.StatusCode, float]] = []
            lock = threading.Lock()
            begin = time.monotonic()
            stop_at = begin + 24.0

            def work(worker: int) -> None:
                n = 0
                while time.monotonic() < stop_at:
                    n += 1
                    started = time.monotonic()
                    try:
                        if worker % 2:
                            identity.RegisterUser(
                                registration(f"s{worker}-{n}", UserKeys.generate(0)), timeout=15
                            )
                        else:
                            validate(stack, token)
                        code = grpc.StatusCode.OK
                    except grpc.RpcError as error:
                        code = error.code()
                    with lock:
                        outcomes.append((started - begin, code, time.monotonic() - started))
                    time.sleep(0.05)

            threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(3.0)
            server.halt()
            halted = time.monotonic() - begin
            time.sleep(10.0)
            server.resume()
            resumed = time.monotonic() - begin
            for thread in threads:
                thread.join()
            processes = [stack[n].process for n in stack.services]
            alive = all(p is not None and p.poll() is None for p in processes)
            assert alive, "a service exited instead of waiting for the database"
        finally:
            stack.stop()
        assert {code for _, code, _ in outcomes} <= {
            grpc.StatusCode.OK,
            grpc.StatusCode.UNAVAILABLE,
        }
        down = [o for o in outcomes if halted + 0.5 < o[0] < resumed - 0.5]
        assert down, "no call was made while PostgreSQL was stopped"
        assert all(code == grpc.StatusCode.UNAVAILABLE for _, code, _ in down)
        assert max(seconds for _, _, seconds in down) < 5.0, "a call hung instead of failing fast"
        tail = [code for started, code, _ in outcomes if started > resumed + 8.0]
        assert tail, "no call was made after recovery"
        assert set(tail) == {grpc.StatusCode.OK}, "the services did not recover by themselves"


def test_two_replicas_of_each_service_under_mixed_load_one_of_each_killed_midway(
    pg_stack: Stack,
) -> None:
    """The scale-out promise end to end: identity, session and audit each run twice on one
    database; many clients register, log in and fetch bundles; one replica of each is
    killed with kill -9 midway. Afterwards nothing acknowledged is missing."""
    survivors = {
        name: add_replica(pg_stack, name, "b") for name in ("identity", "session", "audit")
    }
    internal = {name: p.env["INTERNAL_LISTEN_ADDRESS"] for name, p in survivors.items()}
    for process in survivors.values():  # the survivors call each other
        process.env.update(
            {
                "IDENTITY_INTERNAL_ADDRESS": internal["identity"],
                "SESSION_INTERNAL_ADDRESS": internal["session"],
                "AUDIT_INTERNAL_ADDRESS": internal["audit"],
            }
        )
        process.start()
    try:
        _mixed_load_with_kills(pg_stack, survivors)
    finally:
        for process in survivors.values():
            process.stop()


def _client_of(stack: Stack, processes: dict[str, ServiceProcess] | None) -> UserClient:
    ports = {name: public for name, (public, _, _) in stack.ports.items()}
    if processes is not None:
        for name, process in processes.items():
            ports[name] = int(process.env["LISTEN_ADDRESS"].rsplit(":", 1)[1])
    return UserClient(Endpoints(ca_file=stack.layout.tls / "ca.pem", ports=ports))


def _mixed_load_with_kills(stack: Stack, survivors: dict[str, ServiceProcess]) -> None:
    setup = _client_of(stack, survivors)
    popular = new_user(setup, "popular", one_time=100)
    assert len(popular.one_time_protos()) == 100
    registered: list[str] = []
    tokens: list[str] = []
    prekeys: list[int] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 4.0

    def work(worker: int) -> None:
        client = _client_of(stack, survivors if worker % 2 else None)  # half on each replica
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            user_id = f"m{worker}-{n}"
            keys = UserKeys.generate(1)
            try:
                client.register(user_id, f"Alias {user_id}", keys)
                with lock:
                    registered.append(user_id)
                token = client.login(user_id, keys)
                with lock:
                    tokens.append(token)
                bundle = client.bundle(token, "popular")
                if bundle.HasField("one_time_prekey"):
                    with lock:
                        prekeys.append(bundle.one_time_prekey.key_id)
            except grpc.RpcError:
                continue  # a killed replica: the client learns nothing was acknowledged
        client.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    for name in ("identity", "session", "audit"):
        stack[name].kill()  # kill -9 midway
    for thread in threads:
        thread.join()
    assert len(registered) > 20
    assert len(tokens) > 20

    with channel_to(stack, survivors["identity"], cert="session") as channel:
        status = identity_internal_grpc.IdentityInternalServiceStub(channel)
        for user_id in registered:  # every acknowledged registration exists
            reply = status.GetUserStatus(
                identity_internal_pb.GetUserStatusRequest(user_id=user_id), timeout=10
            )
            assert reply.active, user_id
    with channel_to(stack, survivors["session"], cert="relay") as channel:
        sessions = internal_grpc.SessionInternalServiceStub(channel)
        for token in tokens:  # every issued token validates on the survivor
            sessions.ValidateSession(internal_pb.ValidateSessionRequest(token=token), timeout=10)
    assert len(prekeys) == len(set(prekeys))  # prekeys distinct ...
    with stack.raw_database("identity") as conn:
        users = conn.execute("SELECT count(*) FROM users").fetchone()[0]
        pool = {
            row[0]
            for row in conn.execute(
                "SELECT key_id FROM one_time_prekeys WHERE user_row = (SELECT min(id) FROM users)"
            ).fetchall()
        }
    # ... and conserved: a key handed out is gone from the pool, and no key vanished
    # except by being handed out (a reply lost to the kill is the only gap allowed).
    assert not pool & set(prekeys)
    assert pool | set(prekeys) <= {k.key_id for k in popular.one_time_protos()}
    assert len(pool) + len(prekeys) >= 100 - 8  # at most one lost reply per client
    assert users >= len(registered) + 1
    with stack.raw_database("session") as conn:
        session_rows = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
    deadline = time.monotonic() + 40  # outboxes drain to the surviving audit replica
    while True:
        with channel_to(stack, survivors["audit"], cert="operator") as channel:
            stats = audit_admin_grpc.AuditAdminServiceStub(channel).GetAuditStats(
                audit_admin_pb.GetAuditStatsRequest(), timeout=10
            )
        by_action = dict(stats.events_by_action)
        if (
            by_action.get("user_registered", 0) == users
            and by_action.get("user_login", 0) == session_rows
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert by_action.get("user_registered", 0) == users  # one event per committed change:
    assert by_action.get("user_login", 0) == session_rows  # none lost, none twice
    with channel_to(stack, survivors["audit"], cert="operator") as channel:
        verdict = audit_admin_grpc.AuditAdminServiceStub(channel).VerifyAuditLog(
            audit_admin_pb.VerifyAuditLogRequest(), timeout=30
        )
    assert verdict.ok, verdict.problem
    assert verdict.checked_count == verdict.total_events == stats.total_events


def test_a_sqlite_deployment_copied_with_the_cli_serves_on_postgresql(tmp_path: Path) -> None:
    """The migration of an existing deployment: each service's SQLite file copied into its
    PostgreSQL database by `launcher copy-to-postgres` (progress bar, rows verbatim); the
    services then start on PostgreSQL with the same keys, and the account logs in, the
    session validates (their row MACs hold) and the audit chain verifies, then grows."""
    services = ("identity", "session", "audit")
    fast = {"identity": FAST_SHIPPING, "session": FAST_SHIPPING}
    before = Stack(tmp_path, services, extra_env=fast, backend="sqlite")
    before.start()
    try:
        client = user_client(before)
        keys = new_user(client, "mover", alias="Alias Mover")
        token = client.login("mover", keys)
        client.close()
        for _ in range(100):  # the registration and the login reach the audit log
            if audit_total(before) == 2:
                break
            time.sleep(0.1)
        assert audit_total(before) == 2
    finally:
        before.stop()

    after = Stack(tmp_path, services, extra_env=fast, backend="postgres")  # the same keys
    for service in services:
        copied = subprocess.run(
            [
                sys.executable, "-m", "services.launcher", "copy-to-postgres",
                "--service", service,
                "--source", str(before.db_path(service)),
                "--database-url-file", after[service].env["DATABASE_URL_FILE"],
                "--key-file", str(after.layout.key_file(service)),
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert copied.returncode == 0, copied.stderr
        assert re.search(r"copied \d+ rows", copied.stdout)
        assert f"{service} rows" in copied.stderr  # the progress bar
    after.start()
    try:
        assert validate(after, token).user_id == "mover"
        client = user_client(after)
        assert client.login("mover", keys)  # the copied users row's MAC holds
        client.close()
        for _ in range(100):
            if audit_total(after) == 3:
                break
            time.sleep(0.1)
        result = verify(after)
        assert result.ok, result.problem
        assert audit_total(after) == 3  # the copied chain, continued by the new login
    finally:
        after.stop()
