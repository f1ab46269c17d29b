"""The identity store contract: what every IdentityStore implementation must do, run
against each backend (tests/support/stores.py)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common.audit_events import AuditRecord
from services.identity.keys import OneTimePrekey, SignedKey
from services.identity.model import (
    IdentityStore,
    NewKeys,
    NewUser,
    NoSuchUser,
    PoolFull,
    PrekeyIdsInUse,
    UserIdTaken,
)
from tests.support.stores import Backend, Harness

SIGNED = SignedKey(1, b"s" * 32, b"g" * 64)
PQ = SignedKey(1, b"q" * 1184, b"h" * 64)


def new_user(user_id: str, prekeys: int = 0, *, create_time: float = 100.0) -> NewUser:
    return NewUser(
        user_id=user_id,
        alias=f"{user_id} alias",
        metadata={"lang": "en"},
        identity_key=b"i" * 32,
        verify_key=user_id.encode().ljust(32, b"v"),
        signed_prekey=SIGNED,
        pq_prekey=PQ,
        one_time_prekeys=[OneTimePrekey(i, bytes([i]) * 32) for i in range(1, prekeys + 1)],
        create_time=create_time,
    )


def event(action: str, user_id: str) -> AuditRecord:
    return AuditRecord(action, user_id, {"n": "1"})


@pytest.fixture
def identity(backend: Backend) -> Harness[IdentityStore]:
    return backend.identity()


def test_a_user_reads_back_as_stored(identity: Harness[IdentityStore]) -> None:
    store = identity.store
    store.add_user(new_user("alice", 3), event("user_registered", "alice"))
    user = store.get_user("alice")
    assert user is not None
    assert (user.user_id, user.alias, user.metadata) == ("alice", "alice alias", {"lang": "en"})
    assert (user.signed_prekey, user.pq_prekey, user.one_time_prekey_count) == (SIGNED, PQ, 3)
    assert (user.create_time, user.last_login_time, user.deactivate_time) == (100.0, None, None)
    assert user.verify_key == store.get_verify_key("alice")
    assert (store.get_user("bob"), store.get_verify_key("bob"), store.is_active("bob")) == (
        None,
        None,
        None,
    )
    assert identity.events() == [("user_registered", "alice", {"n": "1"})]


def test_a_taken_user_id_is_refused_and_records_nothing(identity: Harness[IdentityStore]) -> None:
    identity.store.add_user(new_user("alice"), event("user_registered", "alice"))
    with pytest.raises(UserIdTaken):
        identity.store.add_user(new_user("alice", 2), event("user_registered", "alice"))
    assert len(identity.events()) == 1
    user = identity.store.get_user("alice")
    assert user is not None
    assert user.one_time_prekey_count == 0


def test_one_time_prekeys_go_lowest_first_each_once(identity: Harness[IdentityStore]) -> None:
    store = identity.store
    store.add_user(new_user("alice", 2), event("user_registered", "alice"))
    taken = [store.take_one_time_prekey("alice") for _ in range(3)]
    assert [k.key_id if k else None for k in taken] == [1, 2, None]
    with pytest.raises(NoSuchUser):
        store.take_one_time_prekey("bob")


def test_concurrent_takes_never_share_a_prekey(identity: Harness[IdentityStore]) -> None:
    store = identity.store
    store.add_user(new_user("alice", 40), event("user_registered", "alice"))
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda _: store.take_one_time_prekey("alice"), range(50)))
    handed = [k.key_id for k in taken if k is not None]
    assert sorted(handed) == list(range(1, 41))


def test_the_pool_grows_to_its_cap_with_fresh_ids(identity: Harness[IdentityStore]) -> None:
    store = identity.store
    store.add_user(new_user("alice", 2), event("user_registered", "alice"))
    more = [OneTimePrekey(i, b"k" * 32) for i in (10, 11)]
    assert store.add_one_time_prekeys("alice", more, 5, event("prekeys_uploaded", "alice")) == 4
    with pytest.raises(PoolFull) as full:
        store.add_one_time_prekeys(
            "alice", [OneTimePrekey(20, b"k" * 32)] * 2, 5, event("prekeys_uploaded", "alice")
        )
    assert full.value.current == 4
    with pytest.raises(PrekeyIdsInUse):
        store.add_one_time_prekeys(
            "alice", [OneTimePrekey(10, b"k" * 32)], 5, event("prekeys_uploaded", "alice")
        )
    with pytest.raises(NoSuchUser):
        store.add_one_time_prekeys("bob", more, 5, event("prekeys_uploaded", "bob"))
    assert [e[0] for e in identity.events()] == ["user_registered", "prekeys_uploaded"]


def test_prekeys_are_replaced_the_pq_one_only_when_given(identity: Harness[IdentityStore]) -> None:
    store = identity.store
    store.add_user(new_user("alice"), event("user_registered", "alice"))
    signed2, pq2 = SignedKey(2, b"t" * 32, b"u" * 64), SignedKey(2, b"r" * 1184, b"w" * 64)
    store.set_prekeys("alice", signed2, None, event("signed_prekey_rotated", "alice"))
    user = store.get_user("alice")
    assert user is not None
    assert (user.signed_prekey, user.pq_prekey) == (signed2, PQ)
    store.set_prekeys("alice", SIGNED, pq2, event("signed_prekey_rotated", "alice"))
    user = store.get_user("alice")
    assert user is not None
    assert (user.signed_prekey, user.pq_prekey) == (SIGNED, pq2)
    with pytest.raises(NoSuchUser):
        store.set_prekeys("bob", SIGNED, None, event("signed_prekey_rotated", "bob"))


def test_the_last_login_only_moves_forward(identity: Harness[IdentityStore]) -> None:
    store = identity.store
    store.add_user(new_user("alice"), event("user_registered", "alice"))
    store.record_login("alice", 500.0)
    store.record_login("alice", 400.0)
    user = store.get_user("alice")
    assert user is not None
    assert user.last_login_time == 500.0
    with pytest.raises(NoSuchUser):
        store.record_login("bob", 1.0)


def test_deactivation_is_once_empties_the_pool_and_hides_the_user_from_commands(
    identity: Harness[IdentityStore],
) -> None:
    store = identity.store
    store.add_user(new_user("alice", 3), event("user_registered", "alice"))
    store.add_user(new_user("bob", 1), event("user_registered", "bob"))
    assert store.deactivate("alice", 700.0, event("user_deactivated", "alice")) == 700.0
    assert store.deactivate("alice", 800.0, event("user_deactivated", "alice")) == 700.0
    assert (store.is_active("alice"), store.is_active("bob")) == (False, True)
    assert store.get_verify_key("alice") is None
    user = store.get_user("alice")  # lookups still find a deactivated user
    assert user is not None
    assert (user.deactivate_time, user.one_time_prekey_count) == (700.0, 0)
    commands: list[Callable[[], object]] = [
        lambda: store.take_one_time_prekey("alice"),
        lambda: store.record_login("alice", 900.0),
        lambda: store.set_prekeys("alice", SIGNED, None, event("signed_prekey_rotated", "a")),
    ]
    for command in commands:
        with pytest.raises(NoSuchUser, match="no active user"):
            command()
    with pytest.raises(NoSuchUser, match="no user with that user id"):
        store.deactivate("carol", 1.0, event("user_deactivated", "carol"))
    assert [e[0] for e in identity.events()].count("user_deactivated") == 1
    counts = store.counts()
    assert (counts.registered, counts.active, counts.deactivated) == (2, 1, 1)
    assert (counts.one_time_prekeys, counts.active_without_prekeys) == (1, 0)


def test_replacing_keys_swaps_them_all_and_discards_the_old_prekeys(
    identity: Harness[IdentityStore],
) -> None:
    store = identity.store
    store.add_user(new_user("alice", 3), event("user_registered", "alice"))
    keys = NewKeys(
        identity_key=b"I" * 32,
        verify_key=b"V" * 32,
        signed_prekey=SignedKey(2, b"S" * 32, b"G" * 64),
        pq_prekey=SignedKey(2, b"Q" * 1184, b"H" * 64),
        one_time_prekeys=[OneTimePrekey(1, b"N" * 32)],  # a reused id is fine: pool emptied
    )
    assert store.replace_keys("alice", keys, event("keys_replaced", "alice")) == 3
    user = store.get_user("alice")
    assert user is not None
    assert (user.identity_key, user.verify_key) == (b"I" * 32, b"V" * 32)
    assert (user.signed_prekey, user.pq_prekey) == (keys.signed_prekey, keys.pq_prekey)
    assert store.get_verify_key("alice") == b"V" * 32
    assert store.take_one_time_prekey("alice") == OneTimePrekey(1, b"N" * 32)
    assert store.take_one_time_prekey("alice") is None
    assert identity.events()[-1][0] == "keys_replaced"
    with pytest.raises(NoSuchUser):
        store.replace_keys("bob", keys, event("keys_replaced", "bob"))
