"""Undecodable request bytes become INVALID_ARGUMENT `malformed_request`, on every RPC of a server.

grpc.aio decodes a request before any handler runs; a decoder that raises ends the call with
UNKNOWN, no ErrorInfo and a traceback in the log. `refusing_undecodable` (applied by an interceptor
that `keel_core.serving.start_server` installs on every Keel server) gives a handler a decoder that
never raises: bytes it cannot decode become an `UndecodableRequest`, and the handler is wrapped so that
such a request fails the call with ErrorInfo before any servicer code sees it. Request streams
(client streaming RPCs) are checked message by message as the handler reads them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from keel_core.errors import KeelError, invalid_argument
from keel_core.json_rules import MAX_JSON_DEPTH
from keel_core.status import abort_with

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc-stubs make these generic; the runtime classes are not subscriptable
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]


@dataclass(frozen=True)
class UndecodableRequest:
    """What the lenient decoder hands over instead of raising: the method, the type, and why."""

    method: str
    message_type: str
    why: str

    def error(self) -> KeelError:
        """The `malformed_request` error the call fails with."""
        hint = "send a message encoded from the service's .proto (protos/ in the Keel repository)"
        if "depth" in self.why.lower():  # upb's "Exceeded upb_DecodeOptions_MaxDepth"
            hint = f"it nests past protobuf's 100 levels (JSON values may nest {MAX_JSON_DEPTH} levels)"
        return invalid_argument(
            "malformed_request",
            f"the request to {self.method} is not a valid {self.message_type} message ({self.why}); {hint}",
            method=self.method,
            message_type=self.message_type,
        )


def refusing_undecodable(handler: Handler | None, method: str) -> Handler | None:
    """`handler` with a decoder that never raises and a behaviour that refuses what it could not decode.

    Handlers without a decoder (raw bytes) and synchronous ones (Keel serves none) come back as
    they are.
    """
    if handler is None or handler.request_deserializer is None:
        return handler
    return _guarded_handler(handler, _lenient(handler.request_deserializer, method)) or handler


def _guarded_handler(handler: Handler, decode: Callable[[bytes], Any]) -> Handler | None:
    encode = handler.response_serializer
    if handler.unary_unary is not None:
        unary = _guard(handler.unary_unary, streaming_requests=False)
        return unary and grpc.unary_unary_rpc_method_handler(unary, decode, encode)
    if handler.unary_stream is not None:
        unary = _guard(handler.unary_stream, streaming_requests=False)
        return unary and grpc.unary_stream_rpc_method_handler(unary, decode, encode)
    if handler.stream_unary is not None:
        streamed = _guard(handler.stream_unary, streaming_requests=True)
        return streamed and grpc.stream_unary_rpc_method_handler(streamed, decode, encode)
    streamed = _guard(handler.stream_stream, streaming_requests=True)
    return streamed and grpc.stream_stream_rpc_method_handler(streamed, decode, encode)


def _lenient(decode: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    owner = getattr(decode, "__self__", None)  # generated code passes `Message.FromString`
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = getattr(descriptor, "full_name", "request")

    def decode_or_mark(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as error:  # whatever the decoder raises, the bytes were the client's
            return UndecodableRequest(method, message_type, str(error) or type(error).__name__)

    return decode_or_mark


async def _refuse(context: Context, request: UndecodableRequest) -> NoReturn:
    log.info("refused an undecodable request to %s: %s", request.method, request.why)
    await abort_with(context, request.error())
    raise AssertionError("abort_with returned")  # pragma: no cover - abort always raises


async def _checked(request: Any, context: Context) -> Any:
    if isinstance(request, UndecodableRequest):
        await _refuse(context, request)
    return request


async def _checked_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async for request in requests:
        yield await _checked(request, context)


def _guard(behavior: Any, *, streaming_requests: bool) -> Any:
    """`behavior` behind the check, of the same kind (grpc.aio dispatches on the function's kind)."""

    async def request_of(request: Any, context: Context) -> Any:
        if streaming_requests:
            return _checked_stream(request, context)
        return await _checked(request, context)

    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behavior(await request_of(request, context), context):
                yield response

        return guarded_stream
    if inspect.iscoroutinefunction(behavior):

        async def guarded(request: Any, context: Context) -> Any:
            return await behavior(await request_of(request, context), context)

        return guarded
    return None  # a synchronous handler: Keel serves none; its decoder is left as it was
