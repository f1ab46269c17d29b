"""Memory-only message queues: one per recipient, bounded, expiring, wiped on delete.

Nothing here touches the disk. All methods run on the event loop thread (the relay has
no blocking work), so there is no locking: each call is atomic with respect to others.
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from services.common import audit_events, validation
from services.common.audit_events import AuditRecord, AuditSink
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.ratelimit import SlidingWindowLimiter
from services.relay.model import MESSAGE_OVERHEAD_BYTES, Message, RelayLimits, RelayStats


class _Mailbox:
    __slots__ = ("cost", "messages", "recipient", "wakeups")

    def __init__(self, recipient: str) -> None:
        self.recipient = recipient  # one string per recipient, shared by the expiry heap
        self.messages: OrderedDict[str, Message] = OrderedDict()
        self.cost = 0
        self.wakeups: set[asyncio.Event] = set()


class MessageQueues:
    def __init__(
        self,
        limits: RelayLimits,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits
        self._audit = audit
        self._clock = clock
        # Security events, at most one per kind and key a minute; never who messages whom.
        self._announced = SlidingWindowLimiter(1, 60.0)
        self._boxes: dict[str, _Mailbox] = {}
        self._expiry: list[tuple[float, str, str]] = []  # (expire time, message id, recipient)
        self._total_cost = 0
        self._total_messages = 0
        self._recipients = 0  # mailboxes holding at least one message
        self._subscribers = 0
        self._total_body_bytes = 0
        self._senders = SlidingWindowLimiter(limits.sends_per_minute, 60.0)
        self.closing = asyncio.Event()

    def ttl(self, requested: float | None) -> float:
        if requested is None:
            return self.limits.default_ttl
        if requested <= 0 or requested > self.limits.max_ttl:
            raise InvalidArgument(
                f"ttl must be more than 0 and at most {int(self.limits.max_ttl)} seconds"
            )
        return requested

    def admit(
        self, sender_id: str, recipient_id: str, body: bytes, requested_ttl: float | None
    ) -> float:
        """Checks a send before the recipient is looked up; returns the TTL to use.

        Counts against the sender's rate limit, so floods are stopped before they cost
        an identity lookup.
        """
        validation.user_id(recipient_id, "recipient_id")
        if not body:
            raise InvalidArgument("body is required: the end-to-end encrypted message")
        if len(body) > self.limits.max_body_bytes:
            raise ResourceExhausted(
                f"body is {len(body)} bytes; the limit is {self.limits.max_body_bytes}"
            )
        ttl = self.ttl(requested_ttl)
        wait = self._senders.acquire(sender_id)
        if wait is not None:
            self.announce(audit_events.RATE_LIMIT_EXCEEDED, sender_id, {"limit": "relay_sends"})
            raise ResourceExhausted("you are sending too fast", retry_after=wait)
        return ttl

    def announce(self, action: str, user_id: str, details: dict[str, str]) -> None:
        key = f"{action}:{user_id}:{sorted(details.items())}"
        if self._announced.acquire(key) is None:
            self._audit.record(AuditRecord(action, user_id, details))

    def send(self, sender_id: str, recipient_id: str, body: bytes, ttl: float) -> Message:
        """Queues an admitted message for an active recipient, if there is room."""
        box = self._boxes.get(recipient_id)
        cost = len(body) + MESSAGE_OVERHEAD_BYTES
        if box is not None and (
            len(box.messages) >= self.limits.max_queue_messages
            or box.cost + cost > self.limits.max_queue_bytes
        ):
            self.announce(audit_events.CAPACITY_EXCEEDED, "", {"scope": "recipient_queue"})
            raise ResourceExhausted(
                "the recipient's queue is full; try again after they read their messages"
            )
        if self._total_cost + cost > self.limits.max_total_bytes:
            self.announce(audit_events.CAPACITY_EXCEEDED, "", {"scope": "relay_total"})
            raise ResourceExhausted("the relay is at capacity; try again later", retry_after=30)
        now = self._clock()
        # 96 random bits: ids only name messages inside one recipient's own queue.
        message = Message(secrets.token_urlsafe(12), sender_id, bytearray(body), now, now + ttl)
        if box is None:
            box = self._boxes[recipient_id] = _Mailbox(recipient_id)
        box.messages[message.message_id] = message
        if len(box.messages) == 1:
            self._recipients += 1
        box.cost += cost
        self._total_cost += cost
        self._total_messages += 1
        self._total_body_bytes += len(body)
        heapq.heappush(self._expiry, (message.expire_time, message.message_id, box.recipient))
        for wakeup in box.wakeups:
            wakeup.set()
        return message

    def pending(
        self, recipient_id: str, limit: int | None = None, max_bytes: int | None = None
    ) -> list[Message]:
        """Unexpired messages for a recipient, oldest first; nothing is removed.

        At most `limit` messages whose bodies add up to at most `max_bytes` (but always
        the first one), so a batch fits in one gRPC message.
        """
        box = self._boxes.get(recipient_id)
        if box is None:
            return []
        now = self._clock()
        batch: list[Message] = []
        size = 0
        for message in box.messages.values():
            if message.expire_time <= now:
                continue
            size += message.cost
            if (limit is not None and len(batch) >= limit) or (
                max_bytes is not None and batch and size > max_bytes
            ):
                break
            batch.append(message)
        return batch

    def acknowledge(self, recipient_id: str, message_ids: list[str]) -> int:
        box = self._boxes.get(recipient_id)
        if box is None:
            return 0
        removed = 0
        for message_id in message_ids:
            message = box.messages.pop(message_id, None)
            if message is not None:
                self._forget(box, message)
                removed += 1
        self._drop_if_empty(recipient_id, box)
        return removed

    def _forget(self, box: _Mailbox, message: Message) -> None:
        if not box.messages:
            self._recipients -= 1
        box.cost -= message.cost
        self._total_cost -= message.cost
        self._total_messages -= 1
        self._total_body_bytes -= len(message.body)
        message.wipe()

    def _drop_if_empty(self, recipient_id: str, box: _Mailbox) -> None:
        if not box.messages and not box.wakeups:
            del self._boxes[recipient_id]

    def expire(self) -> int:
        """Deletes every expired message; returns how many."""
        now = self._clock()
        removed = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, message_id, recipient_id = heapq.heappop(self._expiry)
            box = self._boxes.get(recipient_id)
            message = box.messages.pop(message_id, None) if box else None
            if box is not None and message is not None:
                self._forget(box, message)
                self._drop_if_empty(recipient_id, box)
                removed += 1
        # Entries of acknowledged messages linger until their expiry time; rebuild the heap
        # when they dominate so its memory stays proportional to what is queued.
        if len(self._expiry) > 2 * self._total_messages + 1024:
            self._expiry = [
                (m.expire_time, m.message_id, recipient)
                for recipient, box in self._boxes.items()
                for m in box.messages.values()
            ]
            heapq.heapify(self._expiry)
        return removed

    def watch(self, recipient_id: str) -> asyncio.Event:
        """An event set whenever a message arrives for the recipient."""
        wakeup = asyncio.Event()
        self._boxes.setdefault(recipient_id, _Mailbox(recipient_id)).wakeups.add(wakeup)
        self._subscribers += 1
        return wakeup

    def unwatch(self, recipient_id: str, wakeup: asyncio.Event) -> None:
        box = self._boxes.get(recipient_id)
        if box is not None:
            if wakeup in box.wakeups:
                box.wakeups.discard(wakeup)
                self._subscribers -= 1
            self._drop_if_empty(recipient_id, box)

    def stats(self) -> RelayStats:
        return RelayStats(
            queued_messages=self._total_messages,
            queued_bytes=self._total_body_bytes,
            recipients=self._recipients,
            subscribers=self._subscribers,
        )
