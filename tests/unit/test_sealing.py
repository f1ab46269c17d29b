"""The CLI's sealed boxes: only the recipient opens them, only the signer sent them, and a
hostile box is reported as unreadable instead of crashing the reader."""

from __future__ import annotations

import pytest

from services.client import sealing
from services.client.keys import UserKeys

ALICE, BOB, MALLORY = (UserKeys.generate(0) for _ in range(3))


def test_a_box_opens_for_its_recipient_from_its_signer() -> None:
    box = sealing.seal(BOB.identity_public, "alice", ALICE.signing, b"hello bob")
    assert sealing.open_sealed(BOB.identity, box, "alice", ALICE.verify_key) == b"hello bob"
    assert b"hello bob" not in box


def test_a_box_claiming_another_sender_is_refused() -> None:
    # Mallory seals to Bob and the relay names her as the sender; Bob's pin for "alice"
    # never verifies her signature, and her own name is not what she signed.
    forged = sealing.seal(BOB.identity_public, "alice", MALLORY.signing, b"pay mallory")
    assert sealing.open_sealed(BOB.identity, forged, "alice", ALICE.verify_key) is None
    assert sealing.open_sealed(BOB.identity, forged, "mallory", MALLORY.verify_key) is None


def test_a_box_is_only_for_its_recipient() -> None:
    box = sealing.seal(BOB.identity_public, "alice", ALICE.signing, b"for bob")
    assert sealing.open_sealed(MALLORY.identity, box, "alice", ALICE.verify_key) is None


@pytest.mark.parametrize(
    "box",
    [
        b"",
        b"\x02" + bytes(200),  # a low-order (all-zero) ephemeral key: the exchange raises
        b"\x02" + (1).to_bytes(32, "little") + bytes(150),  # another low-order point
        b"\x01" + bytes(200),  # an old or unknown version
        b"\x02" + bytes(60),  # too short to hold a signature
    ],
)
def test_a_hostile_box_is_unreadable_not_an_exception(box: bytes) -> None:
    assert sealing.open_sealed(BOB.identity, box, "alice", ALICE.verify_key) is None


@pytest.mark.parametrize("position", [0, 5, 40, 50, -1])
def test_any_altered_byte_makes_the_box_unreadable(position: int) -> None:
    box = bytearray(sealing.seal(BOB.identity_public, "alice", ALICE.signing, b"hello"))
    box[position] ^= 0x01
    assert sealing.open_sealed(BOB.identity, bytes(box), "alice", ALICE.verify_key) is None
