"""The exact verdict VerifyAuditLog gives for each shape of log (position, problem,
counts), so that an operator's report says the right thing, not merely "not ok"."""

from __future__ import annotations

import dataclasses

import pytest

from services.audit import chain
from services.audit.chain import GENESIS, Boundary, Chain, ChainedRow, Head, LinkedRow
from services.audit.model import Verification
from services.common.errors import IntegrityError

KEYS = {1: b"k" * 32, 2: b"K" * 32}
LINKS = Chain(KEYS, 1)


def row(sequence: int, action: str = "user_login") -> ChainedRow:
    return ChainedRow(
        sequence, f"e{sequence}", action, "session", b"i", b"u", b"d", 1.0 * sequence, 2.0
    )


def log(count: int) -> list[LinkedRow]:
    rows, link = [], GENESIS
    for sequence in range(1, count + 1):
        link = LINKS.link(link, row(sequence))
        rows.append(LinkedRow(row(sequence), link, 1))
    return rows


ROWS = log(6)


def verdict(rows: list[LinkedRow], **overrides: object) -> Verification:
    options: dict[str, object] = {
        "start": 1,
        "previous": GENESIS,
        "head": Head(6, ROWS[-1].link),
        "boundary": None,
        "total": 6,
        "limit": 0,
    }
    options.update(overrides)
    return chain.verify(LINKS, rows, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rows", "overrides", "expected"),
    [
        (ROWS, {}, Verification(True, 6, total=6)),
        (
            [*ROWS[:3], dataclasses.replace(ROWS[3], row=row(4, "user_logout")), *ROWS[4:]],
            {},
            Verification(False, 3, 4, "event 4 was altered, inserted or moved", 0, 6),
        ),
        (
            [*ROWS[:2], *ROWS[3:]],
            {"total": 5},
            Verification(False, 2, 3, "event 3 is missing (deleted)", 0, 5),
        ),
        (
            ROWS[:5],
            {"total": 5},
            Verification(False, 5, 6, "the log ends at 5 but its head says 6", 0, 5),
        ),
        (
            ROWS,
            {"head": Head(6, bytes(32))},  # the head's link forged, its sequence kept
            Verification(False, 6, 7, "the log ends at 6 but its head says 6", 0, 6),
        ),
        (
            ROWS,
            {"head": None},  # the head row deleted
            Verification(False, 6, 1, "the log ends at 6 but its head says 0", 0, 6),
        ),
        (
            [*ROWS[:5], dataclasses.replace(ROWS[5], version=9)],
            {},
            Verification(False, 5, 6, "event 6 names an unknown chain key", 0, 6),
        ),
        (
            ROWS[3:],
            {"start": 4, "previous": None},
            Verification(False, 0, 3, "event 3 is missing (deleted)", 0, 6),
        ),
        (ROWS[:2], {"limit": 2}, Verification(True, 2, next_sequence=3, total=6)),
        (
            ROWS[2:4],
            {"start": 3, "previous": ROWS[1].link, "limit": 2},
            Verification(True, 2, next_sequence=5, total=6),
        ),
        (
            ROWS[4:],
            {"start": 5, "previous": ROWS[3].link, "limit": 2},
            Verification(True, 2, total=6),
        ),
        (
            ROWS[4:],
            {"start": 5, "previous": ROWS[2].link},
            Verification(False, 0, 5, "event 5 was altered, inserted or moved", 0, 6),
        ),
    ],
)
def test_the_verdict_for_each_shape_of_log(
    rows: list[LinkedRow], overrides: dict[str, object], expected: Verification
) -> None:
    assert verdict(rows, **overrides) == expected


def test_a_rotation_boundary_joins_the_new_chain_to_the_old_one_at_one_place_only() -> None:
    new = Chain(KEYS, 2)
    relinked, link = [], GENESIS
    for linked in ROWS[:3]:
        link = new.link(link, linked.row)
        relinked.append(LinkedRow(linked.row, link, 2))
    rows = [*relinked, *ROWS[3:]]
    assert chain.verify(
        new, rows, start=1, previous=GENESIS, head=Head(6, ROWS[-1].link),
        boundary=Boundary(3, ROWS[2].link), total=6, limit=0,
    ) == Verification(True, 6, total=6)  # fmt: skip
    wrong_place = chain.verify(
        new, rows, start=1, previous=GENESIS, head=Head(6, ROWS[-1].link),
        boundary=Boundary(2, ROWS[1].link), total=6, limit=0,
    )  # fmt: skip
    assert (wrong_place.ok, wrong_place.first_bad_sequence) == (False, 3)


def test_links_need_a_loaded_key_version() -> None:
    with pytest.raises(IntegrityError):
        LINKS.link(GENESIS, row(1), 9)
    assert LINKS.link(GENESIS, row(1)) == LINKS.link(GENESIS, row(1), 1)
    assert LINKS.link(GENESIS, row(1), 2) != LINKS.link(GENESIS, row(1), 1)
