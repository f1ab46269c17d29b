"""The audit log's keyed hash chain, apart from how events are stored.

    link(n) = HMAC-SHA256(chain key of the row's key version, link(n-1) || canonical(row))
    link(0) = GENESIS, 32 zero bytes

`canonical` covers the row exactly as stored (ciphertexts and blind index included), each
part length-prefixed so that no two rows encode alike. The head (last sequence and link)
is kept apart from the rows, so cutting events off the end is noticed too.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.audit.model import Verification
from services.common.errors import IntegrityError

GENESIS = bytes(32)


@dataclass(frozen=True)
class ChainedRow:
    """The stored bytes of one event that its link covers."""

    sequence: int
    event_id: str
    action: str
    source: str
    user_index: bytes | None
    user_id_ct: bytes | None
    details_ct: bytes
    occur_time: float
    record_time: float
    # The producer's numbering; rows from before it have neither, and link as before.
    source_epoch: str | None = None
    source_sequence: int | None = None


@dataclass(frozen=True)
class LinkedRow:
    """A stored event with the link and key version stored beside it."""

    row: ChainedRow
    link: bytes
    version: int


def canonical(row: ChainedRow) -> bytes:
    parts: list[bytes] = [
        struct.pack(">Q", row.sequence),
        row.event_id.encode(),
        row.action.encode(),
        row.source.encode(),
        row.user_index or b"",
        row.user_id_ct or b"",
        row.details_ct,
        struct.pack(">dd", row.occur_time, row.record_time),
    ]
    if row.source_epoch is not None or row.source_sequence is not None:
        parts += [(row.source_epoch or "").encode(), struct.pack(">Q", row.source_sequence or 0)]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


class Chain:
    """Links under the chain keys of every loaded key version."""

    def __init__(self, keys: Mapping[int, bytes], primary: int) -> None:
        self._keys = keys
        self.primary = primary

    def link(self, previous: bytes, row: ChainedRow, version: int | None = None) -> bytes:
        """Raises IntegrityError when the key version is not loaded."""
        version = self.primary if version is None else version
        key = self._keys.get(version)
        if key is None:
            raise IntegrityError(f"audit chain key version {version} is not loaded")
        return hmac.digest(key, previous + canonical(row), "sha256")

    def holds(self, previous: bytes, linked: LinkedRow) -> bool:
        """Whether a stored link is the one its row and predecessor give."""
        return hmac.compare_digest(self.link(previous, linked.row, linked.version), linked.link)


@dataclass(frozen=True)
class Head:
    sequence: int
    link: bytes


@dataclass(frozen=True)
class Boundary:
    """A key rotation under way: events up to `sequence` are re-linked under the new key;
    the next one still chains from `old_link`, the boundary event's link before."""

    sequence: int
    old_link: bytes


class Numbering:
    """Each producer's numbering (source, epoch) as the walk meets it: events must come
    1, 2, 3, ... per epoch. The first departure found is kept for the report."""

    def __init__(self, last: Mapping[tuple[str, str], int]) -> None:
        self._last = dict(last)
        self.gap: tuple[int, str] | None = None  # (sequence of the event after it, what)

    def see(self, row: ChainedRow) -> None:
        if row.source_epoch is None or row.source_sequence is None:
            return
        key = (row.source, row.source_epoch)
        last = self._last.get(key, 0)
        self._last[key] = max(last, row.source_sequence)
        if self.gap is not None or row.source_sequence == last + 1:
            return
        where = f"{row.source} (numbering {row.source_epoch[:8]})"
        if row.source_sequence > last + 1:
            missing = (
                f"{last + 1}"
                if row.source_sequence == last + 2
                else f"{last + 1} to {row.source_sequence - 1}"
            )
            what = (
                f"events {missing} of {where} never arrived: deleted before delivery, or "
                "dropped by a full relay outbox"
            )
        else:
            what = (
                f"the numbering of {where} went back to {row.source_sequence} after {last}: "
                "its database was restored from an older copy"
            )
        self.gap = (row.sequence, what)


def verify(
    chain: Chain,
    rows: Iterable[LinkedRow],
    *,
    start: int,
    previous: bytes | None,
    head: Head | None,
    boundary: Boundary | None,
    total: int,
    limit: int,
    numbering: Numbering | None = None,
) -> Verification:
    """Walks `rows` (sequence order from `start`, at most `limit` if > 0), each against
    the link before it, and names the first position that fails; then, if the chain
    holds, the first gap in a producer's numbering (`numbering`, primed with what came
    before `start`).

    `previous` is the link of event `start - 1` (GENESIS for the first), None if that
    event is missing; `total` is how many events are stored.
    """
    numbering = numbering or Numbering({})
    if previous is None:
        problem = f"event {start - 1} is missing (deleted)"
        return Verification(False, 0, start - 1, problem, 0, total)
    link = previous
    expected, checked = start, 0
    for linked in rows:
        if linked.row.sequence != expected:
            problem = f"event {expected} is missing (deleted)"
            return Verification(False, checked, expected, problem, 0, total)
        if boundary is not None and expected == boundary.sequence + 1:
            link = boundary.old_link  # rotation under way: later rows chain on old links
        try:
            holds = chain.holds(link, linked)
        except IntegrityError:
            problem = f"event {expected} names an unknown chain key"
            return Verification(False, checked, expected, problem, 0, total)
        if not holds:
            problem = f"event {expected} was altered, inserted or moved"
            return Verification(False, checked, expected, problem, 0, total)
        link = linked.link
        numbering.see(linked.row)
        checked += 1
        expected += 1
    last = expected - 1
    head_sequence = head.sequence if head else 0
    sliced = limit > 0 and checked == limit and last < max(head_sequence, total)
    if not sliced and (
        head_sequence != last or (head and not hmac.compare_digest(head.link, link))
    ):
        bad = min(head_sequence, last) + 1
        problem = f"the log ends at {last} but its head says {head_sequence}"
        return Verification(False, checked, bad, problem, 0, total)
    if numbering.gap is not None:
        return Verification(False, checked, *numbering.gap, 0, total)
    if sliced:
        return Verification(True, checked, next_sequence=expected, total=total)
    return Verification(True, checked, total=total)
