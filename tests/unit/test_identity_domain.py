"""Identity rules on the in-memory store, without a network."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.client.keys import UserKeys
from services.common.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.identity import keys as bundle_keys
from services.identity.domain import MAX_PREKEY_POOL, Identity, IdentityLimits
from services.identity.keys import OneTimePrekey, SignedKey
from tests.fakes.identity import MemoryIdentityStore, RecordingRevoker
from tests.unit.conftest import FakeClock, registration


@pytest.fixture
def identity(clock: FakeClock) -> Identity:
    return Identity(MemoryIdentityStore(), RecordingRevoker(), clock)


def test_registration_returns_the_profile(identity: Identity, clock: FakeClock) -> None:
    keys = UserKeys.generate(2)
    user = identity.register(registration("alice", keys, metadata={"lang": "en"}))
    assert (user.user_id, user.alias, user.metadata) == ("alice", "Alias", {"lang": "en"})
    assert user.create_time == clock.now
    assert user.one_time_prekey_count == 2
    assert user.last_login_time is None


def test_fingerprint_is_sixteen_groups_of_four_hex_digits() -> None:
    keys = UserKeys.generate(0)
    fp = bundle_keys.fingerprint(keys.identity_public, keys.verify_key)
    assert re.fullmatch(r"([0-9A-F]{4}:){15}[0-9A-F]{4}", fp)
    assert fp != bundle_keys.fingerprint(UserKeys.generate(0).identity_public, keys.verify_key)


def test_bundles_hand_out_each_one_time_prekey_once_then_none(identity: Identity) -> None:
    identity.register(registration("alice", UserKeys.generate(2)))
    handed = [identity.bundle("alice").one_time_prekey for _ in range(3)]
    assert [k.key_id if k else None for k in handed] == [1, 2, None]


def test_concurrent_bundle_fetches_never_share_a_key(identity: Identity) -> None:
    identity.register(registration("alice", UserKeys.generate(50)))
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda _: identity.bundle("alice").one_time_prekey, range(60)))
    handed = [k.key_id for k in ids if k is not None]
    assert sorted(handed) == list(range(1, 51))


def test_a_taken_id_is_already_exists(identity: Identity) -> None:
    identity.register(registration("alice", UserKeys.generate(0)))
    with pytest.raises(AlreadyExists):
        identity.register(registration("alice", UserKeys.generate(0)))


def test_a_signature_over_a_different_key_id_does_not_verify(identity: Identity) -> None:
    keys = UserKeys.generate(0)
    spk = keys.signed_prekey_proto()
    moved = SignedKey(spk.key_id + 1, spk.public_key, spk.signature)
    with pytest.raises(InvalidArgument, match=r"signed_prekey\.signature does not verify"):
        identity.register(registration("alice", keys, signed_prekey=moved))


def test_a_pq_key_that_is_not_ml_kem_is_rejected(identity: Identity) -> None:
    keys = UserKeys.generate(0)
    bogus = SignedKey(1, b"\xff" * bundle_keys.MLKEM768_KEY_BYTES, bytes(64))
    with pytest.raises(InvalidArgument, match="pq_prekey"):
        identity.register(registration("alice", keys, pq_prekey=bogus))


def test_uploads_are_all_or_nothing(identity: Identity) -> None:
    keys = UserKeys.generate(1)
    identity.register(registration("alice", keys))
    duplicate = [OneTimePrekey(5, bytes(32)), OneTimePrekey(1, bytes(32))]
    with pytest.raises(AlreadyExists):
        identity.upload_one_time_prekeys("alice", duplicate)
    assert identity.prekey_count("alice") == 1


def test_the_pool_is_capped(identity: Identity) -> None:
    identity.register(registration("alice", UserKeys.generate(0)))
    for start in range(0, MAX_PREKEY_POOL, 100):
        batch = [OneTimePrekey(i, bytes(32)) for i in range(start, start + 100)]
        identity.upload_one_time_prekeys("alice", batch)
    with pytest.raises(ResourceExhausted, match="at most 1000"):
        identity.upload_one_time_prekeys("alice", [OneTimePrekey(5000, bytes(32))])


def test_rotation_replaces_the_signed_prekey_and_keeps_the_pq_key(identity: Identity) -> None:
    keys = UserKeys.generate(0)
    identity.register(registration("alice", keys))
    old_pq = identity.bundle("alice").pq_prekey
    keys.signed_prekey_id = 2
    spk = keys.signed_prekey_proto()
    bundle = identity.rotate_signed_prekey(
        "alice", SignedKey(spk.key_id, spk.public_key, spk.signature), None
    )
    assert bundle.signed_prekey.key_id == 2
    assert identity.bundle("alice").signed_prekey.key_id == 2
    assert identity.bundle("alice").pq_prekey == old_pq


async def test_deactivated_users_are_gone_for_bundles_and_logins_but_counted(
    identity: Identity, clock: FakeClock
) -> None:
    identity.register(registration("alice", UserKeys.generate(3)))
    assert await identity.deactivate("alice") == clock.now
    clock.advance(10)
    assert await identity.deactivate("alice") == clock.now - 10  # idempotent, keeps the first
    with pytest.raises(NotFound):
        identity.bundle("alice")
    assert identity.verify_key("alice") == b""
    assert identity.status("alice") == (True, False)
    counts = identity.counts()
    assert (counts.registered, counts.active, counts.deactivated, counts.one_time_prekeys) == (
        1,
        0,
        1,
        0,
    )


def test_record_login_only_moves_forward(identity: Identity) -> None:
    identity.register(registration("alice", UserKeys.generate(0)))
    identity.record_login("alice", 500.0)
    identity.record_login("alice", 400.0)
    assert identity.profile("alice").last_login_time == 500.0
    with pytest.raises(NotFound):
        identity.record_login("nobody", 1.0)


def test_registrations_per_address_and_bundle_fetches_per_caller_are_limited(
    clock: FakeClock,
) -> None:
    store = MemoryIdentityStore()
    identity = Identity(
        store,
        RecordingRevoker(),
        clock,
        IdentityLimits(registrations_per_minute=2, bundles_per_minute=3),
    )
    identity.register(registration("user1", UserKeys.generate(5)), "10.0.0.1")
    identity.register(registration("user2", UserKeys.generate(0)), "10.0.0.1")
    with pytest.raises(ResourceExhausted, match="registrations from your address"):
        identity.register(registration("user3", UserKeys.generate(0)), "10.0.0.1")
    identity.register(registration("user3", UserKeys.generate(0)), "10.0.0.2")
    for _ in range(3):
        identity.bundle("user1", "mallory")
    with pytest.raises(ResourceExhausted, match="retry after"):
        identity.bundle("user1", "mallory")
    assert identity.bundle("user1", "alice").one_time_prekey is not None  # others unaffected


def test_one_caller_cannot_drain_one_users_one_time_prekeys(clock: FakeClock) -> None:
    identity = Identity(
        MemoryIdentityStore(),
        RecordingRevoker(),
        clock,
        IdentityLimits(bundles_per_minute=1000, prekeys_per_target_per_hour=3),
    )
    identity.register(registration("victim", UserKeys.generate(20)))
    served = [identity.bundle("victim", "mallory") for _ in range(10)]
    # Every fetch gets a bundle; only the first three take a one-time prekey.
    assert [b.one_time_prekey is not None for b in served] == [True] * 3 + [False] * 7
    assert identity.prekey_count("victim") == 17
    assert identity.bundle("victim", "alice").one_time_prekey is not None  # others unaffected
    clock.advance(3601)
    assert identity.bundle("victim", "mallory").one_time_prekey is not None


async def test_deactivation_marks_the_account_first_then_revokes_its_sessions(
    clock: FakeClock,
) -> None:
    revoker = RecordingRevoker()
    identity = Identity(MemoryIdentityStore(), revoker, clock)
    identity.register(registration("alice", UserKeys.generate(0)))
    identity.register(registration("bob", UserKeys.generate(0)))
    await identity.deactivate("alice")
    assert revoker.revoked == ["alice"]
    with pytest.raises(NotFound, match="no user with that user id"):
        await identity.deactivate("nobody")
    assert revoker.revoked == ["alice"]


async def test_a_revocation_the_session_service_missed_is_done_later_without_a_new_call(
    clock: FakeClock,
) -> None:
    revoker = RecordingRevoker()
    identity = Identity(MemoryIdentityStore(), revoker, clock)
    identity.register(registration("alice", UserKeys.generate(0)))
    revoker.failure = Unavailable("session service unreachable")
    await identity.deactivate("alice", by="operator")  # done; revocation owed
    assert identity.status("alice") == (True, False)  # no new login can succeed meanwhile
    with pytest.raises(Unavailable):
        await identity.revoke_pending()  # what the background task runs, still failing
    revoker.failure = None
    assert await identity.revoke_pending() == 1
    assert revoker.revoked == ["alice"]
    assert await identity.revoke_pending() == 0  # done once
