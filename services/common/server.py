"""Server bootstrap shared by every service.

Gives each service the same shape: TLS (client certificates optional for the public API,
checked per internal API), health and reflection, an explicit message size limit,
request ids, domain-error mapping, and a graceful stop on SIGTERM/SIGINT during which
health reports NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from services.common import log, metrics, peers
from services.common.config import Env, ServerConfig, metrics_port
from services.common.errors import ResourceExhausted, ServiceError, StartupError
from services.common.peers import Context

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True)
class ServiceBinding:
    """One proto service hosted by a server, and who may call it.

    `allowed_callers` None means public (end users, authenticated per RPC if needed);
    otherwise the certificate names allowed to call it.
    """

    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    allowed_callers: frozenset[str] | None = None


@dataclass
class App:
    """What a service's build function hands to the runner."""

    bindings: Sequence[ServiceBinding]
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    # Run when shutdown begins, before in-flight calls drain (e.g. to end live streams).
    on_draining: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run after the server has stopped (close databases and channels).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class _Interceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authorization of internal APIs, request ids, and errors mapped to statuses."""

    def __init__(self, policies: dict[str, frozenset[str]], *, insecure: bool) -> None:
        self._policies = policies
        self._insecure = insecure

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        allowed = self._policies.get(method.split("/")[1])
        incoming = dict(details.invocation_metadata or ())
        given = incoming.get(REQUEST_ID_KEY)
        rid = given if isinstance(given, str) and 0 < len(given) <= 64 else os.urandom(8).hex()

        def finish(code: grpc.StatusCode, started: float) -> None:
            metrics.RPC_TOTAL.labels(method, code.name).inc()
            metrics.RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
            level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
            logger.log(level, "rpc", extra={"fields": {"method": method, "code": code.name}})

        def before(context: Context) -> None:
            log.request_id.set(rid)
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            if allowed is not None:
                peers.authorize(context, allowed, insecure=self._insecure)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Context) -> Any:
                started = time.perf_counter()
                try:
                    before(context)
                    reply = await inner(request, context)
                except Exception as exc:
                    finish(_code_of(exc), started)
                    await _abort(context, exc, method, rid)
                finish(grpc.StatusCode.OK, started)
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                started = time.perf_counter()
                try:
                    before(context)
                    async for item in inner_stream(request, context):
                        yield item
                except Exception as exc:
                    finish(_code_of(exc), started)
                    await _abort(context, exc, method, rid)
                finish(grpc.StatusCode.OK, started)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _code_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN  # aborted by the handler itself; code not exposed
    return grpc.StatusCode.INTERNAL


async def _abort(context: Context, exc: Exception, method: str, rid: str) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    trailing: list[tuple[str, str]] = [(REQUEST_ID_KEY, rid)]
    if isinstance(exc, ServiceError):
        if isinstance(exc, ResourceExhausted) and exc.retry_after is not None:
            trailing.append(("retry-after", str(max(1, round(exc.retry_after)))))
        detail = getattr(exc, "detail", None)
        if detail:
            logger.error(
                "integrity failure", extra={"fields": {"method": method, "detail": detail}}
            )
        await context.abort(exc.code, exc.message, trailing_metadata=tuple(trailing))
    logger.exception("unexpected error", extra={"fields": {"method": method}})
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error; quote request id {rid} to an operator",
        trailing_metadata=tuple(trailing),
    )


def server_credentials(
    config: ServerConfig, *, require_client_cert: bool
) -> grpc.ServerCredentials | None:
    """Server-only TLS for the public port; mutual TLS for the internal port."""
    if config.tls is None:
        return None
    cert, key, ca = config.tls.read()
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


class Server:
    """A started gRPC server with health and reflection."""

    def __init__(self, config: ServerConfig, app: App) -> None:
        self.config = config
        self.app = app
        policies = {
            b.full_name: b.allowed_callers for b in app.bindings if b.allowed_callers is not None
        }
        size = config.max_message_bytes
        self._server = grpc.aio.server(
            interceptors=[_Interceptor(policies, insecure=config.tls is None)],
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for binding in app.bindings:
            binding.add_to_server(binding.servicer, self._server)
        reflection.enable_server_reflection(
            [b.full_name for b in app.bindings]
            + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.internal_port = 0

    def _listen(self, address: str, *, require_client_cert: bool) -> int:
        credentials = server_credentials(self.config, require_client_cert=require_client_cert)
        try:
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {address} (in use, or not a local address?)")
        return port

    async def start(self) -> None:
        # Every API is served on both ports; internal ones refuse callers whose
        # certificate name is not allowed, and the public port has no certificates.
        self.port = self._listen(self.config.listen_address, require_client_cert=False)
        self.internal_port = self._listen(
            self.config.internal_listen_address, require_client_cert=True
        )
        await self._server.start()
        self._tasks = [asyncio.create_task(job()) for job in self.app.background]
        for name in ["", *(b.full_name for b in self.app.bindings)]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        for hook in self.app.on_draining:
            await hook()
        await self._server.stop(self.config.shutdown_grace_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for hook in self.app.on_stop:
            await hook()


def run(service: str, build: Callable[[Env], Awaitable[App]]) -> None:
    """Entry point of `python -m services.<name>`: build, serve until SIGTERM, stop."""
    env = Env()
    log.configure(service, env.string("LOG_LEVEL", "INFO"))
    try:
        asyncio.run(_serve(service, env, build))
    except StartupError as exc:
        logger.error("refusing to start", extra={"fields": {"reason": str(exc)}})
        print(f"{service}: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _serve(service: str, env: Env, build: Callable[[Env], Awaitable[App]]) -> None:
    config = ServerConfig.from_env(service, env)
    metrics.serve(env.string("METRICS_ADDRESS", f"127.0.0.1:{metrics_port(service)}"))
    app = await build(env)
    server = Server(config, app)
    try:
        await server.start()
    except BaseException:
        for hook in app.on_stop:
            await hook()
        raise
    logger.info(
        "serving",
        extra={
            "fields": {
                "port": server.port,
                "internal_port": server.internal_port,
                "tls": config.tls is not None,
            }
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("stopping")
    await server.stop()
    logger.info("stopped")
