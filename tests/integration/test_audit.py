"""The audit log and the outboxes that feed it, against real processes."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from securemsg.audit.v1 import audit_admin_service_pb2 as admin_pb
from securemsg.audit.v1 import audit_admin_service_pb2_grpc as admin_grpc
from securemsg.audit.v1 import audit_service_pb2 as pb
from securemsg.audit.v1 import audit_service_pb2_grpc as pb_grpc
from securemsg.session.v1 import session_admin_service_pb2 as session_admin_pb
from securemsg.session.v1 import session_admin_service_pb2_grpc as session_admin_grpc

from services.client.keys import UserKeys
from services.common import convert
from tests.support.audit import append, audit_total, events, operator_list
from tests.support.stack import Stack
from tests.support.users import bearer, details, new_user, user_client

ALL = ("identity", "session", "relay", "audit")


def wait_for_total(stack: Stack, expected: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (total := audit_total(stack)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert total == expected


def session_backlog(stack: Stack) -> int:
    with stack.channel("session", cert="operator") as channel:
        return (
            session_admin_grpc.SessionAdminServiceStub(channel)
            .GetSessionStats(session_admin_pb.GetSessionStatsRequest(), timeout=10)
            .audit_outbox_backlog
        )


@pytest.fixture
def stack_without_audit(tmp_path: Path) -> Iterator[Stack]:
    many_logins = {"session": {"LOGIN_CHALLENGES_PER_MINUTE": "10000"}}
    stack = Stack(tmp_path, ALL, extra_env=many_logins)
    for name in ("identity", "session"):
        stack[name].start()
    yield stack
    stack.stop()


def test_events_made_while_audit_is_down_arrive_once_and_in_order(
    stack_without_audit: Stack,
) -> None:
    stack = stack_without_audit
    client = user_client(stack)
    users = {f"user{i}": new_user(client, f"user{i}") for i in range(10)}
    for n in range(200):
        user_id = f"user{n % 10}"
        client.login(user_id, users[user_id])
    assert session_backlog(stack) == 200

    stack["audit"].start()
    wait_for_total(stack, 210)
    time.sleep(0.5)  # give a duplicate, were one to be sent, time to show up
    assert audit_total(stack) == 210

    events = list(reversed(operator_list(stack)))  # oldest first
    assert len({e.event_id for e in events}) == 210
    by_source = defaultdict(list)
    for event in events:
        by_source[event.source].append(event)
    assert [e.action for e in by_source["identity"]] == ["user_registered"] * 10
    assert [e.user_id for e in by_source["identity"]] == [f"user{i}" for i in range(10)]
    assert [e.action for e in by_source["session"]] == ["user_login"] * 200
    assert [e.user_id for e in by_source["session"]] == [f"user{n % 10}" for n in range(200)]
    assert session_backlog(stack) == 0


def test_kill_9_with_a_full_outbox_loses_no_event(stack_without_audit: Stack) -> None:
    stack = stack_without_audit
    client = user_client(stack)
    keys = new_user(client, "victim")
    for _ in range(30):
        client.login("victim", keys)
    stack["session"].kill()
    stack["session"].start()
    stack["audit"].start()
    wait_for_total(stack, 31)
    actions = sorted(e.action for e in operator_list(stack))
    assert actions == ["user_login"] * 30 + ["user_registered"]


@pytest.fixture
def audit_only(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path, ("audit",))
    stack.start()
    yield stack
    stack.stop()


def verify(stack: Stack) -> admin_pb.VerifyAuditLogResponse:
    with stack.channel("audit", cert="operator") as channel:
        return admin_grpc.AuditAdminServiceStub(channel).VerifyAuditLog(
            admin_pb.VerifyAuditLogRequest(), timeout=30
        )


def test_an_event_deleted_from_a_producers_outbox_is_reported_as_missing(
    stack_without_audit: Stack,
) -> None:
    # The review deleted a pending outbox row: the event was gone without a trace and
    # VerifyAuditLog still said OK.
    stack = stack_without_audit
    client = user_client(stack)
    keys = new_user(client, "victim")
    for _ in range(3):
        client.login("victim", keys)
    stack["session"].stop()
    with stack.raw_database("session") as db:
        middle = db.execute("SELECT id FROM audit_outbox ORDER BY id").fetchall()[1][0]
        db.execute("DELETE FROM audit_outbox WHERE id = ?", (middle,))
    stack["session"].start()
    stack["audit"].start()
    wait_for_total(stack, 3)  # the registration and two of the three logins
    result = verify(stack)
    assert not result.ok
    assert "events 2 of session" in result.problem
    assert "never arrived" in result.problem


def test_a_retried_batch_is_stored_once(audit_only: Stack) -> None:
    batch = events(5)
    assert append(audit_only, batch).appended_count == 5
    again = append(audit_only, batch)
    assert (again.appended_count, again.duplicate_count) == (0, 5)
    assert audit_total(audit_only) == 5
    assert verify(audit_only).ok


def tamper(stack: Stack, sql: str) -> None:
    stack["audit"].stop()
    with stack.raw_database("audit") as conn:
        if sql.startswith("FLIP "):  # FLIP <column> <sequence>: one bit of one byte
            _, column, sequence = sql.split()
            blob = bytearray(
                conn.execute(
                    f"SELECT {column} FROM audit_events WHERE sequence = ?", (sequence,)
                ).fetchone()[0]
            )
            blob[len(blob) // 2] ^= 0x01
            conn.execute(
                f"UPDATE audit_events SET {column} = ? WHERE sequence = ?", (bytes(blob), sequence)
            )
        else:
            conn.executescript(sql)
    stack["audit"].start()


# A forged event (a copy of row `copied`) inserted at `at`: later rows move up one and the
# head follows (whoever can write the file can do all that); only the link cannot be
# computed without the chain key.
INSERT_AT = """
    UPDATE audit_events SET sequence = -(sequence + 1) WHERE sequence >= {at};
    UPDATE audit_events SET sequence = -sequence WHERE sequence < 0;
    INSERT INTO audit_events (sequence, event_id, action, source, user_index, user_id_ct,
                              details_ct, occur_time, record_time, link, chain_version)
        SELECT {at}, 'forged-' || event_id, action, source, user_index, user_id_ct,
               details_ct, occur_time, record_time, link, chain_version
        FROM audit_events WHERE sequence = {copied};
    UPDATE audit_head SET sequence = sequence + 1;
"""


@pytest.mark.parametrize(
    ("sql", "first_bad"),
    [
        ("FLIP details_ct 5", 5),
        ("FLIP user_id_ct 2", 2),
        ("FLIP link 9", 9),
        ("UPDATE audit_events SET action = 'user_logout' WHERE sequence = 6", 6),
        ("UPDATE audit_events SET occur_time = occur_time + 1 WHERE sequence = 4", 4),
        ("UPDATE audit_events SET user_index = NULL WHERE sequence = 8", 8),
        # Every chained column: an edit to any of them breaks the link of its row.
        ("UPDATE audit_events SET source = 'session' WHERE sequence = 3", 3),
        ("UPDATE audit_events SET event_id = 'renamed-event' WHERE sequence = 5", 5),
        ("UPDATE audit_events SET record_time = record_time - 60 WHERE sequence = 2", 2),
        (
            "UPDATE audit_events SET user_id_ct = (SELECT user_id_ct FROM audit_events"
            " WHERE sequence = 1) WHERE sequence = 2",
            2,
        ),
        (
            "UPDATE audit_events SET details_ct = (SELECT details_ct FROM audit_events"
            " WHERE sequence = 6) WHERE sequence = 7",
            7,
        ),
        (INSERT_AT.format(at=6, copied=5), 6),
        (INSERT_AT.format(at=1, copied=2), 1),
        (INSERT_AT.format(at=11, copied=10), 11),  # appended after the last one
        ("DELETE FROM audit_events WHERE sequence = 7", 7),
        ("DELETE FROM audit_events WHERE sequence = 10", 10),  # the last one
    ],
)
def test_verify_names_the_first_tampered_position(
    audit_only: Stack, sql: str, first_bad: int
) -> None:
    append(audit_only, events(10))
    assert verify(audit_only).ok
    tamper(audit_only, sql)
    result = verify(audit_only)
    assert not result.ok
    assert result.first_bad_sequence == first_bad
    assert str(first_bad) in result.problem


def test_verify_finds_two_swapped_rows(audit_only: Stack) -> None:
    append(audit_only, events(10))
    stack = audit_only
    stack["audit"].stop()
    with stack.raw_database("audit") as conn:
        conn.execute("UPDATE audit_events SET sequence = -3 WHERE sequence = 3")
        conn.execute("UPDATE audit_events SET sequence = 3 WHERE sequence = 4")
        conn.execute("UPDATE audit_events SET sequence = 4 WHERE sequence = -3")
    stack["audit"].start()
    result = verify(stack)
    assert (result.ok, result.first_bad_sequence) == (False, 3)


def test_pagination_returns_every_event_exactly_once_newest_first(audit_only: Stack) -> None:
    append(audit_only, events(57))
    seen: list[int] = []
    with audit_only.channel("audit", cert="operator") as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        token = ""
        pages = 0
        while True:
            page = stub.ListAuditEvents(
                pb.ListAuditEventsRequest(page_size=10, page_token=token), timeout=10
            )
            seen.extend(e.sequence for e in page.events)
            pages += 1
            token = page.next_page_token
            if not token:
                break
    assert pages == 6
    assert seen == list(range(57, 0, -1))


def test_filters_by_user_action_and_time(audit_only: Stack) -> None:
    batch = events(9) + events(3, action="user_logout", user_id="user9")
    append(audit_only, batch)
    assert len(operator_list(audit_only, user_id="user0")) == 3
    assert len(operator_list(audit_only, action="user_logout")) == 3
    middle = batch[2].occur_time
    later = operator_list(audit_only, start_time=middle, action="user_login")
    assert sorted(int(e.details["n"]) for e in later) == list(range(2, 9))


def test_a_page_token_from_another_query_is_invalid_argument(audit_only: Stack) -> None:
    append(audit_only, events(5))
    with audit_only.channel("audit", cert="operator") as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        token = stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=2)).next_page_token
        with pytest.raises(grpc.RpcError) as error:
            stub.ListAuditEvents(
                pb.ListAuditEventsRequest(page_size=2, page_token=token, action="user_logout")
            )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in details(error.value)


def _forged_v1_token(sequence: int) -> str:
    # What anyone could build from the old, unsigned format: version, sequence and an
    # unkeyed digest of the filters (an operator listing with no filters here).
    digest = hashlib.sha256(b"||None|None").hexdigest()[:16]
    return base64.urlsafe_b64encode(f"v1.{sequence}.{digest}".encode()).decode().rstrip("=")


@pytest.mark.parametrize("sequence", [2**63, 2**62 + 1, 4, 0])
def test_a_forged_page_token_is_invalid_argument(audit_only: Stack, sequence: int) -> None:
    append(audit_only, events(5))
    with audit_only.channel("audit", cert="operator") as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ListAuditEvents(
                pb.ListAuditEventsRequest(page_token=_forged_v1_token(sequence)), timeout=10
            )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in details(error.value)


def test_a_page_token_edited_to_point_elsewhere_is_invalid_argument(audit_only: Stack) -> None:
    append(audit_only, events(5))
    with audit_only.channel("audit", cert="operator") as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        token = stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=2)).next_page_token
        raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        raw[7] ^= 0x01  # the last byte of the sequence it carries
        edited = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
        with pytest.raises(grpc.RpcError) as error:
            stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=2, page_token=edited))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event_id": "has spaces"}, "events[0].event_id"),
        ({"action": "Bad-Action"}, "events[0].action"),
        ({"action": "made_up_action"}, "events[0].action must be one of the documented"),
        ({"source": "session"}, "events[0].source must be 'identity'"),
        ({"user_id": "X"}, "events[0].user_id must be"),
    ],
)
def test_malformed_events_reject_the_whole_batch(
    audit_only: Stack, change: dict[str, str], message: str
) -> None:
    batch = events(2)
    for field, value in change.items():
        setattr(batch[0], field, value)
    with pytest.raises(grpc.RpcError) as error:
        append(audit_only, batch)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details(error.value)
    assert audit_total(audit_only) == 0


def test_only_backend_services_may_append(audit_only: Stack) -> None:
    for cert in ("operator", "audit"):
        with pytest.raises(grpc.RpcError) as error:
            append(audit_only, events(1, source=cert), cert=cert)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_users_read_only_their_own_events(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ALL)
    stack.start()
    try:
        client = user_client(stack)
        alice_token = client.login("alice", new_user(client, "alice"))
        client.login("bob", new_user(client, "bob"))
        wait_for_total(stack, 4)
        with stack.channel("audit") as channel:
            stub = pb_grpc.AuditServiceStub(channel)
            own = stub.ListAuditEvents(
                pb.ListAuditEventsRequest(), metadata=bearer(alice_token), timeout=10
            ).events
            assert sorted(e.action for e in own) == ["user_login", "user_registered"]
            assert {e.user_id for e in own} == {"alice"}
            with pytest.raises(grpc.RpcError) as error:
                stub.ListAuditEvents(
                    pb.ListAuditEventsRequest(user_id="bob"),
                    metadata=bearer(alice_token),
                    timeout=10,
                )
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as error:
                stub.ListAuditEvents(pb.ListAuditEventsRequest(), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stack.stop()


@pytest.mark.sqlite_only
def test_the_audit_file_holds_no_user_id_or_details(audit_only: Stack) -> None:
    append(audit_only, events(3, user_id="walrus-secret") + events(1, user_id="x" * 3))
    audit_only["audit"].stop()
    raw = b"".join(p.read_bytes() for p in audit_only.layout.data.glob("audit.db*"))
    assert b"walrus-secret" not in raw
    assert b'"n"' not in raw


def verify_in_slices(stack: Stack, size: int) -> list[admin_pb.VerifyAuditLogResponse]:
    results = []
    with stack.channel("audit", cert="operator") as channel:
        stub = admin_grpc.AuditAdminServiceStub(channel)
        start = 1
        while True:
            result = stub.VerifyAuditLog(
                admin_pb.VerifyAuditLogRequest(start_sequence=start, max_events=size), timeout=30
            )
            results.append(result)
            if not result.ok or result.next_sequence == 0:
                return results
            start = result.next_sequence


def test_verifying_in_slices_checks_the_same_as_one_walk(audit_only: Stack) -> None:
    append(audit_only, events(10))
    slices = verify_in_slices(audit_only, 3)
    assert [(r.ok, r.checked_count, r.next_sequence) for r in slices] == [
        (True, 3, 4), (True, 3, 7), (True, 3, 10), (True, 1, 0),
    ]  # fmt: skip
    assert {r.total_events for r in slices} == {10}
    tamper(audit_only, "FLIP details_ct 8")
    broken = verify_in_slices(audit_only, 3)[-1]
    assert (broken.ok, broken.first_bad_sequence) == (False, 8)
    tamper(audit_only, "DELETE FROM audit_events WHERE sequence = 10")
    assert verify_in_slices(audit_only, 3)[-1].first_bad_sequence == 8


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"page_size": -1}, "page_size must not be negative"),
        ({"page_size": 1001}, "page_size must be at most 1000"),
        ({"action": "Not An Action"}, "action must be"),
        ({"user_id": "NO"}, "user_id must be"),
        ({"page_token": "garbage"}, "page_token"),
    ],
)
def test_malformed_list_requests_are_invalid_argument(
    audit_only: Stack, request_fields: dict[str, object], message: str
) -> None:
    with audit_only.channel("audit", cert="operator") as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ListAuditEvents(pb.ListAuditEventsRequest(**request_fields), timeout=10)  # type: ignore[arg-type]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details(error.value)


def test_a_time_range_that_ends_before_it_starts_is_invalid_argument(audit_only: Stack) -> None:
    later, earlier = convert.timestamp(2000.0), convert.timestamp(1000.0)
    with audit_only.channel("audit", cert="operator") as channel:
        stub = pb_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ListAuditEvents(
                pb.ListAuditEventsRequest(start_time=later, end_time=earlier), timeout=10
            )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start_time must be before end_time" in details(error.value)


def login_loop(
    stack: Stack, users: dict[str, UserKeys], stop: threading.Event, logged: list[str]
) -> None:
    """Logs users in one after another until stopped, recording each acknowledged one."""
    client = user_client(stack)
    names = sorted(users)
    n = 0
    while not stop.is_set():
        user_id = names[n % len(names)]
        client.login(user_id, users[user_id])
        logged.append(user_id)
        n += 1
    client.close()


def assert_arrived_once_in_order(stack: Stack, registered: list[str], logged: list[str]) -> None:
    wait_for_total(stack, len(registered) + len(logged), timeout=60)
    time.sleep(0.5)  # give a duplicate, were one to be sent, time to show up
    stored = list(reversed(operator_list(stack)))  # oldest first
    assert len(stored) == len(registered) + len(logged)
    assert len({e.event_id for e in stored}) == len(stored)
    by_source = defaultdict(list)
    for event in stored:
        by_source[event.source].append(event.user_id)
    assert by_source["identity"] == registered
    assert by_source["session"] == logged


def test_events_made_while_audit_restarts_again_and_again_arrive_once_and_in_order(
    stack_without_audit: Stack,
) -> None:
    stack = stack_without_audit
    audit = stack["audit"]
    audit.start()
    client = user_client(stack)
    users = {f"user{i}": new_user(client, f"user{i}") for i in range(5)}
    stop, logged = threading.Event(), list[str]()
    producer = threading.Thread(target=login_loop, args=(stack, users, stop, logged))
    producer.start()
    try:
        for restart in (audit.restart, audit.kill, audit.restart, audit.kill):
            time.sleep(0.4)
            restart()
            if audit.process is None:  # killed: down for a while, then back
                time.sleep(0.4)
                audit.start()
    finally:
        stop.set()
        producer.join()
    assert len(logged) > 20
    assert_arrived_once_in_order(stack, sorted(users), logged)


def test_a_producer_killed_before_it_saw_the_acknowledgement_duplicates_nothing(
    stack_without_audit: Stack,
) -> None:
    stack = stack_without_audit
    stack["audit"].start()
    client = user_client(stack)
    users = {f"user{i}": new_user(client, f"user{i}") for i in range(3)}
    logged: list[str] = []
    for n in range(10):
        client.login(f"user{n % 3}", users[f"user{n % 3}"])
        logged.append(f"user{n % 3}")
    wait_for_total(stack, 13)

    audit_pid, session_pid = stack["audit"].pid, stack["session"].pid
    os.kill(audit_pid, signal.SIGSTOP)
    try:
        for n in range(30):
            client.login(f"user{n % 3}", users[f"user{n % 3}"])
            logged.append(f"user{n % 3}")
        time.sleep(1.0)  # the session's shipper has sent a batch and waits for the answer
        os.kill(session_pid, signal.SIGSTOP)  # it will never read the answer
    finally:
        os.kill(audit_pid, signal.SIGCONT)
    # Audit stores the batch and acknowledges it to a producer that is no longer running;
    # then the producer dies, its outbox still holding those events.
    deadline = time.monotonic() + 30
    while audit_total(stack) == 13:
        assert time.monotonic() < deadline, "the batch in flight never arrived"
        time.sleep(0.1)
    stack["session"].kill()
    with stack.raw_database("session") as conn:
        waiting = {row[0] for row in conn.execute("SELECT event_id FROM audit_outbox").fetchall()}
    assert waiting & {e.event_id for e in operator_list(stack)}, "no acknowledgement was lost"
    stack["session"].start()
    assert_arrived_once_in_order(stack, sorted(users), logged)
    assert session_backlog(stack) == 0
