"""Audit rules: what an acceptable event is, who may read what, and page tokens."""

from __future__ import annotations

import base64
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.audit.model import AuditStore, NewEvent, Query, StoredEvent, Verification
from services.common import validation
from services.common.audit_events import SOURCES, VOCABULARY
from services.common.crypto import MAC_TAG_BYTES, Mac
from services.common.errors import InvalidArgument, PermissionDenied

EVENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ACTION_PATTERN = re.compile(r"[a-z0-9_]{1,64}")
EPOCH_PATTERN = re.compile(r"[0-9a-f]{32}")
MAX_BATCH = 500
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_SEQUENCE = 2**62  # well inside SQLite's signed 64-bit integers
_SEQUENCE = struct.Struct(">Q")
_TOKEN_CONTEXT = "audit page token v2"  # noqa: S105 - a label, not a secret
_Filters = tuple[str, str, float | None, float | None]


@dataclass(frozen=True)
class Reader:
    """Who is reading: an operator (anything) or one user (only their own events)."""

    operator: bool
    user_id: str = ""


@dataclass(frozen=True)
class ListRequest:
    user_id: str
    action: str
    start_time: float | None
    end_time: float | None
    page_size: int
    page_token: str


def _check_event(index: int, event: NewEvent, caller: str | None) -> None:
    where = f"events[{index}]"
    if not EVENT_ID_PATTERN.fullmatch(event.event_id):
        raise InvalidArgument(f"{where}.event_id must be 1 to 64 characters of [A-Za-z0-9_-]")
    if event.action not in VOCABULARY:
        raise InvalidArgument(
            f"{where}.action must be one of the documented audit actions (docs/AUDIT_EVENTS.md)"
        )
    if event.source not in SOURCES:
        raise InvalidArgument(f"{where}.source must be one of {', '.join(sorted(SOURCES))}")
    if caller is not None and event.source != caller:
        raise InvalidArgument(f"{where}.source must be {caller!r}, the caller's certificate name")
    if event.user_id:
        validation.user_id(event.user_id, f"{where}.user_id")
    if event.occur_time <= 0:
        raise InvalidArgument(f"{where}.occur_time is required")
    if bool(event.source_epoch) != bool(event.source_sequence) or (
        event.source_epoch and not EPOCH_PATTERN.fullmatch(event.source_epoch)
    ):
        raise InvalidArgument(
            f"{where}.source_epoch must be 32 lower-case hex digits with a source_sequence "
            "of 1 or more, or both must be unset"
        )
    validation.string_map(event.details, f"{where}.details", max_entries=16, max_value_chars=256)


class AuditLog:
    def __init__(
        self, store: AuditStore, page_tokens: Mac, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._tokens = page_tokens
        self._clock = clock

    def append(self, events: list[NewEvent], caller: str | None) -> tuple[int, int]:
        """Appends a batch all or nothing. `caller` None means any source is allowed."""
        if not events:
            raise InvalidArgument("events must hold at least one event")
        if len(events) > MAX_BATCH:
            raise InvalidArgument(f"events holds {len(events)}; at most {MAX_BATCH} per call")
        for index, event in enumerate(events):
            _check_event(index, event, caller)
        return self._store.append(events, self._clock())

    def list(self, reader: Reader, request: ListRequest) -> tuple[list[StoredEvent], str]:
        """A page of events, newest first, and the token for the next page ("" at the end)."""
        user_id = request.user_id
        if not reader.operator:
            if user_id and user_id != reader.user_id:
                raise PermissionDenied("you may list only your own audit events")
            user_id = reader.user_id
        if user_id:
            validation.user_id(user_id)
        if request.action and not ACTION_PATTERN.fullmatch(request.action):
            raise InvalidArgument("action must be 1 to 64 characters of [a-z0-9_]")
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        if request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be at most {MAX_PAGE_SIZE}")
        if (
            request.start_time is not None
            and request.end_time is not None
            and request.start_time >= request.end_time
        ):
            raise InvalidArgument("start_time must be before end_time")
        size = request.page_size or DEFAULT_PAGE_SIZE
        filters = (user_id, request.action, request.start_time, request.end_time)
        before = self._parse_token(request.page_token, filters) if request.page_token else None
        events = self._store.query(
            Query(
                user_id=user_id or None,
                action=request.action or None,
                start_time=request.start_time,
                end_time=request.end_time,
                before_sequence=before,
                limit=size + 1,
            )
        )
        if len(events) <= size:
            return events, ""
        page = events[:size]
        return page, self._make_token(page[-1].sequence, filters)

    def verify(self, start: int = 1, limit: int = 0) -> Verification:
        # uint64 fields beyond SQLite's signed 64-bit range mean "everything" / "past the end".
        return self._store.verify(min(start, 2**62), min(limit, 2**62))

    def counts(self) -> dict[str, int]:
        return self._store.counts()

    # A page token is the last sequence seen and a MAC over it and the query's filters
    # (the reader's own user id for a user), so a token cannot be forged, moved to
    # another query or reader, or pointed past the range SQLite can hold.

    def _make_token(self, before_sequence: int, filters: _Filters) -> str:
        tag = self._tokens.tag(_TOKEN_CONTEXT, before_sequence, *filters)
        raw = _SEQUENCE.pack(before_sequence) + tag
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _parse_token(self, token: str, filters: _Filters) -> int:
        bad = InvalidArgument(
            "page_token is not from a previous page of this same query; start without one"
        )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise bad from None
        if len(raw) != _SEQUENCE.size + MAC_TAG_BYTES:
            raise bad
        (before,) = _SEQUENCE.unpack_from(raw)
        if not self._tokens.valid(raw[_SEQUENCE.size :], _TOKEN_CONTEXT, before, *filters):
            raise bad
        if not 1 <= before <= MAX_SEQUENCE:
            raise bad
        return int(before)
