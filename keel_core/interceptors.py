"""A server interceptor that wraps each method's handler once and reuses the wrapped form."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # grpc-stubs make it generic; the runtime class is not subscriptable
    ServerInterceptor = grpc.aio.ServerInterceptor


class WrappingInterceptor(ServerInterceptor):
    """Wraps the handler of each method with `wrap`, once per method rather than on every call.

    Wrapping builds closures and a new handler; cached by method (and re-done only if the server
    looks up a different handler for it), a call costs one dictionary lookup.
    """

    def __init__(self) -> None:
        # method -> (the handler looked up, its wrapped form)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any] | None, method: str) -> Any:
        """The handler to serve `method` with instead of `handler` (None when nothing serves it)."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]  # type: ignore[no-any-return]
        wrapped = self.wrap(handler, method)
        if handler is not None:
            self._wrapped[method] = (handler, wrapped)
        return wrapped  # type: ignore[no-any-return]
