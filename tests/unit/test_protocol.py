"""The wire-protocol byte layouts, pinned to what the protos document.

Clients in other languages build these bytes from the proto comments alone; a change
here breaks every one of them, so the expected values are written out, not recomputed.
"""

from __future__ import annotations

from services.protocol import ports, signing


def test_the_login_message_is_context_user_id_zero_challenge() -> None:
    assert signing.login_message("bob", b"\x01\x02") == b"SecureMsg login v1\x00bob\x00\x01\x02"


def test_prekey_messages_are_context_big_endian_key_id_then_key() -> None:
    key = b"\xaa" * 32
    assert signing.signed_prekey_message(258, key) == (
        b"SecureMsg signed prekey v1\x00\x00\x00\x01\x02" + key
    )
    assert (
        signing.pq_prekey_message(1, b"\xbb") == b"SecureMsg pq prekey v1\x00\x00\x00\x00\x01\xbb"
    )


def test_the_fingerprint_is_grouped_upper_case_sha256() -> None:
    assert signing.fingerprint(bytes(32), bytes(range(32))) == (
        "71BE:1E70:BD1C:46F6:0B2E:E73A:3FF1:CB1D:6255:B045:9105:0C8E:5A52:BF28:0599:89DE"
    )


def test_internal_ports_are_the_public_ones_plus_ten() -> None:
    assert ports.DEFAULT_PORTS == {
        "identity": 50051,
        "session": 50052,
        "relay": 50053,
        "audit": 50054,
    }
    assert [ports.internal_port(name) for name in ports.DEFAULT_PORTS] == [
        50061,
        50062,
        50063,
        50064,
    ]
