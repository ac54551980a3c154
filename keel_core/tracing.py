"""OpenTelemetry tracing for both services: a span per RPC, and (engine) per run drive and step attempt.

The W3C trace context (`traceparent`, `tracestate`) a client sends in its gRPC metadata is the
parent of the RPC's span. StartRun keeps it in RunStarted (`trace_context`), so every engine that
drives the run, now or after a takeover, opens its run span under the client's trace.

Spans cost nothing unless tracing is installed (`install`, from `--otlp-endpoint`): until then no
span object is made at all, and without the `tracing` extra (opentelemetry-api and -sdk) this module
can never be installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc

from keel_core.interceptors import WrappingInterceptor

try:
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, Status, StatusCode

    AVAILABLE = True
except ImportError:  # pragma: no cover - the `tracing` extra is not installed
    AVAILABLE = False

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

INSTRUMENTATION = "keel"
# The W3C trace-context keys a carrier holds (lower case, as gRPC metadata keys are).
TRACE_KEYS = ("traceparent", "tracestate")
_provider: TracerProvider | None = None


class TracingUnavailable(RuntimeError):
    """Spans were asked for (`--otlp-endpoint`) but the `tracing` extra is not installed."""


def install(
    service_name: str, otlp_endpoint: str | None = None, *, exporter: SpanExporter | None = None
) -> TracerProvider:
    """Record spans for `service_name` and export them: to `otlp_endpoint` (OTLP over gRPC, batched)
    or to `exporter` (each span as it ends: tests pass an in-memory one)."""
    global _provider
    if not AVAILABLE:
        raise TracingUnavailable("tracing needs the `tracing` extra: pip install 'keel[tracing]'")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not otlp_endpoint.startswith("https://")
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure))
        )
    _provider = provider
    return provider


def enabled() -> bool:
    """Whether spans are recorded (`install` was called)."""
    return _provider is not None


def uninstall() -> None:
    """Stop recording (flushing what was recorded)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
    _provider = None


def _tracer() -> Any:
    assert _provider is not None
    return _provider.get_tracer(INSTRUMENTATION)


def carrier_of(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The W3C trace-context entries of gRPC metadata (empty when the caller sent none)."""
    return {
        key: value
        for key, value in metadata or ()
        if key in TRACE_KEYS and isinstance(value, str) and len(value) <= 512
    }


def current_carrier() -> dict[str, str]:
    """The trace context of the current span as W3C entries (empty when none is recording)."""
    if _provider is None:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return {key: value for key, value in carrier.items() if key in TRACE_KEYS}


def span(
    name: str,
    *,
    parent: Mapping[str, str] | None = None,
    attributes: Mapping[str, str | int | bool] | None = None,
    kind: str = "internal",
) -> contextlib.AbstractContextManager[Any]:
    """A span around the block, under `parent` (a W3C carrier) or the current span; an exception
    leaving the block marks it failed."""
    if _provider is None:  # nothing records: no span objects at all on the hot path
        return _NO_SPAN
    return _recorded_span(name, parent, attributes, kind)


# What `span` gives when nothing records: a context manager that does nothing, shared (it holds no
# state), so a span costs no generator per run and step.
_NO_SPAN = contextlib.nullcontext()


@contextlib.contextmanager
def _recorded_span(
    name: str, parent: Mapping[str, str] | None, attributes: Mapping[str, str | int | bool] | None, kind: str
) -> Iterator[Any]:
    context = propagate.extract(dict(parent)) if parent else None
    span_kind = SpanKind.SERVER if kind == "server" else SpanKind.INTERNAL
    with _tracer().start_as_current_span(
        name, context=context, kind=span_kind, attributes=dict(attributes or {}), record_exception=True
    ) as current:
        yield current


def set_attribute(current: Any, key: str, value: str | int | bool) -> None:
    """Set an attribute on a span (no-op without tracing)."""
    if AVAILABLE and current is not None:
        current.set_attribute(key, value)


def set_error(current: Any, code: str, message: str) -> None:
    """Mark a span failed with a Keel error code (no-op without tracing)."""
    if AVAILABLE and current is not None:
        current.set_attribute("keel.error_code", code)
        current.set_status(Status(StatusCode.ERROR, message[:512]))


class TracingInterceptor(WrappingInterceptor):
    """A SERVER span per RPC (health and reflection excepted), under the caller's trace context."""

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str) -> Any:
        """The handler inside a span."""
        if handler is None or method.startswith("/grpc."):
            return handler
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _traced_unary(handler.unary_unary, method), decode, encode
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _traced_unary(handler.stream_unary, method), decode, encode
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _traced_stream(handler.unary_stream, method), decode, encode
            )
        return grpc.stream_stream_rpc_method_handler(
            _traced_stream(handler.stream_stream, method), decode, encode
        )


def _rpc_attributes(method: str) -> dict[str, str | int | bool]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _traced_unary(behavior: Any, method: str) -> Callable[[Any, Any], Awaitable[Any]]:
    attributes = _rpc_attributes(method)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        parent = carrier_of(context.invocation_metadata())
        with span(method.lstrip("/"), parent=parent, attributes=attributes, kind="server") as current:
            try:
                return await behavior(request, context)
            finally:
                _end_rpc(current, context)

    return wrapper


def _traced_stream(behavior: Any, method: str) -> Callable[[Any, Any], Any]:
    attributes = _rpc_attributes(method)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        parent = carrier_of(context.invocation_metadata())
        with span(method.lstrip("/"), parent=parent, attributes=attributes, kind="server") as current:
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                _end_rpc(current, context)

    return wrapper


def _end_rpc(current: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Name the status a servicer aborted with on the span (abort_with sets the code first)."""
    if not AVAILABLE or current is None:
        return
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        current.set_attribute("rpc.grpc.status_code", code.value[0])
        current.set_status(Status(StatusCode.ERROR, str(context.details() or code.name)[:512]))


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Channel interceptors sending the current span's W3C trace context with every call (the engine's
    store calls: the store's RPC spans join the engine's trace)."""
    shapes = (_UnaryUnaryTrace, _UnaryStreamTrace, _StreamUnaryTrace, _StreamStreamTrace)
    return [cast("grpc.aio.ClientInterceptor", shape()) for shape in shapes]


def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    carrier = current_carrier()
    if not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


if TYPE_CHECKING:
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:  # grpc-stubs make them generic; the runtime classes are not subscriptable
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor


class _UnaryUnaryTrace(_UnaryUnary):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_trace(client_call_details), request)


class _UnaryStreamTrace(_UnaryStream):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_trace(client_call_details), request)


class _StreamUnaryTrace(_StreamUnary):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, requests: Any) -> Any:
        return await continuation(_with_trace(client_call_details), requests)


class _StreamStreamTrace(_StreamStream):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, requests: Any
    ) -> Any:
        return await continuation(_with_trace(client_call_details), requests)
