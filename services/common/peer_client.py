"""Calls from one service to another, all through one helper.

Every service-to-service call needs the same four things: a deadline, waiting for the
peer to be ready within it (services start in any order), a retry when an idempotent
call meets UNAVAILABLE (a peer restarting, a connection closed by max age), and turning
the transport's error into a domain error. Callers see only `services.common.errors`
types: `Unavailable` with their own message, or whatever they map a peer's answer to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from services.common.errors import ResourceExhausted, ServiceError, Unavailable

DEADLINE_SECONDS = 3.0
# Pauses before the second and third attempt of an idempotent call, inside its deadline.
RETRY_DELAYS = (0.05, 0.25)

Request = TypeVar("Request", bound=Message)
Reply = TypeVar("Reply", bound=Message)

logger = logging.getLogger(__name__)


async def call(
    method: grpc.aio.UnaryUnaryMultiCallable[Request, Reply],
    request: Request,
    *,
    unavailable: str,
    idempotent: bool,
    answers: Mapping[grpc.StatusCode, Callable[[], ServiceError]] | None = None,
    deadline_seconds: float = DEADLINE_SECONDS,
    wait_for_ready: bool = True,
) -> Reply:
    """Calls `method` on a peer; the reply, or a domain error.

    `answers` turns a peer's status into the caller's own error (e.g. UNAUTHENTICATED
    from the session service into Unauthenticated for the end user). Any other failure,
    the deadline included, raises Unavailable(`unavailable`): the peer's own message is
    about its internals, not something the end user can act on. Only `idempotent`
    calls are retried, and only on UNAVAILABLE, so a retry can never apply a change twice.
    """
    give_up = time.monotonic() + deadline_seconds
    delays = iter(RETRY_DELAYS if idempotent else ())
    while True:
        try:
            return await method(
                request,
                timeout=max(give_up - time.monotonic(), 0.001),
                wait_for_ready=wait_for_ready,
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if answers and code in answers:
                raise _with_retry_delay(answers[code](), exc) from None
            delay = next(delays, None) if code == grpc.StatusCode.UNAVAILABLE else None
            if delay is not None and time.monotonic() + delay < give_up:
                await asyncio.sleep(delay)
                continue
            logger.warning(
                "call to another service failed",
                extra={"fields": {"rpc": type(request).__name__, "code": code.name}},
            )
            raise Unavailable(unavailable) from None


def _with_retry_delay(error: ServiceError, exc: grpc.aio.AioRpcError) -> ServiceError:
    """A peer's RESOURCE_EXHAUSTED keeps its wait (the `retry-after` trailer every
    server sets beside google.rpc.RetryInfo), so the end user hears when to retry."""
    if not isinstance(error, ResourceExhausted) or error.retry_after is not None:
        return error
    for item in exc.trailing_metadata() or ():
        key, value = item[0], item[1]  # type: ignore[index]
        if key == "retry-after" and isinstance(value, str) and value.isdigit():
            return ResourceExhausted(error.message, retry_after=float(value))
    return error
