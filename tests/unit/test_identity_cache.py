"""The account cache serves key bundles from memory, and never keys that were replaced
or rotated, nor an account that was deactivated.

The cache sits in front of the real SQLite store (row MACs, encryption) with the real
identity rules; the store contract suite also runs through it (backend "sqlite+cache").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from securemsg.identity.v1 import keys_pb2

from services.client.keys import UserKeys
from services.common.audit_events import AuditRecord
from services.common.errors import NotFound
from services.common.outbox import SqliteOutbox
from services.common.sqlite import open_database
from services.identity.cache import CachedIdentityStore
from services.identity.domain import Identity, IdentityLimits
from services.identity.keys import SignedKey
from services.identity.model import NewKeys, User
from services.identity.store import MIGRATIONS, SqliteIdentityStore
from tests.fakes.identity import RecordingRevoker
from tests.unit.conftest import FakeClock, registration


class CountingStore(SqliteIdentityStore):
    """The SQLite store, counting the reads that reach it."""

    reads = 0
    verify_key_reads = 0

    def get_user(self, user_id: str) -> User | None:
        self.reads += 1
        return super().get_user(user_id)

    def get_verify_key(self, user_id: str) -> bytes | None:
        self.verify_key_reads += 1
        return super().get_verify_key(user_id)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    opened = open_database(
        tmp_path / "identity.db",
        service="identity",
        master_key="identity cache test key",
        kdf_iterations=1_000,
        migrations=MIGRATIONS,
        synchronous="NORMAL",
    )
    outbox = SqliteOutbox(opened.database, opened.keyring, "identity")
    yield CountingStore(opened.database, opened.keyring, outbox)
    opened.database.close()


@pytest.fixture
def cached(store: CountingStore) -> CachedIdentityStore:
    return CachedIdentityStore(store, max_entries=100)


@pytest.fixture
def identity(cached: CachedIdentityStore, clock: FakeClock) -> Identity:
    return Identity(cached, RecordingRevoker(), clock, published=cached)


def test_bundles_read_the_account_once_and_still_take_a_prekey_each(
    identity: Identity, store: CountingStore
) -> None:
    keys = UserKeys.generate(3)
    identity.register(registration("alice", keys))
    bundles = [identity.bundle("alice") for _ in range(4)]
    assert store.reads == 1
    assert {b.identity_key for b in bundles} == {keys.identity_public}
    assert [b.one_time_prekey.key_id if b.one_time_prekey else None for b in bundles] == [
        1,
        2,
        3,
        None,
    ]
    assert identity.prekey_count("alice") == 0  # counts always come from the store


async def test_replaced_keys_are_served_at_once(identity: Identity) -> None:
    identity.register(registration("alice", UserKeys.generate(2)))
    before = identity.bundle("alice")
    new = UserKeys.generate(2)
    await identity.replace_keys("alice", registration("alice", new), by="owner", keep_session_id="")
    after = identity.bundle("alice")
    assert after.identity_key == new.identity_public != before.identity_key
    assert after.verify_key == new.verify_key
    assert after.fingerprint != before.fingerprint
    assert after.signed_prekey.public_key == new.signed_prekey_proto().public_key
    assert after.one_time_prekey is not None
    assert after.one_time_prekey.public_key == new.one_time_protos()[0].public_key


def test_a_rotated_signed_prekey_is_served_at_once(identity: Identity) -> None:
    keys = UserKeys.generate(0)
    identity.register(registration("alice", keys))
    identity.bundle("alice")
    keys.signed_prekey_id = 2
    rotated = keys.signed_prekey_proto()
    identity.rotate_signed_prekey("alice", _signed(rotated), None)
    assert identity.bundle("alice").signed_prekey.key_id == 2


async def test_a_deactivated_account_is_gone_at_once(
    cached: CachedIdentityStore, clock: FakeClock
) -> None:
    # Past the per-target allowance a bundle takes no prekey, so nothing but the
    # account itself can say it is closed.
    limits = IdentityLimits(2**31, 2**31, prekeys_per_target_per_hour=1)
    identity = Identity(cached, RecordingRevoker(), clock, limits, published=cached)
    identity.register(registration("alice", UserKeys.generate(2)))
    identity.bundle("alice", "bob")
    assert identity.bundle("alice", "bob").one_time_prekey is None
    await identity.deactivate("alice")
    with pytest.raises(NotFound):
        identity.bundle("alice", "bob")


def test_an_account_read_before_a_change_committed_is_not_remembered(
    store: CountingStore, cached: CachedIdentityStore, identity: Identity
) -> None:
    """A fetch reads the account; a key replacement commits; then the fetch would fill
    the cache with what it read. The fill must be dropped."""
    identity.register(registration("alice", UserKeys.generate(0)))
    read, replaced = threading.Event(), threading.Event()
    original = store.get_user

    def slow_read(user_id: str) -> User | None:
        found = original(user_id)
        read.set()
        replaced.wait()
        return found

    store.get_user = slow_read  # type: ignore[method-assign]
    fetch = threading.Thread(target=identity.bundle, args=("alice",))
    fetch.start()
    read.wait()
    store.get_user = original  # type: ignore[method-assign]
    new = UserKeys.generate(0)
    cached.replace_keys("alice", _new_keys(new), _event())
    replaced.set()
    fetch.join()

    assert identity.bundle("alice").identity_key == new.identity_public


def test_the_login_lookup_always_reads_the_store(identity: Identity, store: CountingStore) -> None:
    """Known and unknown users must cost the same there (see get_verify_key)."""
    keys = UserKeys.generate(0)
    identity.register(registration("alice", keys))
    identity.bundle("alice")
    assert identity.verify_key("alice") == keys.verify_key
    assert identity.verify_key("alice") == keys.verify_key
    assert store.verify_key_reads == 2


def test_memory_holds_at_most_its_bound(store: CountingStore, clock: FakeClock) -> None:
    cached = CachedIdentityStore(store, max_entries=2)
    identity = Identity(cached, RecordingRevoker(), clock, published=cached)
    for name in ("alice", "bob", "carol"):
        identity.register(registration(name, UserKeys.generate(0)))
        identity.bundle(name)
    assert len(cached) == 2
    store.reads = 0
    identity.bundle("alice")  # the oldest went first
    assert store.reads == 1


def _signed(proto: keys_pb2.SignedPrekey | keys_pb2.PqPrekey) -> SignedKey:
    return SignedKey(proto.key_id, proto.public_key, proto.signature)


def _new_keys(keys: UserKeys) -> NewKeys:
    return NewKeys(
        identity_key=keys.identity_public,
        verify_key=keys.verify_key,
        signed_prekey=_signed(keys.signed_prekey_proto()),
        pq_prekey=_signed(keys.pq_prekey_proto()),
        one_time_prekeys=[],
    )


def _event() -> AuditRecord:
    return AuditRecord("keys_replaced", "alice", {"by": "owner"})
