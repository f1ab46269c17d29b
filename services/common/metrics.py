"""Prometheus metrics, one registry per process (one process per service).

Labels never carry user ids, addresses or anything from a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.errors import StartupError

logger = logging.getLogger(__name__)

RPC_TOTAL = Counter(
    "securemsg_rpc_total", "RPCs handled, by method and status code", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "securemsg_rpc_duration_seconds",
    "RPC handling time, by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
INTEGRITY_FAILURES = Counter(
    "securemsg_integrity_failures_total",
    "Stored ciphertexts that failed authentication (tampered, moved, wrong key)",
    ["field"],
)
AUDIT_SHIPPED = Counter("securemsg_audit_events_shipped_total", "Audit events delivered")
AUDIT_DROPPED = Counter(
    "securemsg_audit_events_dropped_total",
    "Audit events dropped because the relay's in-memory outbox was full",
)
AUDIT_SHIP_FAILURES = Counter(
    "securemsg_audit_ship_failures_total", "Failed attempts to deliver audit events"
)
AUDIT_VERIFY_FAILURES = Counter(
    "securemsg_audit_verify_failures_total",
    "VerifyAuditLog runs that found the log broken or could not check it",
)


def gauge(name: str, description: str, read: Callable[[], float]) -> None:
    """A gauge whose value is read at scrape time (queue depths, outbox backlog)."""
    Gauge(name, description).set_function(read)


def serve(address: str) -> None:
    """Starts the /metrics HTTP endpoint on host:port ("" disables it)."""
    if not address:
        return
    host, _, port = address.rpartition(":")
    try:
        start_http_server(int(port), addr=host or "0.0.0.0")  # noqa: S104 - host from config
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot serve metrics on {address}: {exc}") from None
    logger.info("metrics endpoint up", extra={"fields": {"port": int(port)}})
