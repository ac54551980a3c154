"""Keel's one error type. Domain code raises it; the wire layer maps it to a gRPC status.

This module must not import grpc: the domain layers depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class ErrorCategory(enum.StrEnum):
    """Broad classes of failure; each maps to one gRPC status code (see keel_core.status)."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    CONFLICT = "conflict"  # a compare-and-swap lost: ABORTED
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a size cap or quota the operator set was passed
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    CANCELLED = "cancelled"
    DATA_LOSS = "data_loss"  # stored data the service cannot read back (a corrupt event)
    INTERNAL = "internal"


class KeelError(Exception):
    """A failure with a stable `code` (the google.rpc.ErrorInfo reason) and a human message."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        category: ErrorCategory = ErrorCategory.INTERNAL,
        retryable: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.category = category
        self.retryable = retryable
        self.details: dict[str, Any] = dict(details or {})

    def __repr__(self) -> str:
        return f"KeelError({self.code!r}, {self.message!r}, category={self.category.value!r})"

    def to_dict(self) -> dict[str, Any]:
        """The error as JSON-ready data (how it is recorded in events)."""
        out: dict[str, Any] = {
            "code": self.code,
            "category": self.category.value,
            "retryable": self.retryable,
            "message": self.message,
        }
        if self.details:
            out["details"] = self.details
        return out


def invalid_argument(code: str, message: str, **details: Any) -> KeelError:
    """A request the caller must change before trying again."""
    return KeelError(code, message, category=ErrorCategory.INVALID_ARGUMENT, details=details)


def not_found(code: str, message: str, **details: Any) -> KeelError:
    """Something named by the request does not exist."""
    return KeelError(code, message, category=ErrorCategory.NOT_FOUND, details=details)


def unavailable(code: str, message: str, **details: Any) -> KeelError:
    """A dependency cannot be reached right now; trying again later may succeed."""
    return KeelError(code, message, category=ErrorCategory.UNAVAILABLE, retryable=True, details=details)
