"""Memory-only message queues: one per recipient, bounded, expiring, wiped on delete.

Nothing here touches the disk. All methods run on the event loop thread (the relay has
no blocking work), so there is no locking: each call is atomic with respect to others.

Fairness, so that one actor cannot fill the relay for everyone:
- each sender may have at most `max_sender_messages` / `max_sender_bytes` waiting;
- once the relay is more than half full, a sender's byte allowance shrinks with the
  free space left (never below one largest message), so the heaviest senders are
  stopped first and someone with little queued can still send until it is truly full;
- a message to a recipient who has not connected (fetched, subscribed, acknowledged)
  since the relay started lives at most `unseen_recipient_ttl`, so queues for
  recipients that never come drain in hours, not days; when the recipient connects,
  their messages get the full lifetime granted at sending;
- open streams are capped per user and in all.

Compact records, so that a queued message costs little beyond its body (bench:
services/relay memory per queued message): each message is one bytearray, a fixed
header (sending time, expiry, promised expiry, the sender's slot) followed by the body,
held in its mailbox's dict under its sequence number. Message ids are not stored: they
are this process's random prefix followed by the sequence number, so an id from before
a restart never names a message after it. Expiry is scheduled per mailbox (its earliest
expiry in a heap), not per message.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from services.common import audit_events, validation
from services.common.audit_events import AuditRecord, AuditSink
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.ratelimit import SlidingWindowLimiter
from services.relay.model import (
    IDEMPOTENCY_SECONDS,
    MESSAGE_OVERHEAD_BYTES,
    Message,
    Outgoing,
    RelayLimits,
    RelayStats,
    Signal,
    at_position,
)

# How many recipients the relay remembers as having connected (least recent forgotten;
# a forgotten one only gets the shorter unseen lifetime for new messages).
SEEN_RECIPIENTS = 100_000


# A stored message: sending time, expiry, promised expiry (see Message), sender slot;
# then the body.
_HEADER = struct.Struct("<dddI")
_EXPIRE_AT = struct.calcsize("<d")


class _Load:
    """What one sender has waiting in all queues, and the slot naming them in records."""

    __slots__ = ("cost", "messages", "slot")

    def __init__(self, slot: int) -> None:
        self.messages = 0
        self.cost = 0
        self.slot = slot


class _Mailbox:
    __slots__ = ("cost", "due", "messages", "recipient", "wakeups")

    def __init__(self, recipient: str) -> None:
        self.recipient = recipient  # one string per recipient, shared by the schedule
        self.messages: dict[int, bytearray] = {}  # seq -> record, oldest first
        self.cost = 0
        self.wakeups: set[Signal] = set()
        # No message expires before this (it may be earlier than the first real expiry:
        # deletions and longer lives do not raise it; the sweep corrects it).
        self.due = math.inf


def _expire_time(record: bytearray) -> float:
    return float(_HEADER.unpack_from(record)[1])


class MessageQueues:
    """The in-process `QueueStore` (services.relay.model): one relay, memory only."""

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
        self._due: list[tuple[float, str]] = []  # (a mailbox's due time, recipient)
        # Message ids: this prefix, then the sequence number in hex. Random per process,
        # so an id kept from before a restart names nothing after it.
        self._id_prefix = secrets.token_urlsafe(6)
        # One sequence for every mailbox: it only grows (so a stream's cursor stays right
        # however often its mailbox comes and goes), and ids are unique in the relay.
        self._last_seq = 0
        self._total_cost = 0
        self._total_messages = 0
        self._recipients = 0  # mailboxes holding at least one message
        self._subscribers = 0
        self._total_body_bytes = 0
        self._senders = SlidingWindowLimiter(limits.sends_per_minute, 60.0)
        self._loads: dict[str, _Load] = {}
        self._slots: list[str] = []  # sender id by record slot ("" when free)
        self._free_slots: list[int] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        # (sender, recipient, client_message_id) -> the first message's (seq, send time,
        # expiry), for idempotent sends; forgotten after IDEMPOTENCY_SECONDS (or the
        # message's TTL) by `expire`.
        self._sent: dict[tuple[str, str, str], tuple[int, float, float]] = {}
        self._sent_expiry: list[tuple[float, tuple[str, str, str]]] = []
        self.closing = Signal()

    async def admit(
        self, sender_id: str, recipient_id: str, body: bytes, requested_ttl: float | None
    ) -> float:
        """Checks a send before the recipient is looked up; returns the TTL to use.

        Counts against the sender's rate limit, so floods are stopped before they cost
        an identity lookup.
        """
        ttl = check_send(self.limits, recipient_id, body, requested_ttl)
        wait = self._senders.acquire(sender_id)
        if wait is not None:
            self.announce(audit_events.RATE_LIMIT_EXCEEDED, sender_id, {"limit": "relay_sends"})
            raise ResourceExhausted("you are sending too fast", retry_after=wait)
        return ttl

    async def admit_many(
        self, sender_id: str, messages: Sequence[Outgoing], requested_ttl: float | None
    ) -> float:
        ttl = 0.0
        for position, out in enumerate(messages):
            with at_position(position):
                ttl = await self.admit(sender_id, out.recipient_id, out.body, requested_ttl)
        return ttl

    def announce(self, action: str, user_id: str, details: dict[str, str]) -> None:
        key = f"{action}:{user_id}:{sorted(details.items())}"
        if self._announced.acquire(key) is None:
            self._audit.record(AuditRecord(action, user_id, details))

    def sender_allowance(self) -> int:
        """Bytes one sender may have waiting now (shrinks once the relay is half full)."""
        return sender_allowance(self.limits, self._total_cost)

    # --- ids and records --------------------------------------------------------------

    def _message_id(self, seq: int) -> str:
        return f"{self._id_prefix}{seq:x}"

    def _seq_of(self, message_id: str) -> int | None:
        """The sequence number an id of ours names; None for anything else (exactly
        our own spelling: int() alone would also take '+1f', '1_f' or ' 1f')."""
        if not message_id.startswith(self._id_prefix):
            return None
        digits = message_id[len(self._id_prefix) :]
        try:
            seq = int(digits, 16)
        except ValueError:
            return None
        return seq if f"{seq:x}" == digits else None

    def _message(self, seq: int, record: bytearray) -> Message:
        """What the domain and the transport see of a stored record; the body is a view
        of the record, not a copy (and is wiped with it)."""
        send_time, expire, promised, slot = _HEADER.unpack_from(record)
        return Message(
            self._message_id(seq),
            self._slots[slot],
            memoryview(record)[_HEADER.size :],
            send_time,
            expire,
            promised,
            seq,
        )

    def _load(self, sender_id: str) -> _Load:
        load = self._loads.get(sender_id)
        if load is None:
            if self._free_slots:
                slot = self._free_slots.pop()
                self._slots[slot] = sender_id
            else:
                slot = len(self._slots)
                self._slots.append(sender_id)
            load = self._loads[sender_id] = _Load(slot)
        return load

    def _schedule(self, box: _Mailbox, expire: float) -> None:
        if expire < box.due:
            box.due = expire
            heapq.heappush(self._due, (expire, box.recipient))

    # --- QueueStore -------------------------------------------------------------------

    async def send(
        self,
        sender_id: str,
        recipient_id: str,
        body: bytes,
        ttl: float,
        client_message_id: str = "",
    ) -> Message:
        """Queues an admitted message for an active recipient, if there is room."""
        first = self._repeated(sender_id, recipient_id, body, client_message_id)
        if first is not None:
            return first
        box = self._boxes.get(recipient_id)
        queue = (len(box.messages), box.cost) if box is not None else (0, 0)
        load = self._loads.get(sender_id)
        refusal = over_caps(
            self.limits,
            queue=queue,
            sender=(load.messages, load.cost) if load is not None else (0, 0),
            total_cost=self._total_cost,
            cost=len(body) + MESSAGE_OVERHEAD_BYTES,
        )
        if refusal is not None:
            raise self.refuse(refusal, sender_id)
        return self._enqueue(sender_id, recipient_id, body, ttl, client_message_id)

    async def send_many(
        self, sender_id: str, messages: Sequence[Outgoing], ttl: float
    ) -> list[Message]:
        """All or none (see QueueStore.send_many): every cap is checked for the whole
        batch first; with no await in between, nothing else runs before it is queued."""
        load = self._loads.get(sender_id)
        sender = (load.messages, load.cost) if load is not None else (0, 0)
        total = self._total_cost
        added: dict[str, tuple[int, int]] = {}  # recipient -> (messages, cost) of this batch
        for position, out in enumerate(messages):
            key = (sender_id, out.recipient_id, out.client_message_id)
            if out.client_message_id and key in self._sent:
                continue
            box = self._boxes.get(out.recipient_id)
            queued, queue_cost = (len(box.messages), box.cost) if box is not None else (0, 0)
            more, more_cost = added.get(out.recipient_id, (0, 0))
            cost = len(out.body) + MESSAGE_OVERHEAD_BYTES
            refusal = over_caps(
                self.limits,
                queue=(queued + more, queue_cost + more_cost),
                sender=sender,
                total_cost=total,
                cost=cost,
            )
            if refusal is not None:
                raise self.refuse(refusal, sender_id, position)
            added[out.recipient_id] = (more + 1, more_cost + cost)
            sender = (sender[0] + 1, sender[1] + cost)
            total += cost
        return [
            self._repeated(sender_id, out.recipient_id, out.body, out.client_message_id)
            or self._enqueue(sender_id, out.recipient_id, out.body, ttl, out.client_message_id)
            for out in messages
        ]

    def _repeated(
        self, sender_id: str, recipient_id: str, body: bytes, client_message_id: str
    ) -> Message | None:
        """The first send of a repeated client_message_id, if this is a repeat."""
        if not client_message_id:
            return None
        first = self._sent.get((sender_id, recipient_id, client_message_id))
        if first is None:
            return None
        seq, sent_at, expire = first
        return Message(self._message_id(seq), sender_id, bytearray(body), sent_at, expire)

    def _enqueue(
        self, sender_id: str, recipient_id: str, body: bytes, ttl: float, client_message_id: str
    ) -> Message:
        """Queues a message whose caps were checked, and wakes the recipient's streams."""
        box = self._boxes.get(recipient_id)
        cost = len(body) + MESSAGE_OVERHEAD_BYTES
        now = self._clock()
        promised = now + ttl
        expire = promised
        if recipient_id not in self._seen:
            expire = min(expire, now + self.limits.unseen_recipient_ttl)
        if box is None:
            box = self._boxes[recipient_id] = _Mailbox(recipient_id)
        self._last_seq += 1
        seq = self._last_seq
        load = self._load(sender_id)
        record = bytearray(_HEADER.size + len(body))
        _HEADER.pack_into(record, 0, now, expire, promised, load.slot)
        record[_HEADER.size :] = body
        if client_message_id:
            self._sent[(sender_id, recipient_id, client_message_id)] = (seq, now, expire)
            forget_at = now + min(ttl, IDEMPOTENCY_SECONDS)
            heapq.heappush(
                self._sent_expiry, (forget_at, (sender_id, recipient_id, client_message_id))
            )
        box.messages[seq] = record
        if len(box.messages) == 1:
            self._recipients += 1
        box.cost += cost
        load.messages += 1
        load.cost += cost
        self._total_cost += cost
        self._total_messages += 1
        self._total_body_bytes += len(body)
        self._schedule(box, expire)
        for wakeup in box.wakeups:
            wakeup.set()
        return self._message(seq, record)

    def refuse(self, scope: str, sender_id: str, position: int | None = None) -> ResourceExhausted:
        """The refusal for a full `scope` (see `over_caps`), announced to audit;
        `position` names the message of a batch that broke it."""
        self.announce(
            audit_events.CAPACITY_EXCEEDED, sender_id if scope == "sender" else "", {"scope": scope}
        )
        return capacity_error(scope, position)

    async def connected(self, recipient_id: str) -> None:
        self._connected(recipient_id)

    def _connected(self, recipient_id: str) -> None:
        """The recipient fetched, subscribed or acknowledged: from now on (while remembered)
        their messages live as long as their senders were granted."""
        if recipient_id in self._seen:
            self._seen.move_to_end(recipient_id)
            return
        self._seen[recipient_id] = None
        if len(self._seen) > SEEN_RECIPIENTS:
            self._seen.popitem(last=False)
        box = self._boxes.get(recipient_id)
        for record in box.messages.values() if box else ():
            _, expire, promised, _ = _HEADER.unpack_from(record)
            if expire < promised:
                struct.pack_into("<d", record, _EXPIRE_AT, promised)
        # The mailbox's due time only ever runs early; the sweep moves it on.

    async def pending(
        self,
        recipient_id: str,
        limit: int | None = None,
        max_bytes: int | None = None,
        after: int = 0,
    ) -> list[Message]:
        return self.pending_now(recipient_id, limit, max_bytes, after)

    def pending_now(
        self,
        recipient_id: str,
        limit: int | None = None,
        max_bytes: int | None = None,
        after: int = 0,
    ) -> list[Message]:
        """Unexpired messages for a recipient after `after`, oldest first; nothing is
        removed. At most `limit` messages whose bodies add up to at most `max_bytes` (but
        always the first one), so a batch fits in one gRPC message.
        """
        box = self._boxes.get(recipient_id)
        if box is None:
            return []
        now = self._clock()
        batch: list[Message] = []
        size = 0
        for seq, record in box.messages.items():
            if seq <= after or _expire_time(record) <= now:
                continue
            size += len(record) - _HEADER.size + MESSAGE_OVERHEAD_BYTES
            if (limit is not None and len(batch) >= limit) or (
                max_bytes is not None and batch and size > max_bytes
            ):
                break
            batch.append(self._message(seq, record))
        return batch

    async def acknowledge(self, recipient_id: str, message_ids: list[str]) -> int:
        box = self._boxes.get(recipient_id)
        if box is None:
            return 0
        removed = 0
        for message_id in message_ids:
            seq = self._seq_of(message_id)
            record = box.messages.pop(seq, None) if seq is not None else None
            if record is not None:
                self._forget(box, record)
                removed += 1
        self._drop_if_empty(recipient_id, box)
        return removed

    def _forget(self, box: _Mailbox, record: bytearray) -> None:
        if not box.messages:
            self._recipients -= 1
        body_bytes = len(record) - _HEADER.size
        cost = body_bytes + MESSAGE_OVERHEAD_BYTES
        box.cost -= cost
        sender_id = self._slots[_HEADER.unpack_from(record)[3]]
        load = self._loads[sender_id]
        load.messages -= 1
        load.cost -= cost
        if not load.messages:
            del self._loads[sender_id]
            self._slots[load.slot] = ""
            self._free_slots.append(load.slot)
        self._total_cost -= cost
        self._total_messages -= 1
        self._total_body_bytes -= body_bytes
        record[:] = bytes(len(record))  # best effort: copies made by gRPC are not ours

    def _drop_if_empty(self, recipient_id: str, box: _Mailbox) -> None:
        if not box.messages and not box.wakeups:
            del self._boxes[recipient_id]

    async def expire(self) -> int:
        """Deletes every expired message; returns how many."""
        now = self._clock()
        while self._sent_expiry and self._sent_expiry[0][0] <= now:
            self._sent.pop(heapq.heappop(self._sent_expiry)[1], None)
        removed = 0
        while self._due and self._due[0][0] <= now:
            due, recipient_id = heapq.heappop(self._due)
            box = self._boxes.get(recipient_id)
            if box is None or box.due != due:
                continue  # stale: the mailbox went, or an earlier entry stands for it
            box.due = math.inf
            for seq, record in list(box.messages.items()):
                expire = _expire_time(record)
                if expire <= now:
                    del box.messages[seq]
                    self._forget(box, record)
                    removed += 1
                else:
                    box.due = min(box.due, expire)
            if box.due < math.inf:
                heapq.heappush(self._due, (box.due, recipient_id))
            self._drop_if_empty(recipient_id, box)
        # Stale entries linger until their time; rebuild the heap when they dominate, so
        # its memory stays proportional to the mailboxes.
        if len(self._due) > 2 * len(self._boxes) + 1024:
            self._due = [(b.due, r) for r, b in self._boxes.items() if b.due < math.inf]
            heapq.heapify(self._due)
        return removed

    async def watch(self, recipient_id: str) -> Signal:
        """An event set whenever a message arrives for the recipient.

        Each open stream costs memory whatever it carries, so they are capped per user and
        in all (RESOURCE_EXHAUSTED): a flood of subscriptions cannot push the relay into
        an out-of-memory kill, which would drop every queued message.
        """
        box = self._boxes.get(recipient_id)
        if box is not None and len(box.wakeups) >= self.limits.max_streams_per_user:
            self.announce(audit_events.CAPACITY_EXCEEDED, recipient_id, {"scope": "user_streams"})
            raise ResourceExhausted(
                f"you have {len(box.wakeups)} live subscriptions open, the most allowed; "
                "close one before opening another"
            )
        if self._subscribers >= self.limits.max_streams:
            self.announce(audit_events.CAPACITY_EXCEEDED, "", {"scope": "relay_streams"})
            raise ResourceExhausted(
                "the relay has too many live subscriptions; fetch instead, or subscribe later",
                retry_after=30,
            )
        wakeup = Signal()
        if box is None:
            box = self._boxes[recipient_id] = _Mailbox(recipient_id)
        box.wakeups.add(wakeup)
        self._subscribers += 1
        self._connected(recipient_id)
        return wakeup

    def unwatch(self, recipient_id: str, wakeup: asyncio.Event) -> None:
        box = self._boxes.get(recipient_id)
        if box is not None:
            if wakeup in box.wakeups:
                box.wakeups.discard(wakeup)
                self._subscribers -= 1
            self._drop_if_empty(recipient_id, box)

    async def stats(self) -> RelayStats:
        return self.last_stats()

    async def close(self) -> None:
        return None

    def last_stats(self) -> RelayStats:
        return RelayStats(
            queued_messages=self._total_messages,
            queued_bytes=self._total_body_bytes,
            charged_bytes=self._total_cost,
            recipients=self._recipients,
            subscribers=self._subscribers,
        )


def check_send(
    limits: RelayLimits, recipient_id: str, body: bytes, requested_ttl: float | None
) -> float:
    """A send's shape: recipient id, body size and TTL; returns the TTL to use."""
    validation.user_id(recipient_id, "recipient_id")
    if not body:
        raise InvalidArgument("body is required: the end-to-end encrypted message")
    if len(body) > limits.max_body_bytes:
        raise ResourceExhausted(f"body is {len(body)} bytes; the limit is {limits.max_body_bytes}")
    if requested_ttl is None:
        return limits.default_ttl
    if requested_ttl <= 0 or requested_ttl > limits.max_ttl:
        raise InvalidArgument(f"ttl must be more than 0 and at most {int(limits.max_ttl)} seconds")
    return requested_ttl


def sender_allowance(limits: RelayLimits, total_cost: int) -> int:
    """Bytes one sender may have waiting when the relay holds `total_cost`: the full cap
    until half full, then shrinking with the free space (never below one message)."""
    half = limits.max_total_bytes / 2
    free = limits.max_total_bytes - total_cost
    if free >= half:
        return limits.max_sender_bytes
    floor = limits.max_body_bytes + MESSAGE_OVERHEAD_BYTES
    return max(floor, int(limits.max_sender_bytes * free / half))


def over_caps(
    limits: RelayLimits,
    *,
    queue: tuple[int, int],
    sender: tuple[int, int],
    total_cost: int,
    cost: int,
) -> str | None:
    """Which cap one more message of `cost` would break, checked in this order: the
    recipient's queue, the sender's share, the relay's total; None if it fits.

    `queue` and `sender` are (messages, cost) already waiting. The Redis store runs the
    same rules inside its send script (services/relay/lua/send.lua)."""
    messages, queue_cost = queue
    if messages >= limits.max_queue_messages or queue_cost + cost > limits.max_queue_bytes:
        return "recipient_queue"
    sent, sender_cost = sender
    if sent and (
        sent >= limits.max_sender_messages
        or sender_cost + cost > sender_allowance(limits, total_cost)
    ):
        return "sender"
    if total_cost + cost > limits.max_total_bytes:
        return "relay_total"
    return None


def capacity_error(scope: str, position: int | None = None) -> ResourceExhausted:
    """The refusal for a full `scope`; `position`: which message of a batch (nothing of
    the batch was queued)."""
    where = "" if position is None else f"messages[{position}]: nothing was queued: "
    if scope == "recipient_queue":
        return ResourceExhausted(
            f"{where}the recipient's queue is full; try again after they read their messages"
        )
    if scope == "sender":
        return ResourceExhausted(
            f"{where}you have too many undelivered messages waiting at the relay; try again "
            "when your recipients have read some",
            retry_after=60,
        )
    return ResourceExhausted(f"{where}the relay is at capacity; try again later", retry_after=30)
