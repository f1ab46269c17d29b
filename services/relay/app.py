"""Wiring of the relay: limits from the environment, queues, expiry sweeper.

The relay has no database and opens no file. Queues live in this process's memory (a
restart empties them, by design) or, with `REDIS_URL`, in a Redis without persistence
shared by every relay replica (a restart of Redis empties them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from securemsg.relay.v1 import relay_admin_service_pb2_grpc as admin_grpc
from securemsg.relay.v1 import relay_service_pb2_grpc as pb_grpc

from services.common import catalog, metrics, shared_state
from services.common.addresses import ClientAddresses
from services.common.config import Env, ServerConfig
from services.common.errors import ServiceError, StartupError
from services.common.identity_client import RemoteIdentityDirectory
from services.common.outbox import MemoryOutbox, OutboxShipper
from services.common.server import App
from services.common.wiring import Channels, bind
from services.relay.domain import Relay
from services.relay.model import QueueStore, RelayLimits
from services.relay.queues import MessageQueues
from services.relay.redis_queues import RedisQueues
from services.relay.sealing import KEY_VARIABLE, RelaySeal
from services.relay.servicer import RelayAdminServicer, RelayServicer

SERVICE = "relay"
logger = logging.getLogger(__name__)


def _stat_reader(queues: QueueStore, field: str) -> Callable[[], float]:
    return lambda: float(getattr(queues.last_stats(), field))


def limits_from_env(env: Env) -> RelayLimits:
    return RelayLimits(
        max_body_bytes=env.integer("RELAY_MAX_BODY_BYTES", 64 * 1024, minimum=1),
        default_ttl=env.number("RELAY_DEFAULT_TTL_SECONDS", 24 * 3600.0, minimum=1.0),
        max_ttl=env.number("RELAY_MAX_TTL_SECONDS", 7 * 24 * 3600.0, minimum=1.0),
        max_queue_messages=env.integer("RELAY_MAX_QUEUE_MESSAGES", 1000, minimum=1),
        max_queue_bytes=env.integer("RELAY_MAX_QUEUE_BYTES", 8 * 1024 * 1024, minimum=1024),
        max_total_bytes=env.integer("RELAY_MAX_TOTAL_BYTES", 256 * 1024 * 1024, minimum=1024),
        sends_per_minute=env.integer("RELAY_SENDS_PER_MINUTE", 600, minimum=1),
        max_sender_messages=env.integer("RELAY_MAX_SENDER_MESSAGES", 1000, minimum=1),
        max_sender_bytes=env.integer("RELAY_MAX_SENDER_BYTES", 16 * 1024 * 1024, minimum=1024),
        unseen_recipient_ttl=env.number(
            "RELAY_UNSEEN_RECIPIENT_TTL_SECONDS", 6 * 3600.0, minimum=1.0
        ),
        max_streams_per_user=env.integer("RELAY_MAX_STREAMS_PER_USER", 8, minimum=1),
        max_streams=env.integer("RELAY_MAX_STREAMS", 2000, minimum=1),
    )


async def build(env: Env) -> App:
    limits = limits_from_env(env)
    # Leave room for the envelope fields around the largest body.
    message_budget = ServerConfig.from_env(SERVICE, env).max_message_bytes - 16 * 1024
    if limits.max_body_bytes > message_budget:
        raise StartupError(
            f"RELAY_MAX_BODY_BYTES ({limits.max_body_bytes}) must be at least 16 KiB below "
            "MAX_MESSAGE_BYTES; raise MAX_MESSAGE_BYTES or lower the body cap"
        )
    outbox = MemoryOutbox(SERVICE)
    shipper = OutboxShipper.from_env(outbox, env)
    queues = await queues_from_env(env, limits, outbox)
    for field, text in (
        ("queued_messages", "Messages waiting in the relay"),
        ("queued_bytes", "Body bytes waiting in the relay"),
        ("charged_bytes", "Bytes counted against RELAY_MAX_TOTAL_BYTES (bodies + overhead)"),
        ("recipients", "Recipients with queued messages"),
        ("subscribers", "Open SubscribeMessages streams"),
    ):
        metrics.gauge(f"securemsg_relay_{field}", text, _stat_reader(queues, field))
    metrics.gauge(
        "securemsg_relay_max_total_bytes",
        "RELAY_MAX_TOTAL_BYTES: past it the relay refuses every send",
        lambda: float(limits.max_total_bytes),
    )
    channels = Channels(env)
    relay = Relay(
        queues,
        RemoteIdentityDirectory(
            channels.to("identity"),
            active_cache_seconds=env.number("RECIPIENT_CACHE_SECONDS", 10.0),
        ),
        revalidate_seconds=env.number("RELAY_STREAM_REVALIDATE_SECONDS", 30.0, minimum=0.1),
        fetch_budget_bytes=message_budget,
        coalesce_seconds=env.number("RELAY_STREAM_COALESCE_MS", 3.0, minimum=0.0) / 1000,
    )
    sweep_interval = env.number("RELAY_SWEEP_INTERVAL_SECONDS", 1.0, minimum=0.05)

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(sweep_interval)
            try:
                expired = await queues.expire()
                await queues.stats()  # keeps the gauges current
            except ServiceError:
                continue  # Redis unreachable: logged where it failed; next round retries
            if expired:
                logger.info("expired messages dropped", extra={"fields": {"count": expired}})

    async def end_streams() -> None:
        queues.closing.set()

    async def close() -> None:
        await shipper.close()
        await queues.close()
        await channels.close()

    return App(
        bindings=[
            bind(
                catalog.RELAY,
                RelayServicer(relay, channels.token_validator(), ClientAddresses.from_env(env)),
                pb_grpc.add_RelayServiceServicer_to_server,
            ),
            bind(
                catalog.RELAY_ADMIN,
                RelayAdminServicer(relay, outbox.backlog, lambda: outbox.dropped),
                admin_grpc.add_RelayAdminServiceServicer_to_server,
            ),
        ],
        background=[sweep_forever, shipper.run],
        on_draining=[end_streams],
        on_stop=[close],
    )


async def queues_from_env(env: Env, limits: RelayLimits, outbox: MemoryOutbox) -> QueueStore:
    """Redis when REDIS_URL (or _FILE) is set, with RELAY_STORE_KEY; memory otherwise."""
    url = shared_state.url_from_env(env)
    if url is None:
        return MessageQueues(limits, outbox)
    seal = RelaySeal(env.secret(KEY_VARIABLE) or "")
    client = shared_state.connect(url)
    await shared_state.check_reachable(client)
    logger.info("message queues in redis, shared by every relay replica")
    return RedisQueues(
        client, limits, outbox, seal, prefix=env.string("REDIS_KEY_PREFIX", "relay:")
    )
