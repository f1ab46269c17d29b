"""Every malformed RegisterUser field, checked without a network.

Each request is the SDK's valid one with one field spoiled, converted by the servicer's
own conversion and handed to the identity domain (on the in-memory store, which the
refusal never reaches). That the resulting errors travel as INVALID_ARGUMENT is shown
once over the wire in tests/integration/test_identity.py.
"""

from __future__ import annotations

import pytest
from securemsg.identity.v1 import keys_pb2

from services.client.keys import UserKeys
from services.common.errors import InvalidArgument
from services.identity.domain import Identity
from services.identity.servicer import registration_from_request
from tests.fakes.identity import MemoryIdentityStore, RecordingRevoker
from tests.support.users import registration

MALFORMED = [
    ({"user_id": ""}, "user_id is required"),
    ({"user_id": "ab"}, "user_id must be 3 to 32 characters"),
    ({"user_id": "Alice"}, "user_id must be 3 to 32 characters"),
    ({"user_id": "a" * 33}, "user_id must be 3 to 32 characters"),
    ({"user_id": "bad user"}, "user_id must be 3 to 32 characters"),
    ({"alias": "x" * 65}, "alias is 65 characters; the limit is 64"),
    ({"alias": "bell\x07"}, "alias must not contain control"),
    ({"identity_key": b""}, "identity_key is required"),
    ({"identity_key": b"\x01" * 31}, "identity_key must be exactly 32 bytes, got 31"),
    ({"verify_key": b"\x01" * 33}, "verify_key must be exactly 32 bytes, got 33"),
    ({"metadata": {"Bad-Key": "v"}}, "metadata keys must be 1 to 32 characters"),
    ({"metadata": {"k": "v" * 257}}, "metadata[k] is 257 characters; the limit is 256"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata has 17 entries"),
    ({"signed_prekey": None}, "signed_prekey is required"),
    ({"pq_prekey": None}, "pq_prekey is required"),
    (
        {"pq_prekey": keys_pb2.PqPrekey(key_id=1, public_key=b"\x00" * 100, signature=bytes(64))},
        "pq_prekey.public_key must be exactly 1184 bytes, got 100",
    ),
    (
        {"one_time_prekeys": [keys_pb2.OneTimePrekey(key_id=1, public_key=b"\x00" * 3)]},
        "one_time_prekeys[0].public_key must be exactly 32 bytes, got 3",
    ),
    (
        {"one_time_prekeys": [keys_pb2.OneTimePrekey(key_id=1, public_key=bytes(32))] * 2},
        "one_time_prekeys[1].key_id 1 is repeated",
    ),
    (
        {
            "one_time_prekeys": [
                keys_pb2.OneTimePrekey(key_id=i, public_key=bytes(32)) for i in range(101)
            ]
        },
        "at most 100 per request",
    ),
]


@pytest.fixture(scope="module")
def keys() -> UserKeys:
    return UserKeys.generate(1)


@pytest.fixture
def identity() -> Identity:
    return Identity(MemoryIdentityStore(), RecordingRevoker())


def test_the_unspoiled_request_registers(identity: Identity, keys: UserKeys) -> None:
    user = identity.register(registration_from_request(registration("newcomer", keys)))
    assert user.user_id == "newcomer"


@pytest.mark.parametrize(("overrides", "message"), MALFORMED)
def test_each_malformed_field_is_invalid_argument_with_a_message_naming_it(
    identity: Identity, keys: UserKeys, overrides: dict[str, object], message: str
) -> None:
    request = registration("newcomer", keys, **overrides)
    with pytest.raises(InvalidArgument) as error:
        identity.register(registration_from_request(request))
    assert message in error.value.message
