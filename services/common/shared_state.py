"""Redis for the state every replica of a service must share (relay queues, login
challenges, rate limits): connecting, errors, and limits exact across replicas.

A service uses Redis when `REDIS_URL` (or `REDIS_URL_FILE`, a secret: the URL carries
the service's ACL password) is set; without it, state stays in the process's memory as
before. The ACL user must not have `@admin` or `@dangerous` (see
services/launcher/redis_server.py); nothing here needs them.

Times come from Redis (`TIME` inside each script), never from the replica's own clock:
replicas' clocks differ, and a limit must not depend on which replica a call reaches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TypeVar

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.config import Env
from services.common.crypto import Keyring
from services.common.errors import ResourceExhausted, StartupError, Unavailable
from services.common.ratelimit import CounterFactory, WindowCounter

logger = logging.getLogger(__name__)

URL_VARIABLE = "REDIS_URL"
# Every command waits at most this long: a call that cannot reach Redis fails with
# UNAVAILABLE within its deadline instead of hanging.
SOCKET_TIMEOUT_SECONDS = 3.0
MAX_CONNECTIONS = 32


def url_from_env(env: Env) -> str | None:
    return env.secret(URL_VARIABLE, required=False)


def connect(url: str, **options: object) -> redis.Redis:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise StartupError(f"{URL_VARIABLE} must be a redis://, rediss:// or unix:// URL")
    # A blocking pool: under a burst, calls wait (within the timeout) for one of
    # MAX_CONNECTIONS connections instead of failing at once.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=SOCKET_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
        health_check_interval=15,
        **options,
    )
    return redis.Redis.from_pool(pool)  # closing the client closes the pool


async def check_reachable(client: redis.Redis) -> None:
    """At start: the service refuses to start, saying why, if Redis is unusable."""
    try:
        await client.ping()
    except NoPermissionError:
        raise StartupError(
            f"the {URL_VARIABLE} user may not run PING: give it `+@all -@admin -@dangerous`"
        ) from None
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StartupError(f"cannot reach Redis at {URL_VARIABLE}: {exc}") from None
    except ResponseError as exc:  # WRONGPASS, NOAUTH
        raise StartupError(f"Redis refused the {URL_VARIABLE} credentials: {exc}") from None


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Redis failures as the errors a caller can act on: UNAVAILABLE while Redis cannot
    be reached, RESOURCE_EXHAUSTED when it is out of memory (noeviction refuses writes
    rather than dropping data). `what` names the state, for the message."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError):
        logger.warning("redis unreachable", extra={"fields": {"state": what}})
        raise Unavailable(f"the {what} store is unreachable; try again shortly") from None
    except ResponseError as exc:
        if str(exc).startswith("OOM"):
            logger.error("redis out of memory", extra={"fields": {"state": what}})
            raise ResourceExhausted(
                f"the {what} store is full; try again later", retry_after=30
            ) from None
        raise


class KeyNames:
    """Redis key names that are HMACs of what they are about (blind indexes): a user
    id or an address never appears in Redis, yet every replica with the same key finds
    the same entry."""

    def __init__(self, key: bytes, prefix: str) -> None:
        self._key = key
        self.prefix = prefix

    def tag(self, kind: str, *values: str) -> str:
        message = "\x00".join((kind, *values)).encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:32]


async def open_from_env(
    env: Env, keyring: Keyring, default_prefix: str
) -> tuple[redis.Redis, KeyNames] | None:
    """The service's Redis when REDIS_URL is set (else None), reachable and usable, with
    its key names: HMACs under a key derived from the service's master key, the same on
    every replica, so Redis holds no user id or address. Keys begin with
    `REDIS_KEY_PREFIX` (`default_prefix` unless set), so services can share one server."""
    url = url_from_env(env)
    if url is None:
        return None
    client = connect(url)
    await check_reachable(client)
    names = KeyNames(
        keyring.blind_index("shared-state")("redis key names"),
        env.string("REDIS_KEY_PREFIX", default_prefix),
    )
    return client, names


_WINDOW_SCRIPT = (Path(__file__).parent / "lua" / "window.lua").read_text()


class SharedWindowLimiter:
    """At most `limit` events per key in any `window` seconds, counted in Redis, so
    every replica sees every other's events (the N+1st is refused wherever it lands).

    The same operations as services.common.ratelimit.SlidingWindowLimiter, awaited.
    """

    def __init__(
        self,
        client: redis.Redis,
        names: KeyNames,
        name: str,
        limit: int,
        window: float,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._names = names
        self._name = name
        self.limit = limit
        self.window = window
        self._clock = clock
        self._script = client.register_script(_WINDOW_SCRIPT)

    def _call(self, key: str, mode: str) -> tuple[list[str], list[str | int]]:
        """The script's keys and arguments for `key` and `mode`."""
        redis_key = f"{self._names.prefix}rl:{self._name}:{self._names.tag(self._name, key)}"
        now = "" if self._clock is None else str(int(self._clock() * 1000))
        return [redis_key], [self.limit, int(self.window * 1000), now, mode]

    async def _run(self, key: str, mode: str) -> float | None:
        keys, args = self._call(key, mode)
        with mapped_errors("rate limit"):
            wait = await self._script(keys=keys, args=args)
        return None if int(wait) < 0 else int(wait) / 1000

    async def acquire_many(self, key: str, count: int) -> list[float | None]:
        """`acquire` `count` times in one round trip (a pipeline; each one atomic, as
        ever): for each, None if recorded, else the wait. Unlike `count` calls one after
        another, those after a refusal are tried too; they are refused as well unless an
        old event left the window in between."""
        keys, args = self._call(key, "acquire")
        with mapped_errors("rate limit"):
            pipe = self._client.pipeline(transaction=False)
            for _ in range(count):
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            waits = await pipe.execute(raise_on_error=False)
            for position, wait in enumerate(waits):
                if isinstance(wait, NoScriptError):  # Redis restarted: this call loads it
                    waits[position] = await self._script(keys=keys, args=args)
                elif isinstance(wait, Exception):
                    raise wait
        return [None if int(wait) < 0 else int(wait) / 1000 for wait in waits]

    async def retry_after(self, key: str) -> float | None:
        return await self._run(key, "check")

    async def hit(self, key: str) -> None:
        await self._run(key, "hit")

    async def acquire(self, key: str) -> float | None:
        return await self._run(key, "acquire")

    async def reset(self, key: str) -> None:
        await self._run(key, "reset")


_T = TypeVar("_T")

# A worker thread waits at most this long for a limit's answer: a free connection
# (SOCKET_TIMEOUT_SECONDS), the command (the same again), and a moment for the loop.
_THREAD_WAIT_SECONDS = 2 * SOCKET_TIMEOUT_SECONDS + 1.0


class ThreadWindow:
    """A `SharedWindowLimiter` for synchronous rules running in worker threads
    (identity's domain runs under asyncio.to_thread): each operation runs on the event
    loop that owns the Redis client, and the calling thread waits for its answer.

    Satisfies services.common.ratelimit.WindowCounter. Never call it on the loop's own
    thread: that thread would wait for work only it can do.
    """

    def __init__(self, shared: SharedWindowLimiter, loop: asyncio.AbstractEventLoop) -> None:
        self._shared = shared
        self._loop = loop
        self.limit = shared.limit
        self.window = shared.window

    def _wait(self, operation: Coroutine[object, object, _T]) -> _T:
        if _running_loop() is self._loop:
            operation.close()
            raise RuntimeError("a shared limit was called on its event loop's thread")
        future = asyncio.run_coroutine_threadsafe(operation, self._loop)
        try:
            return future.result(timeout=_THREAD_WAIT_SECONDS)
        except concurrent.futures.TimeoutError:
            future.cancel()
            logger.warning("redis too slow", extra={"fields": {"state": "rate limit"}})
            raise Unavailable("the rate limit store is unreachable; try again shortly") from None

    def retry_after(self, key: str) -> float | None:
        return self._wait(self._shared.retry_after(key))

    def hit(self, key: str) -> None:
        self._wait(self._shared.hit(key))

    def acquire(self, key: str) -> float | None:
        return self._wait(self._shared.acquire(key))

    def reset(self, key: str) -> None:
        self._wait(self._shared.reset(key))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def thread_counters(
    client: redis.Redis, names: KeyNames, loop: asyncio.AbstractEventLoop
) -> CounterFactory:
    """Limits in Redis for rules that run in worker threads, the loop being `loop`."""

    def counter(name: str, limit: int, window: float) -> WindowCounter:
        return ThreadWindow(SharedWindowLimiter(client, names, name, limit, window), loop)

    return counter
