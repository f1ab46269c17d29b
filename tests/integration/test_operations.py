"""Operator work against real processes: backups under load, restore, refusing doubles."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from securemsg.identity.v1 import identity_internal_service_pb2 as internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as identity_internal_grpc

from services.client.backups import download_backup
from services.client.keys import UserKeys
from services.client.sdk import UserClient
from services.common.errors import StartupError
from services.launcher.restore import restore_backup
from tests.support.files import snapshot
from tests.support.stack import ServiceProcess, Stack
from tests.support.users import new_user, user_client


@pytest.mark.sqlite_only
def test_a_backup_taken_under_write_load_restores_and_reads_back(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "live")
    stack.start()
    stop = threading.Event()
    written: list[tuple[str, UserKeys]] = []  # in the order they were acknowledged
    errors: list[BaseException] = []

    def keep_registering() -> None:
        client = user_client(stack)
        n = 0
        while not stop.is_set():
            try:
                user_id = f"load{n}"
                keys = new_user(client, user_id, one_time=1, alias=f"Alias {n}")
                written.append((user_id, keys))
            except BaseException as exc:  # recorded and asserted below
                errors.append(exc)
            n += 1
        client.close()

    try:
        writer = threading.Thread(target=keep_registering)
        writer.start()
        while len(written) < 20 and writer.is_alive():  # the load is on before the backup
            time.sleep(0.05)
        acknowledged_before = len(written)
        progress: list[tuple[int, int]] = []
        with stack.channel("identity", cert="operator") as channel:
            backup = download_backup(
                channel, tmp_path / "backups", lambda d, t: progress.append((d, t))
            )
        acknowledged_after = len(written)
        stop.set()
        writer.join()
        assert errors == []
        assert acknowledged_after > acknowledged_before, "no write went on during the backup"
        assert progress
        assert backup.name.startswith("identity-")
    finally:
        stop.set()
        stack.stop()

    key = stack.layout.key_file("identity").read_text()
    restored_dir = tmp_path / "restored"
    restored_file = restore_backup(backup, restored_dir, "identity", key)
    # Both copies are the owner's only, like the database itself.
    assert [f.stat().st_mode & 0o777 for f in (backup, restored_file)] == [0o600, 0o600]

    # A fresh identity process on the restored file, with the same key, serves the data.
    live = stack["identity"]
    restored = ServiceProcess(
        "identity",
        {**live.env, "DB_PATH": str(restored_dir / "identity.db")},
        tmp_path / "restored.log",
        live.ca_file,
    )
    stack.services["identity"] = restored
    stack.start()
    try:
        with stack.channel("identity", cert="session") as channel:
            status = identity_internal_grpc.IdentityInternalServiceStub(channel).GetUserStatus
            present = [
                status(internal_pb.GetUserStatusRequest(user_id=user_id), timeout=10).exists
                for user_id, _ in written
            ]
        # A consistent snapshot: every write acknowledged before the backup began, then a
        # gapless run of the ones made while it was taken, then none.
        count = present.count(True)
        assert present == [True] * count + [False] * (len(present) - count)
        assert acknowledged_before <= count <= acknowledged_after
        client = user_client(stack)
        for n, (user_id, keys) in enumerate(written[:count]):  # each row, read back whole
            profile = client.profile(client.login(user_id, keys))
            assert (profile.user_id, profile.alias) == (user_id, f"Alias {n}")
            assert profile.metadata == {"device": "test-phone"}
        client.close()
    finally:
        stack.stop()


@pytest.mark.sqlite_only
def test_restore_refuses_a_backup_the_key_does_not_unlock(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "live", ("identity",))
    stack.start()
    try:
        with stack.channel("identity", cert="operator") as channel:
            backup = download_backup(channel, tmp_path / "backups")
    finally:
        stack.stop()
    with pytest.raises(StartupError, match="does not unlock"):
        restore_backup(backup, tmp_path / "restored", "identity", "some other key entirely")
    assert not (tmp_path / "restored" / "identity.db").exists()


def test_backups_need_the_operator_certificate(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity",))
    stack.start()
    try:
        with (
            stack.channel("identity", cert="session") as channel,
            pytest.raises(grpc.RpcError) as error,
        ):
            download_backup(channel, tmp_path / "backups")
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stack.stop()


@pytest.mark.sqlite_only
def test_a_second_instance_on_the_same_database_refuses_to_start(tmp_path: Path) -> None:
    stack = Stack(tmp_path, ("identity", "session"))
    stack.start()
    try:
        first = stack["identity"]
        client = user_client(stack)
        keys = new_user(client, "before-the-second")
        second = ServiceProcess(
            "identity",
            {
                **first.env,
                "LISTEN_ADDRESS": "127.0.0.1:0",
                "INTERNAL_LISTEN_ADDRESS": "127.0.0.1:0",
                "METRICS_ADDRESS": "127.0.0.1:0",
            },
            tmp_path / "second.log",
            first.ca_file,
        )
        # The first instance and its neighbour hold still, so that any change to the
        # files (database, -wal, -shm, lock) would be the second one's doing.
        paused = [stack[name].pid for name in ("identity", "session")]
        for pid in paused:
            os.kill(pid, signal.SIGSTOP)
        try:
            before = snapshot(stack.layout.data)
            assert "identity.db-wal" in before
            code, output = second.run_to_exit()
            after = snapshot(stack.layout.data)
        finally:
            for pid in paused:
                os.kill(pid, signal.SIGCONT)
        assert code == 2
        assert "in use by another process" in output
        assert after == before
        # The first instance serves on.
        assert first.process is not None
        assert first.process.poll() is None
        token = client.login("before-the-second", keys)
        assert client.profile(token).alias == "Alias of before-the-second"
        later = new_user(client, "after-the-second")
        assert client.profile(client.login("after-the-second", later)).user_id == "after-the-second"
    finally:
        stack.stop()


@pytest.mark.sqlite_only
def test_data_and_log_directories_and_database_files_are_for_the_owner_only(
    stack: Stack, client: UserClient
) -> None:
    new_user(client, "private-files")
    layout = stack.layout
    for directory in (layout.data, layout.logs, layout.run):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    files = [*layout.data.iterdir(), *layout.logs.iterdir()]
    assert {p.name for p in files} >= {"identity.db", "identity.db-wal", "session.db-shm"}
    for path in files:
        assert path.stat().st_mode & 0o077 == 0, f"{path.name} is {oct(path.stat().st_mode)}"
