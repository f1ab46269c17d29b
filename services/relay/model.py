"""What the relay's rules, queues and transport share: messages, limits, statistics, and
what the relay asks of identity. Domain, queues and servicer import from here; this
module imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import ServiceError


class Signal(asyncio.Event):
    """An asyncio.Event that a waiter can also watch through a future of its own, so that
    one stream waits for its wakeup, the relay's shutdown and its acknowledgements with
    one future instead of a task per event (three tasks per wait were a measurable part
    of each streamed response)."""

    def __init__(self) -> None:
        super().__init__()
        self._rung: set[asyncio.Future[None]] = set()

    def set(self) -> None:
        super().set()
        for bell in self._rung:
            if not bell.done():
                bell.set_result(None)

    def ring(self, bell: asyncio.Future[None]) -> None:
        """Resolves `bell` when this is set (until `unring`)."""
        self._rung.add(bell)

    def unring(self, bell: asyncio.Future[None]) -> None:
        self._rung.discard(bell)


# Bookkeeping per queued message beyond its body (object, id, dict slots, heap entry),
# counted against the caps so that many tiny messages cannot outgrow them.
MESSAGE_OVERHEAD_BYTES = 512


@dataclass(frozen=True)
class RelayLimits:
    max_body_bytes: int = 64 * 1024
    default_ttl: float = 24 * 3600.0
    max_ttl: float = 7 * 24 * 3600.0
    max_queue_messages: int = 1000
    max_queue_bytes: int = 8 * 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024
    sends_per_minute: int = 600
    # What one sender may have waiting in all queues together (see services.relay.queues).
    max_sender_messages: int = 1000
    max_sender_bytes: int = 16 * 1024 * 1024
    # Lifetime cap while the recipient has not connected to this relay since it started.
    unseen_recipient_ttl: float = 6 * 3600.0
    # Open SubscribeMessages streams, per user and in all.
    max_streams_per_user: int = 8
    max_streams: int = 2000


# How long a send's `client_message_id` is remembered (or the message's TTL if shorter):
# a retry within it returns the first send's message instead of queueing another.
IDEMPOTENCY_SECONDS = 600.0


class Message:
    __slots__ = ("body", "expire_time", "message_id", "promised_expire_time", "send_time",
                 "sender_id", "seq")  # fmt: skip

    def __init__(
        self,
        message_id: str,
        sender_id: str,
        body: bytearray | memoryview,
        send_time: float,
        expire: float,
        promised_expire: float | None = None,
        seq: int = 0,
    ) -> None:
        self.message_id = message_id
        # Position in the recipient's queue, increasing with each send: a live stream
        # remembers the highest it delivered (its cursor) and reads only what follows.
        self.seq = seq
        self.sender_id = sender_id
        # The body as stored (a view of the memory store's record), not a copy.
        self.body = body
        self.send_time = send_time
        self.expire_time = expire
        # The lifetime the sender was granted; expire_time is shorter while the recipient
        # has never connected, and becomes this once they do.
        self.promised_expire_time = expire if promised_expire is None else promised_expire

    @property
    def cost(self) -> int:
        return len(self.body) + MESSAGE_OVERHEAD_BYTES

    def wipe(self) -> None:
        """Best effort: overwrite the body we own (copies made by gRPC are not ours)."""
        self.body[:] = bytes(len(self.body))


@dataclass(frozen=True)
class Outgoing:
    """One message of a multi-recipient send."""

    recipient_id: str
    body: bytes
    client_message_id: str = ""


@dataclass(frozen=True)
class RelayStats:
    queued_messages: int
    queued_bytes: int
    charged_bytes: int  # what counts against max_total_bytes: bodies plus per-message overhead
    recipients: int
    subscribers: int


class QueueStore(Protocol):
    """Recipients' queues: in this process's memory (services.relay.queues) or in Redis
    shared by every relay replica (services.relay.redis_queues). Both keep the same
    rules; the relay domain sees only this."""

    limits: RelayLimits
    closing: Signal  # set when the relay begins to shut down: streams end

    async def admit(
        self, sender_id: str, recipient_id: str, body: bytes, requested_ttl: float | None
    ) -> float:
        """Checks a send's shape and the sender's rate before the recipient is looked up;
        returns the TTL to use. Counts against the sender's rate."""
        ...

    async def admit_many(
        self, sender_id: str, messages: Sequence[Outgoing], requested_ttl: float | None
    ) -> float:
        """`admit` for each message of a batch, in order, each counting against the
        sender's rate; a refusal names the message's position (`at_position`)."""
        ...

    async def send(
        self,
        sender_id: str,
        recipient_id: str,
        body: bytes,
        ttl: float,
        client_message_id: str = "",
    ) -> Message:
        """Queues an admitted message if every cap allows (ResourceExhausted otherwise),
        and wakes the recipient's live streams. A repeated `client_message_id` from the
        same sender to the same recipient returns the first message, queued once."""
        ...

    async def send_many(
        self, sender_id: str, messages: Sequence[Outgoing], ttl: float
    ) -> list[Message]:
        """Queues admitted messages to distinct recipients, all or none: if one would
        break a cap (counting those before it in the batch), ResourceExhausted naming its
        position and nothing is queued. Repeated client_message_ids return their first
        message, as in `send`, and count against nothing."""
        ...

    async def connected(self, recipient_id: str) -> None:
        """The recipient fetched, subscribed or acknowledged (see `unseen_recipient_ttl`)."""
        ...

    async def pending(
        self,
        recipient_id: str,
        limit: int | None = None,
        max_bytes: int | None = None,
        after: int = 0,
    ) -> list[Message]:
        """Unexpired messages with `seq` above `after`, oldest first; nothing removed.
        At most `limit` of them, whose costs add up to at most `max_bytes` (but always
        the first one)."""
        ...

    async def acknowledge(self, recipient_id: str, message_ids: list[str]) -> int:
        """Deletes the named messages; returns how many existed (each counts once, however
        many replicas are asked at the same time)."""
        ...

    async def expire(self) -> int:
        """Deletes every expired message; returns how many."""
        ...

    async def watch(self, recipient_id: str) -> Signal:
        """An event set whenever a message arrives for the recipient, from any replica.
        When this returns, no arrival can be missed: read the queue after it."""
        ...

    def unwatch(self, recipient_id: str, wakeup: asyncio.Event) -> None: ...

    def announce(self, action: str, user_id: str, details: dict[str, str]) -> None:
        """Leaves a security audit event, at most one per kind and key a minute."""
        ...

    async def stats(self) -> RelayStats: ...

    def last_stats(self) -> RelayStats:
        """The latest statistics known without waiting (for metrics gauges)."""
        ...

    async def close(self) -> None: ...


class RecipientDirectory(Protocol):
    """What the relay asks identity: is this user someone we may queue for?"""

    async def is_active(self, user_id: str) -> bool: ...

    async def are_active(self, user_ids: Sequence[str]) -> list[bool]:
        """`is_active` for each of them, in order."""
        ...


@contextlib.contextmanager
def at_position(position: int) -> Iterator[None]:
    """Names the message of a batch that an error is about."""
    try:
        yield
    except ServiceError as exc:
        exc.message = f"messages[{position}]: {exc.message}"
        exc.args = (exc.message,)
        raise
