"""Prometheus metrics shared by both services: RPC counts and latency by method and status code.

Each service adds its own domain metrics (appends, artifact bytes, runs by status, ...) to the
same registry; `serve_metrics` exposes it over HTTP for Prometheus to scrape. The registry is per
process: a store and an engine started in one process (tests) share it, and their RPC metrics are
told apart by the `service` label.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from keel_core.interceptors import WrappingInterceptor
from keel_core.serving import host_port

REGISTRY = CollectorRegistry(auto_describe=True)

RPC_STARTED = Counter(
    "keel_rpc_started", "RPCs received, by service and method.", ["service", "method"], registry=REGISTRY
)
RPC_HANDLED = Counter(
    "keel_rpc_handled",
    "RPCs completed, by service, method and gRPC status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
# Seconds, for the time an RPC (or a request of a long-lived call) takes to be handled.
RPC_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
RPC_SECONDS = Histogram(
    "keel_rpc_duration_seconds",
    "Time to handle an RPC, by service and method.",
    ["service", "method"],
    registry=REGISTRY,
    buckets=RPC_SECONDS_BUCKETS,
)


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server: the port it bound, and how to stop it."""

    host: str
    port: int
    _server: Any

    @property
    def url(self) -> str:
        """Where Prometheus scrapes it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        """Stop serving (the HTTP server runs in a thread; shutting it down blocks briefly)."""
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()


def serve_metrics(listen: str) -> MetricsEndpoint:
    """Serve REGISTRY at http://LISTEN/metrics (port 0 picks one) in a background thread."""
    host, port = host_port(listen)
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound: int = server.server_address[1]
    return MetricsEndpoint(host, bound, server)


def _split(full_method: str) -> tuple[str, str]:
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "", full_method)
    return service, method


def _code_of(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


class MetricsInterceptor(WrappingInterceptor):
    """Counts every RPC and times it, labelled with the gRPC status code it ended with."""

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str) -> Any:
        """The handler timed and counted (health and reflection are left as they are)."""
        return None if handler is None else _timed_handler(handler, method)


class _HandledCounts(dict[str, Counter]):
    """A method's `keel_rpc_handled` children by status code, each looked up on its first call."""

    def __init__(self, service: str, method: str) -> None:
        super().__init__()
        self._labels = (service, method)

    def __missing__(self, code: str) -> Counter:
        child = self[code] = RPC_HANDLED.labels(*self._labels, code)
        return child

    def count(self, code: str) -> None:
        """Count one call that ended with `code`."""
        self[code].inc()


def _timed_handler(handler: grpc.RpcMethodHandler[Any, Any], full_method: str) -> Any:
    service, method = _split(full_method)
    if service.startswith("grpc."):  # health and reflection are not the service's work
        return handler
    decode, encode = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        unary = _timed_unary(handler.unary_unary, service, method)
        return grpc.unary_unary_rpc_method_handler(unary, decode, encode)
    if handler.unary_stream is not None:
        streamed = _timed_stream(handler.unary_stream, service, method)
        return grpc.unary_stream_rpc_method_handler(streamed, decode, encode)
    if handler.stream_unary is not None:
        unary = _timed_unary(handler.stream_unary, service, method)
        return grpc.stream_unary_rpc_method_handler(unary, decode, encode)
    streamed = _timed_stream(handler.stream_stream, service, method)
    return grpc.stream_stream_rpc_method_handler(streamed, decode, encode)


def _timed_unary(behavior: Any, service: str, method: str) -> Callable[[Any, Any], Awaitable[Any]]:
    # The labelled children are looked up once (the handled counts once per code): `labels()` takes
    # a lock and builds a key per call.
    started_count = RPC_STARTED.labels(service, method)
    seconds = RPC_SECONDS.labels(service, method)
    handled = _HandledCounts(service, method)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started_count.inc()
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as caught:
            error = caught
            raise
        finally:
            seconds.observe(time.perf_counter() - started)
            handled.count(_code_of(context, error))

    return wrapper


def _timed_stream(behavior: Any, service: str, method: str) -> Callable[[Any, Any], AsyncIterator[Any]]:
    started_count = RPC_STARTED.labels(service, method)
    seconds = RPC_SECONDS.labels(service, method)
    handled = _HandledCounts(service, method)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        started_count.inc()
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as caught:
            error = caught
            raise
        finally:
            seconds.observe(time.perf_counter() - started)
            handled.count(_code_of(context, error))

    return wrapper
