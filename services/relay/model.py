"""What the relay's rules, queues and transport share: messages, limits, statistics, and
what the relay asks of identity. Domain, queues and servicer import from here; this
module imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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
    # What one sender may have waiting in all queues together (see MessageQueues.send).
    max_sender_messages: int = 1000
    max_sender_bytes: int = 16 * 1024 * 1024
    # Lifetime cap while the recipient has not connected to this relay since it started.
    unseen_recipient_ttl: float = 6 * 3600.0
    # Open SubscribeMessages streams, per user and in all.
    max_streams_per_user: int = 8
    max_streams: int = 2000


class Message:
    __slots__ = ("body", "expire_time", "message_id", "promised_expire_time", "send_time",
                 "sender_id")  # fmt: skip

    def __init__(
        self,
        message_id: str,
        sender_id: str,
        body: bytearray,
        send_time: float,
        expire: float,
        promised_expire: float | None = None,
    ) -> None:
        self.message_id = message_id
        self.sender_id = sender_id
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
class RelayStats:
    queued_messages: int
    queued_bytes: int
    charged_bytes: int  # what counts against max_total_bytes: bodies plus per-message overhead
    recipients: int
    subscribers: int


class RecipientDirectory(Protocol):
    """What the relay asks identity: is this user someone we may queue for?"""

    async def is_active(self, user_id: str) -> bool: ...
