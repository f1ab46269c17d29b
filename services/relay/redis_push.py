"""Live push across relay replicas: one sharded pub/sub connection per replica.

Each send script publishes the new message's seq on its queue's channel (`SPUBLISH`).
A replica subscribes (`SSUBSCRIBE`) to the channels of the recipients that have a live
stream on it, and wakes those streams; the streams then read the queue after their
cursor, so the notification carries nothing but "look".

Order matters, so that nothing is missed: `add` returns only once Redis has confirmed
the subscription, and the stream reads the queue after that. When the connection
breaks, the listener reconnects, subscribes again to every channel, waits for the
confirmations, then wakes every stream to re-read (the cursors keep that free of
duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import Unavailable

logger = logging.getLogger(__name__)

CONFIRM_SECONDS = 5.0
RECONNECT_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)


class PushListener:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._streams: dict[str, set[asyncio.Event]] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._pubsub: Any = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()  # unsubscriptions under way
        self._closing = False

    def _ensure_running(self) -> None:
        if self._closing:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="relay-push-listener")

    async def add(self, channel: str, wakeup: asyncio.Event) -> None:
        """Wakes `wakeup` on each arrival on `channel`, from when this returns."""
        self._ensure_running()
        streams = self._streams.setdefault(channel, set())
        streams.add(wakeup)
        if channel not in self._confirmed:
            self._confirmed[channel] = asyncio.get_running_loop().create_future()
            if self._connected.is_set():
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                    await self._pubsub.ssubscribe(channel)  # else: the reconnect does it
        try:
            async with asyncio.timeout(CONFIRM_SECONDS):
                await asyncio.shield(self._confirmed[channel])
        except TimeoutError:
            self.remove(channel, wakeup)
            raise Unavailable(
                "live delivery is unavailable right now; fetch instead, or subscribe again"
            ) from None

    def remove(self, channel: str, wakeup: asyncio.Event) -> None:
        streams = self._streams.get(channel)
        if streams is None:
            return
        streams.discard(wakeup)
        if streams:
            return
        del self._streams[channel]
        confirmed = self._confirmed.pop(channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.cancel()
        if self._connected.is_set():
            task = asyncio.create_task(self._unsubscribe(channel))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self._streams:
            return  # a new stream came in the meantime
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await self._pubsub.sunsubscribe(channel)

    @property
    def channels(self) -> int:
        return len(self._streams)

    async def _run(self) -> None:
        failures = 0
        while True:
            pubsub = self._client.pubsub()
            try:
                self._pubsub = pubsub
                # With nothing of interest yet, an idle channel keeps the connection open
                # (and `get_message` waiting).
                subscribing = list(self._streams) or [f"{id(self)}:idle"]
                await pubsub.ssubscribe(*subscribing)
                self._connected.set()
                # Streams added while that was under way were not in it, and did not
                # subscribe themselves (not connected yet): left out, they would wait for
                # a confirmation until UNAVAILABLE. Found opening 8 streams at once.
                late = set(self._streams).difference(subscribing)
                if late:
                    await pubsub.ssubscribe(*late)
                if failures:
                    logger.info("live delivery reconnected to redis")
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None:
                        continue
                    failures = 0
                    self._handle(message)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self._connected.clear()
                if self._closing:
                    return
                # Confirmations are void: streams added now wait for the resubscription.
                for channel, future in list(self._confirmed.items()):
                    if future.done():
                        self._confirmed[channel] = asyncio.get_running_loop().create_future()
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                if failures == 1:
                    logger.warning("live delivery lost its redis connection; reconnecting")
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        raw = message.get("channel")
        channel = raw.decode() if isinstance(raw, bytes) else str(raw)
        if kind == "ssubscribe":
            future = self._confirmed.get(channel)
            if future is not None and not future.done():
                future.set_result(None)
            # Confirmed anew (the client also reconnects by itself and subscribes again):
            # whatever was published while the connection was down is in the queue.
            for wakeup in self._streams.get(channel, ()):
                wakeup.set()
        elif kind == "smessage":
            for wakeup in self._streams.get(channel, ()):
                wakeup.set()

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        # The redis client can turn a cancellation that lands mid-read into a connection
        # error, which the loop takes for a lost connection: cancel until it has ended.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
