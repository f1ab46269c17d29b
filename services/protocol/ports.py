"""Where the services listen unless configured otherwise (docker-compose.yml agrees)."""

from __future__ import annotations

# The deployment's services; each is its own process with its own ports.
SERVICES = ("identity", "session", "relay", "audit")
# Those that keep a database (and so serve DatabaseAdminService: backups, key rotation).
PERSISTENT = ("identity", "session", "audit")
DEFAULT_PORTS = {"identity": 50051, "session": 50052, "relay": 50053, "audit": 50054}
# Internal and operator APIs listen on a second port that requires client certificates
# (Python gRPC cannot ask for an optional one on a single port).
INTERNAL_PORT_OFFSET = 10


def internal_port(service: str) -> int:
    """The port of a service's internal and operator APIs (mutual TLS): public + 10."""
    return DEFAULT_PORTS[service] + INTERNAL_PORT_OFFSET
