"""The audit hash chain on its own: no database, rows built in memory."""

from __future__ import annotations

import dataclasses

from services.audit import chain
from services.audit.chain import GENESIS, Boundary, Chain, ChainedRow, Head, LinkedRow
from services.audit.model import Verification

KEYS = {1: b"k" * 32, 2: b"K" * 32}


def row(sequence: int, action: str = "user_login") -> ChainedRow:
    return ChainedRow(
        sequence, f"e{sequence}", action, "session", b"i", b"u", b"d", 1.0 * sequence, 2.0
    )


def linked_log(count: int, links: Chain) -> list[LinkedRow]:
    rows, link = [], GENESIS
    for sequence in range(1, count + 1):
        link = links.link(link, row(sequence))
        rows.append(LinkedRow(row(sequence), link, links.primary))
    return rows


def check(rows: list[LinkedRow], links: Chain, **overrides: object) -> Verification:
    options: dict[str, object] = {
        "start": 1,
        "previous": GENESIS,
        "head": Head(5, rows[-1].link),
        "boundary": None,
        "total": len(rows),
        "limit": 0,
    }
    options.update(overrides)
    return chain.verify(links, rows, **options)  # type: ignore[arg-type]


def test_an_intact_log_verifies_whole_and_in_slices() -> None:
    links = Chain(KEYS, 1)
    rows = linked_log(5, links)
    assert check(rows, links) == Verification(True, 5, total=5)
    first = check(rows[:2], links, limit=2)
    assert (first.ok, first.next_sequence) == (True, 3)
    rest = check(rows[2:], links, start=3, previous=rows[1].link)
    assert (rest.ok, rest.checked) == (True, 3)


def test_each_kind_of_tampering_is_named_at_its_position() -> None:
    links = Chain(KEYS, 1)
    rows = linked_log(5, links)
    edited = [*rows[:2], dataclasses.replace(rows[2], row=row(3, "user_logout")), *rows[3:]]
    assert check(edited, links).first_bad_sequence == 3
    deleted = [*rows[:2], *rows[3:]]
    assert check(deleted, links).problem == "event 3 is missing (deleted)"
    swapped = [*rows[:1], rows[2], rows[1], *rows[3:]]
    assert check(swapped, links).first_bad_sequence == 2
    cut = check(rows[:4], links)
    assert (cut.ok, cut.first_bad_sequence) == (False, 5)
    unknown = [*rows[:4], dataclasses.replace(rows[4], version=7)]
    assert check(unknown, links).problem == "event 5 names an unknown chain key"
    assert check(rows[3:], links, start=4, previous=None).first_bad_sequence == 3


def test_during_a_rotation_rows_past_the_boundary_chain_on_old_links() -> None:
    old = linked_log(5, Chain(KEYS, 1))
    new = Chain(KEYS, 2)
    relinked, link = [], GENESIS
    for linked in old[:2]:  # the first two re-linked under key version 2
        link = new.link(link, linked.row)
        relinked.append(LinkedRow(linked.row, link, 2))
    rows = [*relinked, *old[2:]]
    boundary = Boundary(2, old[1].link)
    assert check(rows, new, boundary=boundary).ok
    assert not check(rows, new).ok  # without the boundary the seam does not hold


EPOCH_A, EPOCH_B = "a" * 32, "b" * 32


def numbered_log(numbers: list[tuple[str, str, int]], links: Chain) -> list[LinkedRow]:
    """Events with (source, epoch, the producer's number), chained in this order."""
    rows, link = [], GENESIS
    for sequence, (source, epoch, number) in enumerate(numbers, start=1):
        event = dataclasses.replace(
            row(sequence), source=source, source_epoch=epoch, source_sequence=number
        )
        link = links.link(link, event)
        rows.append(LinkedRow(event, link, links.primary))
    return rows


def test_a_producers_events_that_never_arrived_are_named() -> None:
    links = Chain(KEYS, 1)
    rows = numbered_log(
        [("session", EPOCH_A, 1), ("relay", EPOCH_B, 1), ("session", EPOCH_A, 2),
         ("session", EPOCH_A, 5), ("relay", EPOCH_B, 2)],
        links,
    )  # fmt: skip
    result = check(rows, links)
    assert (result.ok, result.checked, result.first_bad_sequence) == (False, 5, 4)
    assert result.problem.startswith("events 3 to 4 of session (numbering aaaaaaaa) never arrived")


def test_a_numbering_that_goes_back_or_starts_late_is_named() -> None:
    links = Chain(KEYS, 1)
    back = numbered_log([("session", EPOCH_A, 1), ("session", EPOCH_A, 2),
                         ("session", EPOCH_A, 1)], links)  # fmt: skip
    result = check(back, links, head=Head(3, back[-1].link))
    assert "went back to 1 after 2" in result.problem
    late = numbered_log([("identity", EPOCH_A, 2)], links)
    assert check(late, links, head=Head(1, late[-1].link)).problem.startswith("events 1 of")


def test_numbering_carries_across_slices_and_epochs() -> None:
    links = Chain(KEYS, 1)
    rows = numbered_log(
        [("relay", EPOCH_A, 1), ("relay", EPOCH_A, 2), ("relay", EPOCH_B, 1),
         ("relay", EPOCH_A, 3), ("relay", EPOCH_B, 2)],
        links,
    )  # fmt: skip
    assert check(rows, links).ok  # a restarted relay counts anew in its own epoch
    primed = chain.Numbering({("relay", EPOCH_A): 2, ("relay", EPOCH_B): 1})
    rest = check(rows[3:], links, start=4, previous=rows[2].link, numbering=primed)
    assert rest.ok
    gap = chain.Numbering({("relay", EPOCH_A): 1, ("relay", EPOCH_B): 1})
    bad = check(rows[3:], links, start=4, previous=rows[2].link, numbering=gap)
    assert (bad.ok, bad.first_bad_sequence) == (False, 4)
