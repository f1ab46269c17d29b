"""Relay rules, independent of gRPC: what a send must pass and in which order, fetch and
acknowledgement limits, and live delivery to a subscriber.

Callers are already authenticated. The queues are a `QueueStore`: this process's memory,
or Redis shared by every relay replica; the rules here are the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from services.common import audit_events
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.relay.model import Message, QueueStore, RecipientDirectory, RelayStats

DEFAULT_FETCH = 100
MAX_FETCH = 1000
MAX_ACK_IDS = 1000
# What a live stream reads per round (it reads again at once while rounds come full).
STREAM_BATCH = 100
MAX_CLIENT_MESSAGE_ID_CHARS = 64


class Relay:
    def __init__(
        self,
        queues: QueueStore,
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
        self,
        sender_id: str,
        recipient_id: str,
        body: bytes,
        requested_ttl: float | None,
        client_message_id: str = "",
    ) -> Message:
        """Queues a message; a repeated `client_message_id` (the sender's retry after a
        lost reply) returns the first send's message instead of queueing it again."""
        if len(client_message_id) > MAX_CLIENT_MESSAGE_ID_CHARS or not (
            client_message_id.isascii() and client_message_id.isprintable()
        ):
            raise InvalidArgument(
                f"client_message_id must be at most {MAX_CLIENT_MESSAGE_ID_CHARS} printable "
                "ASCII characters (a UUID, say)"
            )
        # Admission (shape, size, TTL, the sender's rate) comes before the identity lookup,
        # so a flood costs no call to identity; room in the queues is checked last.
        ttl = await self._queues.admit(sender_id, recipient_id, body, requested_ttl)
        if not await self._recipients.is_active(recipient_id):
            raise NotFound("no active user with that recipient_id")
        return await self._queues.send(sender_id, recipient_id, body, ttl, client_message_id)

    async def fetch(self, user_id: str, max_messages: int) -> list[Message]:
        """The oldest pending messages that fit in one gRPC reply; nothing is removed."""
        limit = max_messages or DEFAULT_FETCH
        if limit > MAX_FETCH:
            raise InvalidArgument(f"max_messages must be at most {MAX_FETCH}")
        await self._queues.connected(user_id)
        return await self._queues.pending(user_id, limit, self._fetch_budget)

    async def acknowledge(self, user_id: str, message_ids: list[str]) -> int:
        if not message_ids:
            raise InvalidArgument("message_ids must name at least one message")
        if len(message_ids) > MAX_ACK_IDS:
            raise InvalidArgument(f"message_ids may hold at most {MAX_ACK_IDS} ids")
        await self._queues.connected(user_id)
        return await self._queues.acknowledge(user_id, message_ids)

    async def subscribe(
        self, user_id: str, still_allowed: Callable[[], Awaitable[object]]
    ) -> AsyncGenerator[Message, None]:
        """What is queued, then each arrival, each message once per stream (until it is
        acknowledged or expires; a new stream gets it again).

        The watch is in place before the first read, so nothing sent in between is
        missed; the stream's cursor (the highest `seq` it delivered) means a wakeup that
        comes twice, or a re-read after the store reconnected, delivers nothing twice.

        `still_allowed` is awaited every `revalidate_seconds` and ends the stream by
        raising (a revoked token); a relay shutting down ends it with UNAVAILABLE.
        Close the iterator (contextlib.aclosing) so the watch is released at once.
        """
        loop = asyncio.get_running_loop()
        wakeup = await self._queues.watch(user_id)
        cursor = 0
        recheck_at = loop.time() + self._revalidate
        try:
            while True:
                wakeup.clear()  # before reading, so an arrival during the yields is not missed
                batch = await self._queues.pending(user_id, STREAM_BATCH, after=cursor)
                for message in batch:
                    cursor = max(cursor, message.seq)
                    yield message
                if len(batch) == STREAM_BATCH:
                    continue  # more are waiting: read on before sleeping
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

    async def stats(self) -> RelayStats:
        return await self._queues.stats()


async def _first_of(first: asyncio.Event, second: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
