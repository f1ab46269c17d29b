"""The identity service, driven as a client would, against real processes."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from securemsg.identity.v1 import identity_admin_service_pb2 as admin_pb
from securemsg.identity.v1 import identity_admin_service_pb2_grpc as admin_grpc
from securemsg.identity.v1 import identity_internal_service_pb2 as internal_pb
from securemsg.identity.v1 import identity_internal_service_pb2_grpc as internal_grpc
from securemsg.identity.v1 import identity_service_pb2 as pb
from securemsg.identity.v1 import keys_pb2

from services.client.keys import UserKeys
from services.client.sdk import UserClient
from services.identity.keys import fingerprint
from tests.support.files import snapshot
from tests.support.stack import Stack
from tests.support.users import bearer, details, new_user, registration, user_client


def test_register_login_fetch_bundle_and_refill_prekeys(client: UserClient) -> None:
    alice = new_user(client, "alice", one_time=3, alias="Alice Liddell")
    bob = new_user(client, "bob", one_time=0)
    bob_token = client.login("bob", bob)

    profile = client.profile(client.login("alice", alice))
    assert profile.user_id == "alice"
    assert profile.alias == "Alice Liddell"
    assert dict(profile.metadata) == {"device": "test-phone"}
    assert profile.one_time_prekey_count == 3
    assert profile.fingerprint == fingerprint(alice.identity_public, alice.verify_key)
    assert profile.HasField("last_login_time")

    bundle = client.identity.GetKeyBundle(
        pb.GetKeyBundleRequest(user_id="alice"), metadata=bearer(bob_token), timeout=10
    ).bundle
    assert bundle.identity_key == alice.identity_public
    assert bundle.verify_key == alice.verify_key
    assert bundle.signed_prekey == alice.signed_prekey_proto().__class__(
        key_id=1,
        public_key=bundle.signed_prekey.public_key,
        signature=bundle.signed_prekey.signature,
    )
    assert bundle.one_time_prekey.key_id == 1
    assert bundle.one_time_prekey.public_key == alice.one_time_protos([1])[0].public_key
    assert len(bundle.fingerprint.split(":")) == 16

    alice_token = client.login("alice", alice)
    count = client.identity.GetPrekeyCount(
        pb.GetPrekeyCountRequest(), metadata=bearer(alice_token), timeout=10
    )
    assert count.one_time_prekey_count == 2
    new_ids = alice.add_one_time(5)
    refilled = client.identity.UploadOneTimePrekeys(
        pb.UploadOneTimePrekeysRequest(one_time_prekeys=alice.one_time_protos(new_ids)),
        metadata=bearer(alice_token),
        timeout=10,
    )
    assert refilled.one_time_prekey_count == 7


def test_bundle_without_one_time_prekeys_still_serves_the_signed_keys(client: UserClient) -> None:
    new_user(client, "carol", one_time=0)
    token = client.login("dave", new_user(client, "dave"))
    bundle = client.identity.GetKeyBundle(
        pb.GetKeyBundleRequest(user_id="carol"), metadata=bearer(token), timeout=10
    ).bundle
    assert not bundle.HasField("one_time_prekey")
    assert len(bundle.signed_prekey.public_key) == 32


def test_twenty_concurrent_fetches_never_share_a_one_time_prekey(client: UserClient) -> None:
    new_user(client, "popular", one_time=15)
    token = client.login("fan", new_user(client, "fan"))

    def fetch(_: int) -> int | None:
        bundle = client.identity.GetKeyBundle(
            pb.GetKeyBundleRequest(user_id="popular"), metadata=bearer(token), timeout=20
        ).bundle
        return bundle.one_time_prekey.key_id if bundle.HasField("one_time_prekey") else None

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(fetch, range(20)))
    handed_out = [r for r in results if r is not None]
    assert sorted(handed_out) == list(range(1, 16))  # each key exactly once
    assert results.count(None) == 5  # the pool ran dry; those got bundles without one


def test_data_survives_a_restart(stack: Stack, client: UserClient) -> None:
    keys = new_user(client, "persistent", alias="Still Here")
    stack["identity"].restart()
    stack["session"].restart()
    assert client.profile(client.login("persistent", keys)).alias == "Still Here"


@pytest.mark.sqlite_only
def test_wrong_key_refuses_to_start_and_leaves_the_file_unchanged(stack: Stack) -> None:
    client = user_client(stack)
    keys = new_user(client, "someone")
    identity = stack["identity"]
    identity.kill()  # the last writes still in the -wal, its index in the -shm
    before = snapshot(stack.layout.data)
    assert {"identity.db-wal", "identity.db-shm"} <= set(before)

    wrong = type(identity)(
        "identity",
        {**identity.env, "DB_ENCRYPTION_KEY_FILE": "", "DB_ENCRYPTION_KEY": "x" * 40},
        identity.log_path,
        identity.ca_file,
    )
    code, output = wrong.run_to_exit()

    assert code == 2
    assert "DB_ENCRYPTION_KEY does not unlock identity.db" in output
    assert snapshot(stack.layout.data) == before  # database, -wal, -shm, lock: untouched
    identity.start()  # and the right key still finds everything
    assert client.profile(client.login("someone", keys)).user_id == "someone"


@pytest.mark.sqlite_only
def test_the_database_file_holds_no_user_id_alias_or_metadata(stack: Stack) -> None:
    client = user_client(stack)
    new_user(
        client, "zebra-unique-id", alias="Zebedee Plaintext", metadata={"city": "Atlantis-Secret"}
    )
    stack["identity"].stop()  # checkpoint the WAL so everything is in the main file
    raw = b"".join(p.read_bytes() for p in stack.layout.data.glob("identity.db*") if p.is_file())
    for secret in (b"zebra-unique-id", b"Zebedee Plaintext", b"Atlantis-Secret", b"city"):
        assert secret not in raw
        assert secret.decode().encode("utf-16-le") not in raw


def test_a_ciphertext_moved_to_another_row_is_an_integrity_error(stack: Stack) -> None:
    client = user_client(stack)
    new_user(client, "victim", alias="Victim Alias")
    mallory = new_user(client, "mallory", alias="Mallory Alias")
    stack["identity"].stop()
    with stack.raw_database("identity") as conn:
        conn.execute(
            "UPDATE users SET alias_ct = (SELECT alias_ct FROM users WHERE id = 1) WHERE id = 2"
        )
    stack["identity"].start()

    with pytest.raises(grpc.RpcError):  # the row fails its MAC, even for a login
        client.login("mallory", mallory)
    with (
        stack.channel("identity", cert="session") as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        internal_grpc.IdentityInternalServiceStub(channel).GetVerifyKey(
            internal_pb.GetVerifyKeyRequest(user_id="mallory"), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
    assert "integrity" in details(error.value)
    assert "Victim" not in details(error.value)


def _edit_identity_db(stack: Stack, *statements: tuple[str, tuple[object, ...]]) -> None:
    """What someone with write access to identity's database but no master key can do."""
    stack["identity"].stop()
    with stack.raw_database("identity") as db:
        for sql, params in statements:
            db.execute(sql, params)
    stack["identity"].start()


def test_a_verify_key_copied_into_a_victims_row_does_not_log_the_copier_in(
    stack: Stack, client: UserClient
) -> None:
    # The review's attack: the victim's row is found by their public identity key (anyone
    # can fetch it), and the attacker's verify key is copied in.
    victim = new_user(client, "victim")
    attacker = new_user(client, "attacker")
    _edit_identity_db(
        stack,
        (
            "UPDATE users SET verify_key = (SELECT verify_key FROM users WHERE identity_key = ?)"
            " WHERE identity_key = ?",
            (attacker.identity_public, victim.identity_public),
        ),
    )
    with pytest.raises(grpc.RpcError) as refused:
        client.login("victim", attacker)  # signed with the attacker's own key
    assert refused.value.code() != grpc.StatusCode.OK
    with (
        stack.channel("identity", cert="session") as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        internal_grpc.IdentityInternalServiceStub(channel).GetVerifyKey(
            internal_pb.GetVerifyKeyRequest(user_id="victim"), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.DATA_LOSS
    assert client.login("attacker", attacker)  # the untouched row still works


@pytest.mark.parametrize(
    ("edit", "call"),
    [
        (
            [("UPDATE users SET deactivate_time = NULL WHERE deactivate_time IS NOT NULL", ())],
            "status",
        ),
        ([("UPDATE users SET identity_key = ?", (bytes(32),))], "bundle"),
        ([("UPDATE users SET signed_prekey = ?", (bytes(32),))], "bundle"),
        ([("UPDATE users SET pq_prekey_sig = ?", (bytes(64),))], "bundle"),
        ([("UPDATE users SET row_mac = NULL", ())], "bundle"),
        ([("UPDATE one_time_prekeys SET public_key = ?", (bytes(32),))], "bundle"),
        (  # another account's prekeys, moved to the target
            [
                ("DELETE FROM one_time_prekeys WHERE user_row = 1", ()),
                ("UPDATE one_time_prekeys SET user_row = 1 WHERE user_row = 3", ()),
            ],
            "bundle",
        ),
    ],
)
def test_any_edit_of_a_key_status_or_prekey_in_the_file_is_an_integrity_error(
    stack: Stack, client: UserClient, edit: list[tuple[str, tuple[object, ...]]], call: str
) -> None:
    target = new_user(client, "target", one_time=3)  # row 1
    leaving = new_user(client, "leaving", one_time=3)  # row 2
    new_user(client, "other", one_time=3)  # row 3
    client.deactivate(client.login("leaving", leaving))
    caller = client.login("target", target)
    _edit_identity_db(stack, *edit)
    with stack.channel("identity", cert="relay") as channel:
        internal = internal_grpc.IdentityInternalServiceStub(channel)
        requests: dict[str, Callable[[], object]] = {
            "status": lambda: internal.GetUserStatus(
                internal_pb.GetUserStatusRequest(user_id="leaving"), timeout=10
            ),
            "bundle": lambda: client.identity.GetKeyBundle(
                pb.GetKeyBundleRequest(user_id="target"), metadata=bearer(caller), timeout=10
            ),
        }
        with pytest.raises(grpc.RpcError) as error:
            requests[call]()
    assert error.value.code() == grpc.StatusCode.DATA_LOSS


def test_no_plaintext_column_holds_a_time_that_audit_events_carry(
    stack: Stack, client: UserClient
) -> None:
    keys = new_user(client, "timed")
    client.deactivate(client.login("timed", keys))
    stack["identity"].stop()
    with stack.raw_database("identity") as db:
        rows = db.execute(
            "SELECT create_time, last_login_time, deactivate_time FROM users"
        ).fetchall()
    assert rows == [(0.0, None, 0.0)]  # the real times are sealed in times_ct


def test_a_forged_signed_prekey_signature_is_invalid_argument(client: UserClient) -> None:
    keys = UserKeys.generate(0)
    forged = keys.signed_prekey_proto()
    forged.signature = bytes(64)
    with pytest.raises(grpc.RpcError) as error:
        client.identity.RegisterUser(registration("forger", keys, signed_prekey=forged), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "signed_prekey.signature does not verify" in details(error.value)


def _other_signature(keys: UserKeys) -> keys_pb2.SignedPrekey:
    other = UserKeys.generate(0)
    forged = keys.signed_prekey_proto()
    forged.signature = other.signed_prekey_proto().signature
    return forged


# Every malformed field has its unit test (tests/unit/test_registration_validation.py);
# these two prove that the validation's errors reach a client as INVALID_ARGUMENT.
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"user_id": "bad user"}, "user_id must be 3 to 32 characters"),
        ({"pq_prekey": None}, "pq_prekey is required"),
    ],
)
def test_malformed_registration_fields_are_invalid_argument(
    client: UserClient, overrides: dict[str, object], message: str
) -> None:
    request = registration("newcomer", UserKeys.generate(1), **overrides)
    with pytest.raises(grpc.RpcError) as error:
        client.identity.RegisterUser(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in details(error.value)


def test_a_signature_by_another_key_is_rejected(client: UserClient) -> None:
    keys = UserKeys.generate(0)
    with pytest.raises(grpc.RpcError) as error:
        client.identity.RegisterUser(
            registration("someone", keys, signed_prekey=_other_signature(keys)), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_taken_user_id_is_already_exists(client: UserClient) -> None:
    new_user(client, "taken")
    with pytest.raises(grpc.RpcError) as error:
        new_user(client, "taken")
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_calls_without_a_token_are_unauthenticated(client: UserClient) -> None:
    with pytest.raises(grpc.RpcError) as error:
        client.identity.GetOwnProfile(pb.GetOwnProfileRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in details(error.value)
    with pytest.raises(grpc.RpcError) as error:
        client.profile("not-a-real-token")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("cert", [None, "audit", "operator"])
def test_internal_api_refuses_callers_without_an_allowed_certificate(
    stack: Stack, cert: str | None
) -> None:
    new_user(user_client(stack), "target")
    with stack.channel("identity", cert=cert) as channel:
        stub = internal_grpc.IdentityInternalServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.GetVerifyKey(internal_pb.GetVerifyKeyRequest(user_id="target"), timeout=10)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_unknown_users_verify_key_lookup_looks_like_a_known_ones(stack: Stack) -> None:
    # Same status and same log lines: nothing for a login's timing to tell apart.
    keys = new_user(user_client(stack), "known")
    identity = stack["identity"]
    with stack.channel("identity", cert="session") as channel:
        stub = internal_grpc.IdentityInternalServiceStub(channel)
        before = identity.log().count("GetVerifyKey")
        assert (
            stub.GetVerifyKey(
                internal_pb.GetVerifyKeyRequest(user_id="known"), timeout=10
            ).verify_key
            == keys.verify_key
        )
        after_known = identity.log().count("GetVerifyKey")
        reply = stub.GetVerifyKey(internal_pb.GetVerifyKeyRequest(user_id="nobody"), timeout=10)
        after_unknown = identity.log().count("GetVerifyKey")
    assert reply.verify_key == b""
    assert after_known - before == after_unknown - after_known


def test_internal_api_serves_an_allowed_service(stack: Stack) -> None:
    keys = new_user(user_client(stack), "target")
    with stack.channel("identity", cert="session") as channel:
        stub = internal_grpc.IdentityInternalServiceStub(channel)
        reply = stub.GetVerifyKey(internal_pb.GetVerifyKeyRequest(user_id="target"), timeout=10)
    assert reply.verify_key == keys.verify_key


def test_operator_stats_and_deactivation(stack: Stack, client: UserClient) -> None:
    keys = new_user(client, "leaving", one_time=4)
    new_user(client, "staying", one_time=0)
    token = client.login("leaving", keys)
    with stack.channel("identity", cert="operator") as channel:
        admin = admin_grpc.IdentityAdminServiceStub(channel)
        admin.DeactivateUser(admin_pb.DeactivateUserRequest(user_id="leaving"), timeout=10)
        stats = admin.GetIdentityStats(admin_pb.GetIdentityStatsRequest(), timeout=10)
    assert (stats.registered_users, stats.active_users, stats.deactivated_users) == (2, 1, 1)
    assert stats.one_time_prekeys == 0
    assert stats.users_without_one_time_prekeys == 1
    with pytest.raises(grpc.RpcError) as error:
        client.profile(token)  # deactivation revoked the session
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sigterm_stops_gracefully(stack: Stack) -> None:
    identity = stack["identity"]
    assert identity.stop() == 0
    assert '"message": "stopped"' in identity.log()


def test_rotating_the_signed_prekey_checks_the_signature_and_serves_the_new_key(
    client: UserClient,
) -> None:
    keys = new_user(client, "rotator")
    token = client.login("rotator", keys)
    keys.signed_prekey_id = 7
    fresh = keys.signed_prekey_proto()
    forged = keys_pb2.SignedPrekey()
    forged.CopyFrom(fresh)
    forged.signature = bytes(64)
    with pytest.raises(grpc.RpcError) as error:
        client.identity.RotateSignedPrekey(
            pb.RotateSignedPrekeyRequest(signed_prekey=forged), metadata=bearer(token), timeout=10
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rotated = client.identity.RotateSignedPrekey(
        pb.RotateSignedPrekeyRequest(signed_prekey=fresh), metadata=bearer(token), timeout=10
    ).bundle
    assert rotated.signed_prekey.key_id == 7
    seen = client.identity.GetKeyBundle(
        pb.GetKeyBundleRequest(user_id="rotator"), metadata=bearer(token), timeout=10
    ).bundle
    assert seen.signed_prekey.public_key == fresh.public_key
    assert seen.pq_prekey.key_id == 1  # kept


def test_reusing_a_one_time_prekey_id_is_already_exists_and_changes_nothing(
    client: UserClient,
) -> None:
    keys = new_user(client, "reuser", one_time=2)
    token = client.login("reuser", keys)
    with pytest.raises(grpc.RpcError) as error:
        client.identity.UploadOneTimePrekeys(
            pb.UploadOneTimePrekeysRequest(one_time_prekeys=keys.one_time_protos([2])),
            metadata=bearer(token),
            timeout=10,
        )
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "fresh key ids" in details(error.value)
    count = client.identity.GetPrekeyCount(
        pb.GetPrekeyCountRequest(), metadata=bearer(token), timeout=10
    )
    assert count.one_time_prekey_count == 2


def test_a_bundle_read_from_memory_never_shows_a_rotated_key_or_a_deactivated_account(
    tmp_path: Path,
) -> None:
    """Identity keeps the accounts of key bundles in memory (services/identity/cache.py).
    With the per-target allowance of one-time prekeys spent, no prekey take re-reads the
    account, so only the cache's invalidation stands between a fetch and stale keys."""
    stack = Stack(tmp_path, extra_env={"identity": {"ONE_TIME_PREKEYS_PER_TARGET_PER_HOUR": "1"}})
    stack.start()
    try:
        with user_client(stack) as client:
            bob = new_user(client, "cached-bob", one_time=3)
            bob_token = client.login("cached-bob", bob)
            alice = client.login("cached-alice", new_user(client, "cached-alice"))
            assert client.bundle(alice, "cached-bob").HasField("one_time_prekey")
            assert not client.bundle(alice, "cached-bob").HasField("one_time_prekey")

            bob.signed_prekey_id = 2
            client.identity.RotateSignedPrekey(
                pb.RotateSignedPrekeyRequest(signed_prekey=bob.signed_prekey_proto()),
                metadata=bearer(bob_token),
                timeout=10,
            )
            assert client.bundle(alice, "cached-bob").signed_prekey.key_id == 2

            client.deactivate(bob_token)
            with pytest.raises(grpc.RpcError) as gone:
                client.bundle(alice, "cached-bob")
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stack.stop()
