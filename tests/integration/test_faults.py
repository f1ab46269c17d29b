"""Faults: crashes mid-write, a full disk, damaged files, a hanging audit service."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from securemsg.identity.v1 import identity_internal_service_pb2 as identity_internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as identity_internal_grpc

from tests.support.audit import append, audit_total, events, operator_list
from tests.support.files import snapshot
from tests.support.postgres import POSTGRES_SERVICES
from tests.support.stack import Stack
from tests.support.users import details, new_user, user_client, validate


def hammer(work: Callable[[int, int], object], seconds: float, threads: int = 6) -> list[object]:
    """Runs `work(worker, n)` in threads for a while; returns what was acknowledged."""
    acknowledged: list[object] = []
    stop = time.monotonic() + seconds

    def loop(worker: int) -> None:
        n = 0
        while time.monotonic() < stop:
            with contextlib.suppress(grpc.RpcError):  # unacknowledged: may or may not exist
                acknowledged.append(work(worker, n))
            n += 1

    pool = [threading.Thread(target=loop, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return acknowledged


def kill_during(
    stack: Stack, name: str, work: Callable[[int, int], object], seconds: float = 1.5
) -> list[object]:
    killer = threading.Timer(seconds * 0.6, lambda: os.kill(stack[name].pid, signal.SIGKILL))
    killer.start()
    acknowledged = hammer(work, seconds)
    killer.join()
    stack[name].process = None  # it is gone; start() makes a new one
    return acknowledged


def integrity_of(stack: Stack, name: str) -> str:
    """SQLite's integrity check of the killed service's file. On PostgreSQL only a client
    of the database was killed, not the server: there is no file of ours to check."""
    if stack.backend == "postgres" and name in POSTGRES_SERVICES:
        return "ok"
    return integrity(stack.db_path(name))


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def test_kill_9_during_registrations_loses_no_acknowledged_user(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity", "session"))
    stack.start()
    try:
        clients = [user_client(stack) for _ in range(6)]

        def register(worker: int, n: int) -> str:
            user_id = f"w{worker}-{n}"
            new_user(clients[worker], user_id, one_time=1)
            return user_id

        acknowledged = kill_during(stack, "identity", register)
        assert acknowledged
        stack["identity"].start()
        with stack.channel("identity", cert="session") as channel:
            stub = identity_internal_grpc.IdentityInternalServiceStub(channel)
            for user_id in acknowledged:
                status = stub.GetUserStatus(
                    identity_internal_pb.GetUserStatusRequest(user_id=str(user_id)), timeout=10
                )
                assert status.active, user_id
    finally:
        stack.stop()
    assert integrity_of(stack, "identity") == "ok"


def test_kill_9_during_logins_loses_no_acknowledged_session(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity", "session"), extra_env={
        "session": {"LOGIN_CHALLENGES_PER_MINUTE": "100000"},
    })  # fmt: skip
    stack.start()
    try:
        setup = user_client(stack)
        keys = {w: new_user(setup, f"user{w}") for w in range(6)}
        clients = [user_client(stack) for _ in range(6)]

        def login(worker: int, n: int) -> str:
            return clients[worker].login(f"user{worker}", keys[worker])

        tokens = kill_during(stack, "session", login)
        assert tokens
        stack["session"].start()
        for token in tokens:
            assert validate(stack, str(token)).user_id.startswith("user")
    finally:
        stack.stop()
    assert integrity_of(stack, "session") == "ok"


def test_kill_9_during_appends_loses_no_acknowledged_event(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("audit",))
    stack.start()
    try:

        def add(worker: int, n: int) -> list[str]:
            batch = events(5)
            append(stack, batch)
            return [e.event_id for e in batch]

        acknowledged = kill_during(stack, "audit", add)
        assert acknowledged
        stack["audit"].start()
        stored = {e.event_id for e in operator_list(stack)}
        for batch_ids in acknowledged:
            assert isinstance(batch_ids, list)
            assert set(batch_ids) <= stored
    finally:
        stack.stop()
    assert integrity_of(stack, "audit") == "ok"


@pytest.mark.sqlite_only
def test_a_full_disk_refuses_writes_cleanly_and_recovers_when_space_returns(
    tmp_path: Path,
) -> None:
    limit = {"identity": {"DB_MAX_BYTES": str(256 * 1024)}}
    stack = Stack(tmp_path, ("identity", "session"), extra_env=limit)
    stack.start()
    try:
        client = user_client(stack)
        registered, refusal = 0, None
        for n in range(500):
            try:
                new_user(client, f"filler{n}", one_time=20)
                registered += 1
            except grpc.RpcError as exc:
                refusal = exc
                failed = f"filler{n}"
                break
        assert refusal is not None
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "storage is full" in details(refusal)
        with stack.channel("identity", cert="session") as channel:
            stub = identity_internal_grpc.IdentityInternalServiceStub(channel)
            status = stub.GetUserStatus(
                identity_internal_pb.GetUserStatusRequest(user_id=failed), timeout=10
            )
            assert not status.exists  # no partial row
        # Space returns: the operator raises the limit and restarts.
        identity = stack["identity"]
        identity.stop()
        identity.env["DB_MAX_BYTES"] = str(64 * 1024 * 1024)
        identity.start()
        new_user(client, failed, one_time=20)
        keys = new_user(client, "after-recovery")
        assert client.profile(client.login("after-recovery", keys)).user_id == "after-recovery"
        assert registered > 5
    finally:
        stack.stop()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.sqlite_only
def test_a_damaged_database_refuses_to_start_and_stays_as_it_was(
    tmp_path: Path, damage: str
) -> None:
    stack = Stack(tmp_path, ("identity", "session"))
    stack.start()
    client = user_client(stack)
    for n in range(60):
        new_user(client, f"user{n}", one_time=20)
    stack.stop()
    db = stack.db_path("identity")
    raw = bytearray(db.read_bytes())
    if damage == "garbage":
        middle = len(raw) // 2
        raw[middle : middle + 4096] = os.urandom(4096)
    else:
        raw = raw[: len(raw) // 2]
    db.write_bytes(bytes(raw))
    before = snapshot(stack.layout.data)
    code, output = stack["identity"].run_to_exit()
    assert code == 2
    assert "identity.db is damaged" in output or "not a readable SQLite database" in output
    assert "restore it from a backup" in output
    assert snapshot(stack.layout.data) == before  # no -wal, -shm or journal made either


def test_a_hanging_audit_service_does_not_stall_logins(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity", "session", "audit"))
    stack.start()
    try:
        client = user_client(stack)
        keys = new_user(client, "alice")
        client.login("alice", keys)  # connections are up before audit hangs
        audit_pid = stack["audit"].pid
        os.kill(audit_pid, signal.SIGSTOP)  # alive, accepting connections, answering nothing
        took: list[float] = []
        try:
            time.sleep(0.5)  # the shippers are now stuck in calls to it
            for _ in range(15):
                started = time.monotonic()
                client.login("alice", keys)
                took.append(time.monotonic() - started)
            started = time.monotonic()
            new_user(client, "bob")
            took.append(time.monotonic() - started)
        finally:
            os.kill(audit_pid, signal.SIGCONT)
        # A login takes milliseconds; one that waits on audit for a second or more takes
        # that much longer every time. The median ignores a busy machine's odd slow call.
        typical = statistics.median(took)
        assert typical < 1.0, f"logins took {typical:.2f} s (median) while audit hung: {took}"
        deadline = time.monotonic() + 30
        while audit_total(stack) < 18 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert audit_total(stack) == 18
    finally:
        stack.stop()


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `path` (CI runs as root; anything else fails)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount a {size} tmpfs at {path} (the full-disk test needs root and "
            f"mount(8), as CI has): {mounted.stderr.strip()}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave: int) -> Path:
    """A ballast file taking all free space on `path`'s filesystem but `leave` bytes."""
    ballast = path / "ballast"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with ballast.open("wb") as handle:
        handle.write(bytes(max(0, free - leave)))
    return ballast


@pytest.mark.parametrize("service", ["identity", "audit"])
@pytest.mark.sqlite_only
def test_a_full_disk_refuses_writes_cleanly_and_recovers_without_a_restart(
    tmp_path: Path, service: str
) -> None:
    with small_filesystem(tmp_path / "disk", "8m") as disk:
        names = ("identity", "session") if service == "identity" else ("audit",)
        stack = Stack(tmp_path / "stack", names)
        stack[service].env["DB_PATH"] = str(disk / f"{service}.db")
        stack.start()
        try:
            pid = stack[service].pid
            client = user_client(stack) if service == "identity" else None
            attempted: list[str] = []

            def write() -> str:
                """Registers a user (identity) or appends 20 events (audit): its key."""
                if client is not None:
                    attempted.append(f"filler{len(attempted)}")
                    new_user(client, attempted[-1], one_time=20)
                else:
                    batch = events(20, user_id=f"filler{len(attempted) % 1000}")
                    attempted.append(batch[0].event_id)
                    append(stack, batch)
                return attempted[-1]

            def stored(key: str) -> bool:
                if client is None:
                    return key in {e.event_id for e in operator_list(stack)}
                with stack.channel("identity", cert="session") as channel:
                    stub = identity_internal_grpc.IdentityInternalServiceStub(channel)
                    return stub.GetUserStatus(
                        identity_internal_pb.GetUserStatusRequest(user_id=key), timeout=10
                    ).exists

            written = [write() for _ in range(3)]
            ballast = fill(disk, leave=128 * 1024)
            refusal = None
            for _ in range(2000):
                try:
                    written.append(write())
                except grpc.RpcError as exc:
                    refusal = exc
                    break
            assert refusal is not None, "the disk never filled"
            assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
            assert "storage is full" in details(refusal)
            assert not stored(attempted[-1])  # nothing of the refused write
            assert all(stored(key) for key in written)  # everything acknowledged is there
            if client is None:
                assert audit_total(stack) == 20 * len(written)

            ballast.unlink()  # space returns; the service is not restarted
            for _ in range(5):
                written.append(write())
            assert all(stored(key) for key in written)
            if client is not None:
                keys = new_user(client, "after-recovery")
                profile = client.profile(client.login("after-recovery", keys))
                assert profile.user_id == "after-recovery"
            else:
                assert audit_total(stack) == 20 * len(written)
            assert stack[service].pid == pid  # the same process throughout
        finally:
            stack.stop()
        assert integrity(disk / f"{service}.db") == "ok"
