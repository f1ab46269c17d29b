"""Recipients' queues in Redis, shared by every relay replica: the `QueueStore` that
`REDIS_URL` selects (services.relay.model; the in-memory one is services.relay.queues).

Each change is one Lua script (services/relay/lua/), so it is atomic across replicas:
send checks every cap (message, recipient queue, sender, total) with the same rules as
the memory store, writes and publishes the arrival; acknowledge deletes each message
once whoever asks; the sweep drops expired ones. Times are Redis' own.

Redis holds no user id: keys are HMACs of the recipient and sender
(services.common.shared_state.KeyNames), and each message's sender and sending time are
sealed (services.relay.sealing). Bodies are the clients' ciphertext, stored as sent.
Redis runs without persistence (services/launcher/redis_server.py), so the relay's
promise holds: nothing reaches disk, and a restart of Redis empties every queue.

The sender's rate is one sliding window in Redis as well; the caps on open streams count
per replica, since each stream costs that replica's memory.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from services.common import audit_events
from services.common.audit_events import AuditRecord, AuditSink
from services.common.errors import ResourceExhausted
from services.common.ratelimit import SlidingWindowLimiter
from services.common.shared_state import KeyNames, SharedWindowLimiter, mapped_errors
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
from services.relay.queues import capacity_error, check_send
from services.relay.redis_push import PushListener
from services.relay.sealing import RelaySeal

_LUA = Path(__file__).parent / "lua"
_PRELUDE = (_LUA / "prelude.lua").read_text()
_SEALED_LENGTH = struct.Struct(">H")
SWEEP_QUEUES_PER_CALL = 200
STORE = "message queue"


def _script(name: str) -> str:
    return _PRELUDE + "\n" + (_LUA / f"{name}.lua").read_text()


class RedisQueues:
    def __init__(
        self,
        client: redis.Redis,
        limits: RelayLimits,
        audit: AuditSink,
        seal: RelaySeal,
        *,
        prefix: str = "relay:",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.limits = limits
        self.closing = Signal()
        self._client = client
        self._audit = audit
        self._seal = seal
        self._names = KeyNames(seal.index_key, prefix)
        self._prefix = prefix
        self._clock = clock  # None: Redis' clock; tests move their own
        self._announced = SlidingWindowLimiter(1, 60.0)
        self._senders = SharedWindowLimiter(
            client, self._names, "relay_sends", limits.sends_per_minute, 60.0, clock=clock
        )
        self._scripts = {
            name: client.register_script(_script(name))
            for name in ("send", "send_many", "read", "ack", "connect", "sweep")
        }
        self._push = PushListener(client)
        self._streams: dict[str, set[asyncio.Event]] = {}
        self._subscribers = 0
        self._last = RelayStats(0, 0, 0, 0, 0)

    # --- keys -------------------------------------------------------------------------

    def _queue(self, recipient_id: str) -> str:
        # The hash tag keeps one queue's keys together should Redis ever be sharded.
        return f"{self._prefix}q:{{{self._names.tag('recipient', recipient_id)}}}:"

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1000))

    async def _run(self, name: str, queue: str, *args: str | int | bytes) -> Any:
        with mapped_errors(STORE):
            # Shielded: the redis client can hold on to a cancellation that lands mid-read
            # until its socket times out, which kept a closed stream open for seconds. Each
            # script is atomic in Redis, so it finishes there either way; the caller that
            # was cancelled stops waiting for its reply at once.
            return await asyncio.shield(
                self._scripts[name](keys=[], args=[self._prefix, queue, self._now_arg(), *args])
            )

    # --- QueueStore -------------------------------------------------------------------

    async def admit(
        self, sender_id: str, recipient_id: str, body: bytes, requested_ttl: float | None
    ) -> float:
        ttl = check_send(self.limits, recipient_id, body, requested_ttl)
        self._refuse_if_waiting(sender_id, await self._senders.acquire(sender_id))
        return ttl

    async def admit_many(
        self, sender_id: str, messages: Sequence[Outgoing], requested_ttl: float | None
    ) -> float:
        """The sender's rate counts every message of the batch in one round trip to
        Redis, not one each (SharedWindowLimiter.acquire_many)."""
        ttl = 0.0
        for position, out in enumerate(messages):
            with at_position(position):
                ttl = check_send(self.limits, out.recipient_id, out.body, requested_ttl)
        waits = await self._senders.acquire_many(sender_id, len(messages))
        for position, wait in enumerate(waits):
            with at_position(position):
                self._refuse_if_waiting(sender_id, wait)
        return ttl

    def _refuse_if_waiting(self, sender_id: str, wait: float | None) -> None:
        if wait is not None:
            self.announce(audit_events.RATE_LIMIT_EXCEEDED, sender_id, {"limit": "relay_sends"})
            raise ResourceExhausted("you are sending too fast", retry_after=wait)

    def announce(self, action: str, user_id: str, details: dict[str, str]) -> None:
        key = f"{action}:{user_id}:{sorted(details.items())}"
        if self._announced.acquire(key) is None:
            self._audit.record(AuditRecord(action, user_id, details))

    async def send(
        self,
        sender_id: str,
        recipient_id: str,
        body: bytes,
        ttl: float,
        client_message_id: str = "",
    ) -> Message:
        queue = self._queue(recipient_id)
        message_id = secrets.token_urlsafe(12)
        cost = len(body) + MESSAGE_OVERHEAD_BYTES
        # The sending time inside the seal is this replica's; expiry runs on Redis' clock.
        now_ms = int((self._clock or time.time)() * 1000)
        sealed = self._seal.seal(sender_id, now_ms, queue, message_id)
        data = _SEALED_LENGTH.pack(len(sealed)) + sealed + body
        limits = self.limits
        reply = await self._run(
            "send", queue,
            message_id, self._names.tag("sender", sender_id), len(body), cost,
            int(ttl * 1000), int(limits.unseen_recipient_ttl * 1000), data,
            limits.max_queue_messages, limits.max_queue_bytes,
            limits.max_sender_messages, limits.max_sender_bytes, limits.max_total_bytes,
            limits.max_body_bytes + MESSAGE_OVERHEAD_BYTES,
            self._names.tag("client_message_id", sender_id, client_message_id)
            if client_message_id else "",
            int(IDEMPOTENCY_SECONDS * 1000), queue[:-1],
        )  # fmt: skip
        status, *rest = [_text(part) for part in reply]
        if status == "full":
            scope = rest[0]
            self.announce(
                audit_events.CAPACITY_EXCEEDED,
                sender_id if scope == "sender" else "",
                {"scope": scope},
            )
            raise capacity_error(scope)
        if status == "again":
            first_id, first_expire, first_sent = rest[0].split(" ")
            return Message(
                first_id,
                sender_id,
                bytearray(body),
                int(first_sent) / 1000,
                int(first_expire) / 1000,
            )
        seq, expire_ms, sent_at_ms = (int(part) for part in rest)
        return Message(
            message_id,
            sender_id,
            bytearray(body),
            sent_at_ms / 1000,
            expire_ms / 1000,
            sent_at_ms / 1000 + ttl,
            seq,
        )

    async def send_many(
        self, sender_id: str, messages: Sequence[Outgoing], ttl: float
    ) -> list[Message]:
        """One script for the whole batch (services/relay/lua/send_many.lua): every cap
        checked for all, then all written and announced, atomically across replicas."""
        now_ms = int((self._clock or time.time)() * 1000)
        per_message: list[str | int | bytes] = []
        ids = []
        for out in messages:
            queue = self._queue(out.recipient_id)
            message_id = secrets.token_urlsafe(12)
            ids.append(message_id)
            sealed = self._seal.seal(sender_id, now_ms, queue, message_id)
            per_message += [
                queue,
                message_id,
                len(out.body),
                len(out.body) + MESSAGE_OVERHEAD_BYTES,
                _SEALED_LENGTH.pack(len(sealed)) + sealed + out.body,
                self._names.tag("client_message_id", sender_id, out.client_message_id)
                if out.client_message_id
                else "",
                queue[:-1],
            ]
        limits = self.limits
        reply = await self._run(
            "send_many", "",
            self._names.tag("sender", sender_id), int(ttl * 1000),
            int(limits.unseen_recipient_ttl * 1000),
            limits.max_queue_messages, limits.max_queue_bytes,
            limits.max_sender_messages, limits.max_sender_bytes, limits.max_total_bytes,
            limits.max_body_bytes + MESSAGE_OVERHEAD_BYTES, int(IDEMPOTENCY_SECONDS * 1000),
            len(messages), *per_message,
        )  # fmt: skip
        status, *rest = [_text(part) for part in reply]
        if status == "full":
            scope, position = rest[0], int(rest[1])
            self.announce(
                audit_events.CAPACITY_EXCEEDED,
                sender_id if scope == "sender" else "",
                {"scope": scope},
            )
            raise capacity_error(scope, position)
        results = []
        for out, message_id, result in zip(messages, ids, rest, strict=True):
            kind, *fields = result.split(" ")
            body = bytearray(out.body)
            if kind == "again":
                first_id, first_expire, first_sent = fields
                results.append(
                    Message(
                        first_id, sender_id, body, int(first_sent) / 1000, int(first_expire) / 1000
                    )
                )
                continue
            seq, expire_ms, sent_at_ms = (int(field) for field in fields)
            results.append(
                Message(
                    message_id, sender_id, body, sent_at_ms / 1000, expire_ms / 1000,
                    sent_at_ms / 1000 + ttl, seq,
                )
            )  # fmt: skip
        return results

    async def connected(self, recipient_id: str) -> None:
        # Remembered as long as the longest message could live: a connected recipient's
        # messages keep their full lifetime.
        await self._run(
            "connect", self._queue(recipient_id), int(self.limits.max_ttl * 1000) + 86_400_000
        )

    async def pending(
        self,
        recipient_id: str,
        limit: int | None = None,
        max_bytes: int | None = None,
        after: int = 0,
    ) -> list[Message]:
        queue = self._queue(recipient_id)
        reply = await self._run(
            "read",
            queue,
            str(after),
            limit if limit is not None else self.limits.max_queue_messages,
            max_bytes if max_bytes is not None else -1,
        )
        parts: list[bytes] = list(reply)
        messages = []
        for i in range(0, len(parts), 3):
            message_id, meta, data = _text(parts[i]), _text(parts[i + 1]), parts[i + 2]
            seq, expire, promised = (int(field) for field in meta.split(" ")[:3])
            (length,) = _SEALED_LENGTH.unpack_from(data)
            sealed = data[_SEALED_LENGTH.size : _SEALED_LENGTH.size + length]
            sender_id, sent_ms = self._seal.open(sealed, queue, message_id)
            body = bytearray(data[_SEALED_LENGTH.size + length :])
            messages.append(
                Message(
                    message_id, sender_id, body, sent_ms / 1000, expire / 1000, promised / 1000, seq
                )
            )
        return messages

    async def acknowledge(self, recipient_id: str, message_ids: list[str]) -> int:
        return int(await self._run("ack", self._queue(recipient_id), *message_ids))

    async def expire(self) -> int:
        removed = 0
        while True:
            reply = await self._run("sweep", "", SWEEP_QUEUES_PER_CALL)
            deleted, queues = (int(part) for part in reply)
            removed += deleted
            if queues < SWEEP_QUEUES_PER_CALL:
                return removed

    async def watch(self, recipient_id: str) -> Signal:
        """Caps count streams on this replica (each costs this process's memory)."""
        open_here = len(self._streams.get(recipient_id, ()))
        if open_here >= self.limits.max_streams_per_user:
            self.announce(audit_events.CAPACITY_EXCEEDED, recipient_id, {"scope": "user_streams"})
            raise ResourceExhausted(
                f"you have {open_here} live subscriptions open, the most allowed; "
                "close one before opening another"
            )
        if self._subscribers >= self.limits.max_streams:
            self.announce(audit_events.CAPACITY_EXCEEDED, "", {"scope": "relay_streams"})
            raise ResourceExhausted(
                "the relay has too many live subscriptions; fetch instead, or subscribe later",
                retry_after=30,
            )
        wakeup = Signal()
        self._streams.setdefault(recipient_id, set()).add(wakeup)
        self._subscribers += 1
        try:
            await self._push.add(self._queue(recipient_id)[:-1], wakeup)
            await self.connected(recipient_id)
        except BaseException:
            self.unwatch(recipient_id, wakeup)
            raise
        return wakeup

    def unwatch(self, recipient_id: str, wakeup: asyncio.Event) -> None:
        mine = self._streams.get(recipient_id)
        if mine is None or wakeup not in mine:
            return
        mine.discard(wakeup)
        if not mine:
            del self._streams[recipient_id]
        self._subscribers -= 1
        self._push.remove(self._queue(recipient_id)[:-1], wakeup)

    async def stats(self) -> RelayStats:
        with mapped_errors(STORE):
            values = await self._client.hmget(
                f"{self._prefix}totals", ["messages", "bytes", "cost", "recipients"]
            )
        messages, body_bytes, cost, recipients = (int(v or 0) for v in values)
        self._last = RelayStats(messages, body_bytes, cost, recipients, self._subscribers)
        return self._last

    def last_stats(self) -> RelayStats:
        return RelayStats(
            self._last.queued_messages,
            self._last.queued_bytes,
            self._last.charged_bytes,
            self._last.recipients,
            self._subscribers,
        )

    async def close(self) -> None:
        await self._push.close()
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
