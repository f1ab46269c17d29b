"""Relay rules, independent of gRPC: what a send must pass and in which order, fetch and
acknowledgement limits, and live delivery to a subscriber.

Callers are already authenticated. The queues are a `QueueStore`: this process's memory,
or Redis shared by every relay replica; the rules here are the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)

from services.common import audit_events
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.relay.model import (
    Message,
    Outgoing,
    QueueStore,
    RecipientDirectory,
    RelayStats,
    Signal,
    at_position,
)

DEFAULT_FETCH = 100
MAX_FETCH = 1000
MAX_ACK_IDS = 1000
# What a live stream reads per round (it reads again at once while rounds come full).
STREAM_BATCH = 100
MAX_CLIENT_MESSAGE_ID_CHARS = 64
# Messages in one multi-recipient send.
MAX_SEND_BATCH = 100
# A stream that sent a batch within this long counts as busy (see `exchange`).
BUSY_SECONDS = 0.01


class Relay:
    def __init__(
        self,
        queues: QueueStore,
        recipients: RecipientDirectory,
        *,
        revalidate_seconds: float,
        fetch_budget_bytes: int,
        coalesce_seconds: float = 0.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._queues = queues
        self._recipients = recipients
        self._revalidate = revalidate_seconds
        self._fetch_budget = fetch_budget_bytes
        self._coalesce = coalesce_seconds
        self._sleep = sleep

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
        _check_client_message_id(client_message_id)
        # Admission (shape, size, TTL, the sender's rate) comes before the identity lookup,
        # so a flood costs no call to identity; room in the queues is checked last.
        ttl = await self._queues.admit(sender_id, recipient_id, body, requested_ttl)
        if not await self._recipients.is_active(recipient_id):
            raise NotFound("no active user with that recipient_id")
        return await self._queues.send(sender_id, recipient_id, body, ttl, client_message_id)

    async def send_many(
        self, sender_id: str, messages: Sequence[Outgoing], requested_ttl: float | None
    ) -> list[Message]:
        """One message to each of several recipients (a group message), all or none.

        Each is admitted as `send` admits one (shape, size, TTL, the sender's rate), then
        every recipient is looked up, then the store queues all or refuses all. A
        failure names the message's position."""
        if not messages:
            raise InvalidArgument("messages must hold at least one message")
        if len(messages) > MAX_SEND_BATCH:
            raise InvalidArgument(f"messages may hold at most {MAX_SEND_BATCH} messages")
        recipients: set[str] = set()
        for position, out in enumerate(messages):
            with at_position(position):
                _check_client_message_id(out.client_message_id)
                if out.recipient_id in recipients:
                    raise InvalidArgument(
                        "recipient_id names a recipient a second time; send each recipient "
                        "one message"
                    )
            recipients.add(out.recipient_id)
        ttl = await self._queues.admit_many(sender_id, messages, requested_ttl)
        active = await self._recipients.are_active([m.recipient_id for m in messages])
        for position, is_active in enumerate(active):
            if not is_active:
                raise NotFound(
                    f"messages[{position}]: no active user with that recipient_id; nothing "
                    "was queued"
                )
        return await self._queues.send_many(sender_id, messages, ttl)

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

    async def exchange(
        self,
        user_id: str,
        acknowledgements: AsyncIterator[list[str]],
        still_allowed: Callable[[], Awaitable[object]],
    ) -> AsyncGenerator[list[Message], None]:
        """`subscribe` in batches, with acknowledgements coming in on the same stream.

        Yields lists of messages (whatever is waiting, up to STREAM_BATCH and one gRPC
        message's worth) while acknowledgements from `acknowledgements` are applied as
        they arrive; an invalid one (more than MAX_ACK_IDS ids) ends the stream. Each
        message comes once per stream, as with `subscribe`, whose caps it shares.

        A busy stream (one that sent within BUSY_SECONDS) waits `coalesce_seconds`
        after an arrival before it reads, so one response carries what arrives in that
        time rather than one message each; an idle one answers at once. Measured under
        load: 1.1 messages per response without, 4.6 with 3 ms, and more messages per
        second at a lower median latency (fewer responses to write and acknowledge).
        """
        loop = asyncio.get_running_loop()
        wakeup = await self._queues.watch(user_id)
        acked = loop.create_task(self._apply(user_id, acknowledgements))
        cursor = 0
        last_sent = 0.0
        recheck_at = loop.time() + self._revalidate
        try:
            while True:
                wakeup.clear()  # before reading, so an arrival during the yield is not missed
                batch = await self._queues.pending(
                    user_id, STREAM_BATCH, self._fetch_budget, after=cursor
                )
                if batch:
                    cursor = max(cursor, *(message.seq for message in batch))
                    yield batch
                    last_sent = loop.time()
                    continue  # read on at once: more may be waiting
                # Once the client stops sending (acknowledgements end), only arrivals wake;
                # an acknowledgement that failed ends the stream.
                listening = _failed_or_running(acked)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(recheck_at):
                        await _first_of(wakeup, self._queues.closing, listening)
                if self._coalesce and loop.time() - last_sent < BUSY_SECONDS:
                    await self._sleep(self._coalesce)  # busy: let a few more arrive
                _failed_or_running(acked)
                if self._queues.closing.is_set():
                    raise Unavailable("the relay is restarting; subscribe again")
                if loop.time() >= recheck_at:
                    await still_allowed()
                    recheck_at = loop.time() + self._revalidate
        finally:
            acked.cancel()
            with contextlib.suppress(BaseException):
                await acked
            self._queues.unwatch(user_id, wakeup)

    async def _apply(self, user_id: str, acknowledgements: AsyncIterator[list[str]]) -> None:
        async for message_ids in acknowledgements:
            if len(message_ids) > MAX_ACK_IDS:
                raise InvalidArgument(
                    f"acknowledged_message_ids may hold at most {MAX_ACK_IDS} ids per request"
                )
            if message_ids:
                await self._queues.acknowledge(user_id, message_ids)

    def auth_failed(self, address: str) -> None:
        """Leaves an auth_failed event (per address, at most once a minute)."""
        self._queues.announce(audit_events.AUTH_FAILED, "", {"ip": address})

    async def stats(self) -> RelayStats:
        return await self._queues.stats()


async def _first_of(first: Signal, second: Signal, task: asyncio.Task[None] | None = None) -> None:
    """Returns when either signal is set (or `task`, if given, is done): one future,
    resolved by whichever comes first, and no task per signal."""
    if first.is_set() or second.is_set() or (task is not None and task.done()):
        return
    bell: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def done(_: object) -> None:
        if not bell.done():
            bell.set_result(None)

    first.ring(bell)
    second.ring(bell)
    if task is not None:
        task.add_done_callback(done)
    try:
        await bell
    finally:
        first.unring(bell)
        second.unring(bell)
        if task is not None:
            task.remove_done_callback(done)


def _failed_or_running(task: asyncio.Task[None]) -> asyncio.Task[None] | None:
    """The task while it runs; None once it ended well; its error if it failed."""
    if not task.done():
        return task
    failure = task.exception()
    if failure is not None:
        raise failure
    return None


def _check_client_message_id(client_message_id: str) -> None:
    if len(client_message_id) > MAX_CLIENT_MESSAGE_ID_CHARS or not (
        client_message_id.isascii() and client_message_id.isprintable()
    ):
        raise InvalidArgument(
            f"client_message_id must be at most {MAX_CLIENT_MESSAGE_ID_CHARS} printable "
            "ASCII characters (a UUID, say)"
        )
