"""Relay rules, independent of gRPC: what a send must pass and in which order, fetch and
acknowledgement limits, and live delivery to a subscriber.

Callers are already authenticated. Everything runs on the event loop thread (the queues
are memory only), so no call blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from services.common import audit_events
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.relay.model import Message, RecipientDirectory, RelayStats
from services.relay.queues import MessageQueues

DEFAULT_FETCH = 100
MAX_FETCH = 1000
MAX_ACK_IDS = 1000


class Relay:
    def __init__(
        self,
        queues: MessageQueues,
        recipients: RecipientDirectory,
        *,
        revalidate_seconds: float,
        fetch_budget_bytes: int,
    ) -> None:
        self._queues = queues
        self._recipients = recipients
        self._revalidate = revalidate_seconds
        self._fetch_budget = fetch_budget_bytes

    async def send(
        self, sender_id: str, recipient_id: str, body: bytes, requested_ttl: float | None
    ) -> Message:
        # Admission (shape, size, TTL, the sender's rate) comes before the identity lookup,
        # so a flood costs no call to identity; room in the queues is checked last.
        ttl = self._queues.admit(sender_id, recipient_id, body, requested_ttl)
        if not await self._recipients.is_active(recipient_id):
            raise NotFound("no active user with that recipient_id")
        return self._queues.send(sender_id, recipient_id, body, ttl)

    def fetch(self, user_id: str, max_messages: int) -> list[Message]:
        """The oldest pending messages that fit in one gRPC reply; nothing is removed."""
        limit = max_messages or DEFAULT_FETCH
        if limit > MAX_FETCH:
            raise InvalidArgument(f"max_messages must be at most {MAX_FETCH}")
        self._queues.connected(user_id)
        return self._queues.pending(user_id, limit, self._fetch_budget)

    def acknowledge(self, user_id: str, message_ids: list[str]) -> int:
        if not message_ids:
            raise InvalidArgument("message_ids must name at least one message")
        if len(message_ids) > MAX_ACK_IDS:
            raise InvalidArgument(f"message_ids may hold at most {MAX_ACK_IDS} ids")
        self._queues.connected(user_id)
        return self._queues.acknowledge(user_id, message_ids)

    async def subscribe(
        self, user_id: str, still_allowed: Callable[[], Awaitable[object]]
    ) -> AsyncGenerator[Message, None]:
        """What is queued, then each arrival, each message once per stream (until it is
        acknowledged or expires; a new stream gets it again).

        `still_allowed` is awaited every `revalidate_seconds` and ends the stream by
        raising (a revoked token); a relay shutting down ends it with UNAVAILABLE.
        Close the iterator (contextlib.aclosing) so the watch is released at once.
        """
        loop = asyncio.get_running_loop()
        wakeup = self._queues.watch(user_id)
        delivered: set[str] = set()
        recheck_at = loop.time() + self._revalidate
        try:
            while True:
                wakeup.clear()  # before reading, so an arrival during the yields is not missed
                pending = self._queues.pending(user_id)
                delivered &= {m.message_id for m in pending}
                for message in pending:
                    if message.message_id not in delivered:
                        delivered.add(message.message_id)
                        yield message
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(recheck_at):
                        await _first_of(wakeup, self._queues.closing)
                if self._queues.closing.is_set():
                    raise Unavailable("the relay is restarting; subscribe again")
                if loop.time() >= recheck_at:
                    await still_allowed()
                    recheck_at = loop.time() + self._revalidate
        finally:
            self._queues.unwatch(user_id, wakeup)

    def auth_failed(self, address: str) -> None:
        """Leaves an auth_failed event (per address, at most once a minute)."""
        self._queues.announce(audit_events.AUTH_FAILED, "", {"ip": address})

    def stats(self) -> RelayStats:
        return self._queues.stats()


async def _first_of(first: asyncio.Event, second: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
