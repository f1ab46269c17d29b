"""What a stolen file shows, with real events through the real services.

Users register with aliases and metadata, log in with user agents (from 127.0.0.1),
fail a login, log out, revoke sessions, upload prekeys, deactivate, send through the
relay and fail its authentication: every audit event type a user causes, each carrying
real session ids and addresses. Then every file the services keep is read as an
attacker would read it: each database with its -wal and -shm (while the services run,
and again after they stopped), a backup of each, and every log. None may hold a user
id, alias, metadata value, user agent, token, session id or address in any encoding
the services use. The threat model (README) lists what a file may show; the one thing
kept in the clear that is listed here is the random session id as session.db's row key.
On PostgreSQL (TEST_BACKEND=postgres) each backup is a pg_dump of a service's database,
scanned the same way (tests/integration/test_postgres.py also scans dumps it makes).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.relay.v1 import relay_service_pb2 as relay_pb
from securemsg.session.v1 import session_service_pb2 as session_pb

from services.client.backups import download_backup
from services.client.keys import UserKeys
from tests.support.audit import operator_list
from tests.support.stack import Stack
from tests.support.users import bearer, new_user, user_client

ALL = ("identity", "session", "relay", "audit")
PERSISTENT = ("identity", "session", "audit")
USERS = {"walrus-quokka-7": "Alias Narwhal Quince", "okapi-tapir-3": "Alias Gecko Umber"}
USER_AGENT = "UA-Pangolin/8.1 (stolen-file marker)"
METADATA = {"device": "Device-Ibex-Marker"}
ADDRESS = "127.0.0.1"  # every client of the test connects from here


def forms(secret: str) -> list[bytes]:
    """The encodings a secret could be stored in: raw, UTF-16, base64, hex."""
    raw = secret.encode()
    return [raw, secret.encode("utf-16-le"), base64.b64encode(raw), raw.hex().encode()]


def leaks(files: Iterable[Path], secrets: dict[str, str]) -> list[str]:
    found = []
    for path in files:
        content = path.read_bytes()
        for label, secret in secrets.items():
            if any(form in content for form in forms(secret)):
                found.append(f"{path.name} holds the {label} {secret!r}")
    return found


def database_files(stack: Stack, service: str) -> list[Path]:
    db = stack.db_path(service)
    return [p for p in db.parent.glob(f"{db.name}*") if p.is_file()]


def test_no_file_shows_what_real_traffic_carried(tmp_path: Path) -> None:
    debug = {"LOG_LEVEL": "DEBUG"}
    stack = Stack(tmp_path, ALL, extra_env={name: debug for name in ALL})
    stack.start()
    client = user_client(stack)
    secrets: dict[str, str] = {"user agent": USER_AGENT, "metadata": METADATA["device"]}
    try:
        keys: dict[str, UserKeys] = {}
        for user_id, alias in USERS.items():
            keys[user_id] = new_user(client, user_id, alias=alias, metadata=METADATA)
            secrets[f"user id of {alias}"] = user_id
            secrets[f"alias of {user_id}"] = alias
        walrus, okapi = USERS
        tokens = [client.login(walrus, keys[walrus], user_agent=USER_AGENT) for _ in range(3)]
        okapi_token = client.login(okapi, keys[okapi], user_agent=USER_AGENT)
        session_ids = [s.session_id for s in client.sessions(tokens[0])]
        for n, token in enumerate([*tokens, okapi_token]):
            secrets[f"token {n}"] = token
        for n, session_id in enumerate(session_ids):
            secrets[f"session id {n}"] = session_id

        # A failed login, a logout, a revocation, new prekeys, a message, a bad token.
        challenge = client.session.CreateChallenge(
            session_pb.CreateChallengeRequest(user_id=okapi), timeout=10
        )
        forged = session_pb.CreateSessionRequest(
            user_id=okapi,
            challenge_id=challenge.challenge_id,
            signature=UserKeys.generate(0).sign_login(okapi, challenge.challenge),
        )
        with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):
            client.session.CreateSession(forged, timeout=10)
        client.logout(tokens[2])
        client.session.RevokeOtherSessions(
            session_pb.RevokeOtherSessionsRequest(), metadata=bearer(tokens[0]), timeout=10
        )
        client.upload_prekeys(tokens[0], keys[walrus].one_time_protos(keys[walrus].add_one_time(3)))
        client.send(okapi_token, walrus, b"opaque ciphertext")
        with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):
            client.relay.FetchMessages(
                relay_pb.FetchMessagesRequest(), metadata=bearer("x" * 43), timeout=10
            )
        client.identity.DeactivateAccount(
            identity_pb.DeactivateAccountRequest(), metadata=bearer(okapi_token), timeout=10
        )

        # The events really carry the secrets (else the scan below would prove nothing).
        wanted = {
            "user_login", "user_login_failed", "user_logout", "sessions_revoked",
            "prekeys_uploaded", "user_deactivated", "auth_failed", "user_registered",
        }  # fmt: skip
        events = []
        for _ in range(150):
            events = operator_list(stack)
            if wanted <= {e.action for e in events}:
                break
            time.sleep(0.2)
        assert wanted <= {e.action for e in events}
        details = " ".join(str(dict(e.details)) for e in events)
        assert ADDRESS in details
        assert all(session_id in details for session_id in session_ids[:3])
        assert {e.user_id for e in events} >= set(USERS)

        backups = tmp_path / "backups"
        for service in PERSISTENT:
            with stack.channel(service, cert="operator") as channel:
                download_backup(channel, backups)
        running = {s: database_files(stack, s) for s in PERSISTENT}
        if stack.backend == "sqlite":  # on PostgreSQL the backups are the databases' dumps
            assert any(p.name.endswith("-wal") for files in running.values() for p in files)
        found = scan(stack, running, backups, secrets)
    finally:
        client.close()
        stack.stop()
    found += scan(stack, {s: database_files(stack, s) for s in PERSISTENT}, backups, secrets)
    assert found == []


def scan(
    stack: Stack, databases: dict[str, list[Path]], backups: Path, secrets: dict[str, str]
) -> list[str]:
    """Leaks in each database (with its -wal and -shm), each backup and each log."""
    anywhere = {**secrets, "address": ADDRESS}
    row_keys = {k: v for k, v in anywhere.items() if not k.startswith("session id")}
    found = []
    for service, files in databases.items():
        found += leaks(files, row_keys if service == "session" else anywhere)
    for backup in backups.iterdir():
        found += leaks([backup], row_keys if backup.name.startswith("session") else anywhere)
    found += leaks(sorted(stack.layout.logs.iterdir()), anywhere)
    return found
