"""The skeleton every SpecServe gRPC server starts from.

grpc.aio server with the standard health service (NOT_SERVING until the service says it is warm),
reflection, one interceptor that maps domain errors to status codes, and a graceful drain on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specserve import errors

log = logging.getLogger(__name__)

_CODES: list[tuple[type[errors.SpecServeError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
]

RETRY_AFTER_KEY = "retry-after-ms"


def status_for(exc: errors.SpecServeError) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.UNKNOWN


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_ms:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
    if isinstance(exc, errors.SpecServeError):
        await context.abort(status_for(exc), str(exc))
    log.exception("internal error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")


def _decoded(deserialize: Callable[[bytes], object] | None, raw: bytes) -> object:
    """The request message, or INVALID_ARGUMENT when its bytes do not decode (bad wire format,
    invalid UTF-8 in a string field)."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except (DecodeError, UnicodeDecodeError, ValueError) as exc:
        raise errors.InvalidArgument("request", f"the message does not decode: {exc}") from None


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Domain errors become their status code with their message; anything else becomes INTERNAL
    with no traceback sent to the client (it is logged here). Requests are decoded inside, so bytes
    that do not decode are INVALID_ARGUMENT too, not an error of the transport."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        deserialize = handler.request_deserializer
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner_uu(_decoded(deserialize, request), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    async for item in inner_us(_decoded(deserialize, request), context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, handler.response_serializer)
        return handler


def api_key(metadata) -> str:
    """The key sent as `authorization: Bearer KEY`, else as `x-api-key: KEY`; "" when none. The one
    parser of both fronts (gRPC metadata and HTTP headers, lower-case names), so a client sending
    both headers is the same client on either."""
    pairs = dict(metadata or ())
    return pairs.get("authorization", "").removeprefix("Bearer ").strip() or pairs.get("x-api-key", "")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <key>` (or `x-api-key: <key>`) on the methods under
    `prefix`; health and reflection stay open for probes."""

    def __init__(self, keys: set[str], prefix: str):
        self.keys, self.prefix = keys, prefix

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(self.prefix):
            return await continuation(details)
        if api_key(details.invocation_metadata) in self.keys:
            return await continuation(details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required (authorization: Bearer KEY)")

        handler = await continuation(details)
        if handler is not None and handler.unary_stream:
            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover - abort raises first
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer if handler else None,
                                                   handler.response_serializer if handler else None)


def probe_health(address: str, timeout_s: float = 3.0) -> int | None:
    """The status the standard health service at `address` reports, or None when nothing answers
    (no server, or one that is hung or stopped)."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        except grpc.RpcError:
            return None


def check_health(address: str, timeout_s: float = 3.0) -> bool:
    """Whether the server at `address` reports SERVING on the standard health service."""
    return probe_health(address, timeout_s) == health_pb2.HealthCheckResponse.SERVING


class Server:
    """Owns the grpc.aio server and its health state."""

    def __init__(self, service_names: list[str], options: list[tuple[str, object]] | None = None,
                 interceptors: list[grpc.aio.ServerInterceptor] | None = None):
        # No port sharing: a second server on a busy port must fail, not split the traffic.
        options = [("grpc.so_reuseport", 0), *(options or [])]
        self.grpc = grpc.aio.server(interceptors=[ErrorInterceptor(), *(interceptors or [])], options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.service_names = service_names
        self.serving = False
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)

    def bind(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Bind or exit with a message naming the address (a busy port is a start-up error)."""
        try:
            port = self.grpc.add_secure_port(address, credentials) if credentials else self.grpc.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise SystemExit(f"error: cannot bind {address}: the port is in use or the address is not available")
        return port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.serving = serving
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.set_serving(False)
        await self.grpc.start()

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.grpc.stop(grace_s)


async def run_until_signalled(server: Server, warm_up: Callable[[], Awaitable[None]],
                              grace_s: float = 10.0, on_stop: Callable[[], Awaitable[None]] | None = None,
                              drain: Callable[[], Awaitable[None]] | None = None) -> None:
    """Start, warm up (health turns SERVING after), then serve until SIGTERM/SIGINT and drain:
    health turns NOT_SERVING, `drain()` (work the service finishes by itself, such as streams on
    another front) and the gRPC calls in flight get up to `grace_s` together."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await warm_up()
    await server.set_serving(True)
    log.info("serving %s", ", ".join(server.service_names))
    await stop.wait()
    log.info("draining for up to %.0fs", grace_s)
    await server.set_serving(False)  # load balancers stop sending new work
    started = loop.time()
    if drain is not None:
        try:
            await asyncio.wait_for(drain(), grace_s)
        except TimeoutError:
            log.warning("the drain did not finish in %.0fs", grace_s)
    await server.stop(max(0.0, grace_s - (loop.time() - started)))
    if on_stop:
        await on_stop()
