"""The servicers' one error translation: a decorator per handler kind, turning raised errors into statuses.

A KeelError becomes its own gRPC status with ErrorInfo (`keel_core.status.abort_with`); anything
unexpected is logged and becomes INTERNAL naming the exception, never UNKNOWN. Both services'
servicers use these instead of a try/except in every handler.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from keel_core.errors import KeelError
from keel_core.status import abort_with

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
S = TypeVar("S")
R = TypeVar("R")


async def fail_rpc(context: Context, handler_name: str, error: Exception) -> None:
    """Fail the RPC for `error`: a KeelError with its own status, anything unexpected as INTERNAL.

    An abort already under way (`grpc.aio.AbortError`) is re-raised as it is.
    """
    if isinstance(error, grpc.aio.AbortError):
        raise error
    if not isinstance(error, KeelError):
        log.exception("%s failed", handler_name, exc_info=error)
        error = KeelError("internal", f"{handler_name} failed: {type(error).__name__}: {error}")
    await abort_with(context, error)


def translated(
    handler: Callable[[S, Any, Context], Awaitable[R]],
) -> Callable[[S, Any, Context], Awaitable[R]]:
    """Decorate a unary servicer method: errors it raises become gRPC statuses (see `fail_rpc`)."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Any, context: Context) -> R:
        try:
            return await handler(self, request, context)
        except Exception as error:
            await fail_rpc(context, handler.__name__, error)
            raise AssertionError("abort_with returned") from error  # pragma: no cover - abort raises

    return wrapper


def translated_stream(
    handler: Callable[[S, Any, Context], AsyncIterator[R]],
) -> Callable[[S, Any, Context], AsyncIterator[R]]:
    """Decorate a server-streaming servicer method the same way, for errors before or between messages."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Any, context: Context) -> AsyncIterator[R]:
        messages = handler(self, request, context)
        try:
            async for message in messages:
                yield message
        except Exception as error:
            await fail_rpc(context, handler.__name__, error)
        finally:
            # Close the handler now, not at garbage collection: its clean-up may hold resources.
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                await aclose()

    return wrapper


__all__ = ["fail_rpc", "translated", "translated_stream"]
