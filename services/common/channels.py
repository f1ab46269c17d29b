"""Outgoing gRPC channels between services, with the caller's own client certificate."""

from __future__ import annotations

import grpc

from services.common.config import TlsConfig

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
