"""Login and sessions against real identity and session processes."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from securemsg.identity.v1 import identity_admin_service_pb2 as identity_admin_pb
from securemsg.identity.v1 import identity_admin_service_pb2_grpc as identity_admin_grpc
from securemsg.identity.v1 import identity_service_pb2 as identity_pb
from securemsg.session.v1 import session_admin_service_pb2 as admin_pb
from securemsg.session.v1 import session_admin_service_pb2_grpc as admin_grpc
from securemsg.session.v1 import session_service_pb2 as pb

from services.client.keys import UserKeys
from services.client.sdk import UserClient
from tests.support.stack import Stack
from tests.support.users import bearer, details, new_user, user_client, validate


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value


def test_register_login_validate_logout_then_the_token_is_refused_everywhere(
    stack: Stack, client: UserClient
) -> None:
    keys = new_user(client, "alice")
    token = client.login("alice", keys)
    assert len(token) == 43

    checked = validate(stack, token)
    assert checked.user_id == "alice"
    assert client.profile(token).user_id == "alice"

    client.session.DeleteSession(pb.DeleteSessionRequest(), metadata=bearer(token), timeout=10)

    assert refused(lambda: validate(stack, token)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused(lambda: client.profile(token)).code() == grpc.StatusCode.UNAUTHENTICATED
    error = refused(
        lambda: client.session.ListSessions(
            pb.ListSessionsRequest(), metadata=bearer(token), timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def _attempt(
    client: UserClient, user_id: str, challenge_id: str, signature: bytes
) -> grpc.RpcError:
    return refused(
        lambda: client.session.CreateSession(
            pb.CreateSessionRequest(
                user_id=user_id, challenge_id=challenge_id, signature=signature
            ),
            timeout=10,
        )
    )


def test_a_replayed_challenge_is_refused(client: UserClient) -> None:
    keys = new_user(client, "alice")
    challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id="alice"))
    signature = keys.sign_login("alice", challenge.challenge)
    client.session.CreateSession(
        pb.CreateSessionRequest(
            user_id="alice", challenge_id=challenge.challenge_id, signature=signature
        )
    )
    error = _attempt(client, "alice", challenge.challenge_id, signature)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_signature_by_another_key_is_refused(client: UserClient) -> None:
    new_user(client, "alice")
    challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id="alice"))
    impostor = UserKeys.generate(0)
    error = _attempt(
        client, "alice", challenge.challenge_id, impostor.sign_login("alice", challenge.challenge)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_challenge_issued_for_another_user_is_refused(client: UserClient) -> None:
    new_user(client, "alice")
    mallory = new_user(client, "mallory")
    challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id="alice"))
    error = _attempt(
        client,
        "mallory",
        challenge.challenge_id,
        mallory.sign_login("mallory", challenge.challenge),
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_user_and_bad_signature_look_the_same(client: UserClient) -> None:
    new_user(client, "alice")
    ghost = UserKeys.generate(0)
    replies = []
    for user_id in ("alice", "nobody-here"):
        challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id=user_id))
        replies.append(
            _attempt(
                client,
                user_id,
                challenge.challenge_id,
                ghost.sign_login(user_id, challenge.challenge),
            )
        )
    assert replies[0].code() == replies[1].code() == grpc.StatusCode.UNAUTHENTICATED
    assert replies[0].details() == replies[1].details()


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(
        tmp_path,
        extra_env={
            "session": {
                "CHALLENGE_TTL_SECONDS": "1",
                "SESSION_IDLE_TIMEOUT_SECONDS": "2",
                "SESSION_MAX_LIFETIME_SECONDS": "4",
                "CLEANUP_INTERVAL_SECONDS": "0.5",
            }
        },
    )
    stack.start()
    yield stack
    stack.stop()


def test_an_expired_challenge_is_refused(short_lived: Stack) -> None:
    client = user_client(short_lived)
    keys = new_user(client, "alice")
    challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id="alice"))
    time.sleep(1.3)
    error = _attempt(
        client, "alice", challenge.challenge_id, keys.sign_login("alice", challenge.challenge)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_idle_sessions_expire_and_use_keeps_them_alive_until_the_absolute_limit(
    short_lived: Stack,
) -> None:
    client = user_client(short_lived)
    keys = new_user(client, "alice")
    idle = client.login("alice", keys)
    busy = client.login("alice", keys)

    for _ in range(6):  # 3 s of use every 0.5 s: longer than the 2 s idle timeout
        time.sleep(0.5)
        validate(short_lived, busy)
    assert refused(lambda: validate(short_lived, idle)).code() == grpc.StatusCode.UNAUTHENTICATED

    time.sleep(1.2)  # now past the 4 s absolute lifetime, though used recently
    validate_error = refused(lambda: validate(short_lived, busy))
    assert validate_error.code() == grpc.StatusCode.UNAUTHENTICATED

    time.sleep(0.6)  # the background cleanup has removed both rows
    with short_lived.channel("session", cert="operator") as channel:
        stats = admin_grpc.SessionAdminServiceStub(channel).GetSessionStats(
            admin_pb.GetSessionStatsRequest(), timeout=10
        )
    assert stats.active_sessions == 0


def test_revoke_others_leaves_exactly_the_callers_session(client: UserClient) -> None:
    keys = new_user(client, "alice")
    bob_token = client.login("bob", new_user(client, "bob"))
    tokens = [client.login("alice", keys, user_agent=f"device-{i}") for i in range(4)]
    keeper = tokens[2]

    reply = client.session.RevokeOtherSessions(
        pb.RevokeOtherSessionsRequest(), metadata=bearer(keeper), timeout=10
    )
    assert reply.revoked_count == 3
    listed = client.session.ListSessions(
        pb.ListSessionsRequest(), metadata=bearer(keeper), timeout=10
    ).sessions
    assert [(s.user_agent, s.current) for s in listed] == [("device-2", True)]
    assert listed[0].ip_address == "127.0.0.1"
    for token in tokens[:2] + tokens[3:]:
        assert refused(lambda t=token: client.profile(t)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert client.profile(bob_token).user_id == "bob"  # other users untouched


def test_list_sessions_pages_with_a_token(client: UserClient) -> None:
    keys = new_user(client, "alice")
    tokens = [client.login("alice", keys, user_agent=f"device-{i}") for i in range(3)]

    def page(size: int, token: str = "") -> pb.ListSessionsResponse:
        request = pb.ListSessionsRequest(page_size=size, page_token=token)
        return client.session.ListSessions(request, metadata=bearer(tokens[0]), timeout=10)

    first = page(2)
    second = page(2, first.next_page_token)
    assert [s.user_agent for s in [*first.sessions, *second.sessions]] == [
        "device-2", "device-1", "device-0"
    ]  # fmt: skip
    assert (bool(first.next_page_token), second.next_page_token) == (True, "")
    error = refused(lambda: page(2, "not-a-token"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (error.details() or "")
    listed = client.sessions(tokens[0], page_size=2)  # the SDK follows the pages
    assert [s.user_agent for s in listed] == ["device-2", "device-1", "device-0"]


def test_deleting_another_users_session_is_not_found(client: UserClient) -> None:
    alice = client.login("alice", new_user(client, "alice"))
    bob = client.login("bob", new_user(client, "bob"))
    bobs_id = (
        client.session.ListSessions(pb.ListSessionsRequest(), metadata=bearer(bob), timeout=10)
        .sessions[0]
        .session_id
    )
    error = refused(
        lambda: client.session.DeleteSession(
            pb.DeleteSessionRequest(session_id=bobs_id), metadata=bearer(alice), timeout=10
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert client.profile(bob).user_id == "bob"


def test_sessions_survive_a_restart_of_the_session_service(
    stack: Stack, client: UserClient
) -> None:
    token = client.login("alice", new_user(client, "alice"))
    stack["session"].restart()
    assert validate(stack, token).user_id == "alice"
    assert client.profile(token).user_id == "alice"


@pytest.mark.sqlite_only
def test_the_database_holds_no_token_ip_user_agent_or_user_id(
    stack: Stack, client: UserClient
) -> None:
    token = client.login("walrus-unique", new_user(client, "walrus-unique"), "Agent-Smith/9.9")
    stack["session"].stop()
    raw = b"".join(p.read_bytes() for p in stack.layout.data.glob("session.db*") if p.is_file())
    for secret in (token.encode(), b"127.0.0.1", b"Agent-Smith", b"walrus-unique"):
        assert secret not in raw


def test_the_eleventh_failed_login_is_rate_limited_while_others_still_log_in(
    client: UserClient,
) -> None:
    new_user(client, "victim")
    friend = new_user(client, "friend")
    attacker = UserKeys.generate(0)

    codes = []
    for _ in range(11):
        challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id="victim"))
        error = _attempt(
            client,
            "victim",
            challenge.challenge_id,
            attacker.sign_login("victim", challenge.challenge),
        )
        codes.append(error.code())
    assert codes[:10] == [grpc.StatusCode.UNAUTHENTICATED] * 10
    assert codes[10] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in details(error)
    assert client.profile(client.login("friend", friend)).user_id == "friend"


def test_bogus_attempts_naming_an_account_never_lock_its_owner_out(client: UserClient) -> None:
    # The review's lockout: no account needed, a made-up challenge id, a random signature.
    keys = new_user(client, "victim")
    for _ in range(15):
        error = _attempt(client, "victim", "made-up-challenge", bytes(64))
        assert error.code() in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert client.profile(client.login("victim", keys)).user_id == "victim"


def test_a_correct_login_is_never_refused_after_others_failed_from_the_same_address(
    client: UserClient,
) -> None:
    keys = new_user(client, "victim")
    attacker = UserKeys.generate(0)
    for _ in range(11):
        challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id="victim"))
        _attempt(
            client,
            "victim",
            challenge.challenge_id,
            attacker.sign_login("victim", challenge.challenge),
        )
    assert client.profile(client.login("victim", keys)).user_id == "victim"


@pytest.mark.parametrize(("trusted", "seen"), [("127.0.0.1", "198.51.100.7"), ("", "127.0.0.1")])
def test_a_trusted_proxy_names_the_client_address_and_no_one_else_can(
    tmp_path: Path, trusted: str, seen: str
) -> None:
    stack = Stack(tmp_path, extra_env={"session": {"TRUSTED_PROXIES": trusted}})
    stack.start()
    try:
        client = user_client(stack)
        keys = new_user(client, "proxied")
        forwarded = (("x-forwarded-for", "198.51.100.7"),)
        challenge = client.session.CreateChallenge(
            pb.CreateChallengeRequest(user_id="proxied"), metadata=forwarded, timeout=10
        )
        token = client.session.CreateSession(
            pb.CreateSessionRequest(
                user_id="proxied",
                challenge_id=challenge.challenge_id,
                signature=keys.sign_login("proxied", challenge.challenge),
            ),
            metadata=forwarded,
            timeout=10,
        ).token
        sessions = client.session.ListSessions(
            pb.ListSessionsRequest(), metadata=bearer(token), timeout=10
        ).sessions
        assert [s.ip_address for s in sessions] == [seen]
        client.close()
    finally:
        stack.stop()


def test_deactivation_revokes_every_session(client: UserClient) -> None:
    keys = new_user(client, "leaving")
    first, second = client.login("leaving", keys), client.login("leaving", keys)
    client.identity.DeactivateAccount(
        identity_pb.DeactivateAccountRequest(), metadata=bearer(first), timeout=10
    )
    for token in (first, second):
        assert refused(lambda t=token: client.profile(t)).code() == grpc.StatusCode.UNAUTHENTICATED
    challenge = client.session.CreateChallenge(pb.CreateChallengeRequest(user_id="leaving"))
    error = _attempt(
        client, "leaving", challenge.challenge_id, keys.sign_login("leaving", challenge.challenge)
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_deactivation_while_session_is_down_revokes_the_sessions_once_it_is_back(
    stack: Stack, client: UserClient
) -> None:
    # Nobody repeats the call: the revocation is written with the deactivation and
    # retried by identity until the session service has done it.
    token = client.login("leaving", new_user(client, "leaving"))
    stack["session"].stop()
    with stack.channel("identity", cert="operator") as channel:
        identity_admin_grpc.IdentityAdminServiceStub(channel).DeactivateUser(
            identity_admin_pb.DeactivateUserRequest(user_id="leaving"), timeout=10
        )
    stack["session"].start()
    deadline = time.monotonic() + 20
    while _status(lambda: validate(stack, token)) == grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the session outlived the deactivation"
        time.sleep(0.2)
    assert _status(lambda: validate(stack, token)) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"user_id": "NO"}, "user_id must be 3 to 32 characters"),
        ({"user_id": "alice", "challenge_id": ""}, "challenge_id is required"),
        ({"user_id": "alice", "challenge_id": "x", "signature": b"1"}, "signature must be 64"),
        (
            {
                "user_id": "alice",
                "challenge_id": "x",
                "signature": bytes(64),
                "user_agent": "a" * 300,
            },
            "user_agent is 300 characters",
        ),
    ],
)
def test_malformed_login_requests_are_invalid_argument(
    client: UserClient, request_fields: dict[str, object], message: str
) -> None:
    error = refused(
        lambda: client.session.CreateSession(pb.CreateSessionRequest(**request_fields), timeout=10)  # type: ignore[arg-type]
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details(error)


def test_admin_cleanup_and_revoke_all_need_an_allowed_certificate(
    stack: Stack, client: UserClient
) -> None:
    client.login("alice", new_user(client, "alice"))
    with stack.channel("session") as public:
        error = refused(
            lambda: admin_grpc.SessionAdminServiceStub(public).RevokeUserSessions(
                admin_pb.RevokeUserSessionsRequest(user_id="alice"), timeout=10
            )
        )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    with stack.channel("session", cert="operator") as channel:
        admin = admin_grpc.SessionAdminServiceStub(channel)
        revoked = admin.RevokeUserSessions(admin_pb.RevokeUserSessionsRequest(user_id="alice"))
        cleaned = admin.CleanupExpiredSessions(admin_pb.CleanupExpiredSessionsRequest())
    assert revoked.revoked_count == 1
    assert cleaned.deleted_count == 0


def test_touch_slides_the_idle_deadline(client: UserClient) -> None:
    token = client.login("alice", new_user(client, "alice"))
    before = client.session.ListSessions(
        pb.ListSessionsRequest(), metadata=bearer(token), timeout=10
    ).sessions[0]
    time.sleep(0.2)
    touched = client.session.TouchSession(
        pb.TouchSessionRequest(), metadata=bearer(token), timeout=10
    ).session
    assert touched.current
    assert touched.expire_time.ToNanoseconds() > before.expire_time.ToNanoseconds()


def test_token_cache_bound_a_revoked_token_passes_elsewhere_for_at_most_that_long(
    tmp_path: Path,
) -> None:
    stack = Stack(tmp_path, extra_env={"identity": {"TOKEN_CACHE_SECONDS": "1"}})
    stack.start()
    try:
        client = user_client(stack)
        token = client.login("alice", new_user(client, "alice"))
        client.profile(token)  # identity has now cached the answer
        client.session.DeleteSession(pb.DeleteSessionRequest(), metadata=bearer(token), timeout=10)
        revoked_at = time.monotonic()
        assert client.profile(token).user_id == "alice"  # within the documented bound
        assert time.monotonic() - revoked_at < 1.0
        time.sleep(1.1)
        assert refused(lambda: client.profile(token)).code() == grpc.StatusCode.UNAUTHENTICATED
        client.close()
    finally:
        stack.stop()


def _edit_session_db(stack: Stack, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What someone with write access to session's database but no master key can do."""
    stack["session"].stop()
    with stack.raw_database("session") as db:
        for sql, params in statements:
            db.execute(sql, params)
    stack["session"].start()


def _status(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_token_hash_and_deadline_forged_in_the_file_never_validate(
    stack: Stack, client: UserClient
) -> None:
    # The review's attack: a token of one's choosing, hashed into a victim's row, with an
    # expiry far in the future.
    token = client.login("victim", new_user(client, "victim"))
    forged = "F" * 43
    decade = time.time() + 10 * 365 * 86400
    _edit_session_db(
        stack,
        (
            "UPDATE sessions SET token_hash = ?, expire_time = ?",
            (hashlib.sha256(forged.encode()).digest(), decade),
        ),
    )
    assert _status(lambda: validate(stack, forged)) == grpc.StatusCode.DATA_LOSS
    assert _status(lambda: client.profile(forged)) == grpc.StatusCode.UNAUTHENTICATED
    assert _status(lambda: client.profile(token)) == grpc.StatusCode.UNAUTHENTICATED
    assert "integrity" in stack["session"].log()


@pytest.mark.parametrize(
    "edit",
    [
        ("UPDATE sessions SET expire_time = expire_time + 315360000", ()),  # ten years more
        ("UPDATE sessions SET row_mac = NULL", ()),
        ("UPDATE sessions SET assurance_ct = NULL", ()),  # back to the default level
        ("UPDATE sessions SET user_index = ?", (bytes(32),)),  # out of reach of revocation
    ],
)
def test_any_column_of_a_session_row_edited_in_the_file_is_an_integrity_error(
    stack: Stack, client: UserClient, edit: tuple[str, tuple[object, ...]]
) -> None:
    token = client.login("victim", new_user(client, "victim"))
    _edit_session_db(stack, edit)
    assert _status(lambda: validate(stack, token)) == grpc.StatusCode.DATA_LOSS


@pytest.mark.sqlite_only  # SQLite's own schema version (PRAGMA user_version)
def test_a_session_file_rewound_to_before_row_macs_refuses_to_start(
    stack: Stack, client: UserClient
) -> None:
    client.login("victim", new_user(client, "victim"))
    session = stack["session"]
    session.stop()
    with contextlib.closing(sqlite3.connect(stack.db_path("session"))) as db, db:
        db.execute("UPDATE sessions SET expire_time = expire_time + 315360000")
        db.execute("ALTER TABLE sessions DROP COLUMN row_mac")
        db.execute("PRAGMA user_version = 3")
    code, output = session.run_to_exit()
    assert code == 2
    assert "rewound" in output
