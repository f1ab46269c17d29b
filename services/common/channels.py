"""Outgoing gRPC channels between services, with the caller's own client certificate.

A peer may run as several replicas. Its address variable then names them all: a DNS
name whose records are the replicas (`dns:///identity:50061`, as compose's service
names are), or a static list (`127.0.0.1:50061,127.0.0.1:50161`). Either way the channel
balances calls over every replica it can reach (`round_robin`: per call, not per
connection), skips one that is down, and re-resolves the name when a connection ends;
servers end connections after a maximum age (services.common.server) so clients notice
new replicas. Retries of idempotent calls (services.common.peer_client) thus land on
another replica.
"""

from __future__ import annotations

import ipaddress
import json

import grpc

from services.common.config import Env, TlsConfig, internal_port, tls_from_env
from services.common.errors import StartupError

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
    # gRPC's defaults suit clients of far-away services, not peers on one network that
    # start, restart and move together. A connection that fails asks for the name to be
    # resolved again, but by default not sooner than 30 s after the last resolution: a
    # peer whose container came back with a new address stayed unreachable that long.
    # Resolving a name inside the deployment is cheap, so allow it every second.
    ("grpc.dns_min_time_between_resolutions_ms", 1_000),
    # Reconnecting to a peer that refuses backs off by 1.6 times per attempt up to 120 s
    # by default: after a minute of a peer starting or restarting, the next attempt was
    # up to tens of seconds after it served again. A few seconds at most between
    # attempts costs a refused connection per peer and replica, and nothing once up.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def channel_target(address: str) -> str:
    """The gRPC target for an address variable: one `host:port`, a `dns:///` name, or a
    comma-separated list of IP `host:port`s (a static set of replicas)."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) <= 1:
        return address.strip()
    families = set()
    for part in parts:
        host = part.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise StartupError(
                f"{address!r}: a list of replicas must be IP addresses with ports; for host "
                "names use one DNS name that resolves to every replica (dns:///name:port)"
            ) from None
    if len(families) > 1:
        raise StartupError(f"{address!r}: list IPv4 or IPv6 replicas, not both")
    return f"ipv{families.pop()}:" + ",".join(parts)


def open_channel(
    address: str, tls: TlsConfig | None, *, server_name: str | None = None
) -> grpc.aio.Channel:
    """A channel to another service: mutual TLS, or plaintext in explicit dev mode.

    `server_name`: the name the peer's certificate must carry when the address does not
    say it (a list of IP addresses); by default the host in the address."""
    target = channel_target(address)
    options = list(CHANNEL_OPTIONS)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    if server_name is not None and target != address.strip():
        options.append(("grpc.ssl_target_name_override", server_name))
    cert, key, ca = tls.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


def address_variable(peer: str) -> str:
    """The environment variable naming where `peer`'s internal port is."""
    return f"{peer.upper()}_INTERNAL_ADDRESS"


def peer_channel(env: Env, peer: str) -> grpc.aio.Channel:
    """A channel to `peer`'s internal port: its address variable, by default the local
    host and the peer's default internal port."""
    address = env.string(address_variable(peer), f"127.0.0.1:{internal_port(peer)}")
    return open_channel(address, tls_from_env(env), server_name=peer)
