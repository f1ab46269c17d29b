"""Audit rules: what an acceptable event is, who may read what, and page tokens."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.audit.model import AuditStore, NewEvent, Query, StoredEvent, Verification
from services.common import validation
from services.common.audit_events import SOURCES
from services.common.errors import InvalidArgument, PermissionDenied

EVENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
ACTION_PATTERN = re.compile(r"[a-z0-9_]{1,64}")
MAX_BATCH = 500
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


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
    if not ACTION_PATTERN.fullmatch(event.action):
        raise InvalidArgument(f"{where}.action must be 1 to 64 characters of [a-z0-9_]")
    if event.source not in SOURCES:
        raise InvalidArgument(f"{where}.source must be one of {', '.join(sorted(SOURCES))}")
    if caller is not None and event.source != caller:
        raise InvalidArgument(f"{where}.source must be {caller!r}, the caller's certificate name")
    if event.user_id:
        validation.user_id(event.user_id, f"{where}.user_id")
    if event.occur_time <= 0:
        raise InvalidArgument(f"{where}.occur_time is required")
    validation.string_map(event.details, f"{where}.details", max_entries=16, max_value_chars=256)


class AuditLog:
    def __init__(self, store: AuditStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
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
        fingerprint = _filter_fingerprint(user_id, request)
        before = _parse_token(request.page_token, fingerprint) if request.page_token else None
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
        return page, _make_token(page[-1].sequence, fingerprint)

    def verify(self, start: int = 1, limit: int = 0) -> Verification:
        # uint64 fields beyond SQLite's signed 64-bit range mean "everything" / "past the end".
        return self._store.verify(min(start, 2**62), min(limit, 2**62))

    def counts(self) -> dict[str, int]:
        return self._store.counts()


def _filter_fingerprint(user_id: str, request: ListRequest) -> str:
    filters = f"{user_id}|{request.action}|{request.start_time}|{request.end_time}"
    return hashlib.sha256(filters.encode()).hexdigest()[:16]


def _make_token(before_sequence: int, fingerprint: str) -> str:
    raw = f"v1.{before_sequence}.{fingerprint}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_token(token: str, fingerprint: str) -> int:
    bad = InvalidArgument(
        "page_token is not from a previous page of this same query; start without one"
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, sequence, token_fingerprint = raw.split(".")
        before = int(sequence)
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    if version != "v1" or token_fingerprint != fingerprint or before < 1:
        raise bad
    return before
