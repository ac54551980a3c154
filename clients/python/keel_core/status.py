"""The wire side of KeelError: gRPC status codes with a google.rpc.ErrorInfo detail, both ways."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from keel_core.errors import ErrorCategory, KeelError

ERROR_DOMAIN = "keel.dev"

_CODES: dict[ErrorCategory, grpc.StatusCode] = {
    ErrorCategory.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCategory.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCategory.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCategory.CONFLICT: grpc.StatusCode.ABORTED,
    ErrorCategory.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCategory.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCategory.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCategory.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCategory.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCategory.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCategory.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCategory.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
    ErrorCategory.INTERNAL: grpc.StatusCode.INTERNAL,
}
_CATEGORIES = {code: category for category, code in _CODES.items()}


def grpc_code(error: KeelError) -> grpc.StatusCode:
    """The gRPC status code for an error's category."""
    return _CODES[error.category]


def to_rpc_status(error: KeelError) -> status_pb2.Status:
    """A google.rpc.Status whose one detail is an ErrorInfo with reason = error.code.

    Metadata carries `category`, `retryable`, and each detail (strings as they are, other
    values as JSON), so a client in any language can branch on the reason and read the facts.
    """
    info = error_details_pb2.ErrorInfo(reason=error.code, domain=ERROR_DOMAIN, metadata=error_metadata(error))
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=grpc_code(error).value[0], message=bounded_message(error), details=[detail])


def error_metadata(error: KeelError) -> dict[str, str]:
    """The ErrorInfo metadata of an error: `category`, `retryable`, and each detail (strings as they
    are, other values as JSON)."""
    metadata = {"category": error.category.value, "retryable": "true" if error.retryable else "false"}
    for key, value in error.details.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        metadata[key] = _bounded(text, MAX_DETAIL_CHARS)
    return metadata


def bounded_message(error: KeelError) -> str:
    """The error's message as a status carries it (long ones truncated)."""
    return _bounded(error.message, MAX_MESSAGE_CHARS)


def error_from_parts(
    code: grpc.StatusCode, reason: str, message: str, metadata: Mapping[str, str]
) -> KeelError:
    """A KeelError from a status's parts: its code, its ErrorInfo's reason and metadata, its message."""
    meta = dict(metadata)
    retryable = meta.pop("retryable", "false") == "true"
    meta.pop("category", None)
    category = _CATEGORIES.get(code, ErrorCategory.INTERNAL)
    return KeelError(reason, message, category=category, retryable=retryable, details=meta)


# The status travels in trailing metadata, which gRPC caps (8 KiB by default on many clients); a
# longer one would turn the real status into RESOURCE_EXHAUSTED and lose the reason.
MAX_MESSAGE_CHARS = 2048
MAX_DETAIL_CHARS = 512


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 14] + "… (truncated)"


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], error: KeelError) -> None:
    """Fail the current RPC with the error's status and ErrorInfo (never returns)."""
    status = rpc_status.to_status(to_rpc_status(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> KeelError:
    """Rebuild a KeelError from a failed call: from its ErrorInfo when present, else from its code."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    code = error.code()
    category = _CATEGORIES.get(code, ErrorCategory.INTERNAL)
    message = error.details() or code.name.lower()
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return error_from_parts(code, info.reason, message, info.metadata)
    retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return KeelError(code.name.lower(), message, category=category, retryable=retryable)


__all__ = [
    "ERROR_DOMAIN",
    "abort_with",
    "bounded_message",
    "error_from_parts",
    "error_metadata",
    "from_rpc_error",
    "grpc_code",
    "to_rpc_status",
]
