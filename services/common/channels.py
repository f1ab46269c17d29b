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

import asyncio
import ipaddress
import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, cast

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

# A failing channel is replaced by a new one at most this often (PeerChannel).
RENEW_SECONDS = 1.0
# A replaced channel's calls may run this long before they are cancelled; every call
# between services has a shorter deadline.
RETIRE_GRACE_SECONDS = 30.0

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]


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
) -> PeerChannel:
    """A channel to another service: mutual TLS, or plaintext in explicit dev mode.

    `server_name`: the name the peer's certificate must carry when the address does not
    say it (a list of IP addresses); by default the host in the address."""
    target = channel_target(address)
    options = list(CHANNEL_OPTIONS)
    if tls is None:
        return PeerChannel(lambda: grpc.aio.insecure_channel(target, options=options))
    if server_name is not None and target != address.strip():
        options.append(("grpc.ssl_target_name_override", server_name))
    cert, key, ca = tls.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return PeerChannel(lambda: grpc.aio.secure_channel(target, credentials, options=options))


class PeerChannel(grpc.aio.Channel):
    """A channel to a peer that starts afresh, at most once a second, while it fails.

    A name that does not resolve (the peer's container is not created yet, or is being
    recreated; the DNS server did not answer) is tried again by gRPC after 1 s, then 1.6
    times longer each time up to 120 s, and no channel argument changes that: a peer
    whose name appeared after 30 s was reached 13-17 s later, and the wait grows with
    the time it was missing. A new channel resolves at once. So a call made while the
    channel is in TRANSIENT_FAILURE, a second or more after it was opened, opens a new
    one; the one it replaces is closed once its calls have ended. What stubs hold
    (`unary_unary` and the others) always calls through the newest channel.
    """

    def __init__(self, connect: Callable[[], grpc.aio.Channel]) -> None:
        self._connect = connect
        self._channel = connect()
        self._opened = time.monotonic()
        self._retired: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task[None]] = set()

    def current(self) -> grpc.aio.Channel:
        """The channel to call through now (a new one if this one fails)."""
        now = time.monotonic()
        if (
            now - self._opened >= RENEW_SECONDS
            and self._channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        ):
            self._retire(self._channel)
            self._channel, self._opened = self._connect(), now
        return self._channel

    def _retire(self, channel: grpc.aio.Channel) -> None:
        self._retired.append(channel)
        task = asyncio.get_running_loop().create_task(channel.close(RETIRE_GRACE_SECONDS))
        self._closing.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._closing.discard(task)
            self._retired.remove(channel)

        task.add_done_callback(done)

    async def close(self, grace: float | None = None) -> None:
        await asyncio.gather(*(c.close(grace) for c in [self._channel, *self._retired]))
        await asyncio.gather(*self._closing, return_exceptions=True)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def __aenter__(self) -> PeerChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        await self.close(None)
        return None

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        rebound = _Rebound(
            self,
            "unary_unary",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )
        return cast("grpc.aio.UnaryUnaryMultiCallable[Any, Any]", rebound)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        rebound = _Rebound(
            self,
            "unary_stream",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )
        return cast("grpc.aio.UnaryStreamMultiCallable[Any, Any]", rebound)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool = False,
    ) -> grpc.aio.StreamUnaryMultiCallable[Any, Any]:
        rebound = _Rebound(
            self,
            "stream_unary",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )
        return cast("grpc.aio.StreamUnaryMultiCallable[Any, Any]", rebound)

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool = False,
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        rebound = _Rebound(
            self,
            "stream_stream",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
        )
        return cast("grpc.aio.StreamStreamMultiCallable[Any, Any]", rebound)


class _Rebound:
    """A method of a PeerChannel: each call goes through the channel current then."""

    def __init__(
        self,
        owner: PeerChannel,
        kind: str,
        method: str,
        request_serializer: Serializer | None,
        response_deserializer: Deserializer | None,
        registered: bool,
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._args = (method, request_serializer, response_deserializer, registered)
        self._bound: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if self._bound is None or self._bound[0] is not channel:
            method, serializer, deserializer, registered = self._args
            make = getattr(channel, self._kind)
            self._bound = (
                channel,
                make(method, serializer, deserializer, _registered_method=registered),
            )
        return self._bound[1](*args, **kwargs)


def address_variable(peer: str) -> str:
    """The environment variable naming where `peer`'s internal port is."""
    return f"{peer.upper()}_INTERNAL_ADDRESS"


def peer_channel(env: Env, peer: str) -> PeerChannel:
    """A channel to `peer`'s internal port: its address variable, by default the local
    host and the peer's default internal port."""
    address = env.string(address_variable(peer), f"127.0.0.1:{internal_port(peer)}")
    return open_channel(address, tls_from_env(env), server_name=peer)
