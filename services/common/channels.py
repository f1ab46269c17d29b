"""Outgoing gRPC channels between services, with the caller's own client certificate."""

from __future__ import annotations

import grpc

from services.common.config import Env, TlsConfig, internal_port, tls_from_env

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


def open_channel(address: str, tls: TlsConfig | None) -> grpc.aio.Channel:
    """A channel to another service: mutual TLS, or plaintext in explicit dev mode."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    cert, key, ca = tls.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def address_variable(peer: str) -> str:
    """The environment variable naming where `peer`'s internal port is."""
    return f"{peer.upper()}_INTERNAL_ADDRESS"


def peer_channel(env: Env, peer: str) -> grpc.aio.Channel:
    """A channel to `peer`'s internal port: its address variable, by default the local
    host and the peer's default internal port."""
    address = env.string(address_variable(peer), f"127.0.0.1:{internal_port(peer)}")
    return open_channel(address, tls_from_env(env))
