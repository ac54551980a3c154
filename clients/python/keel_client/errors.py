"""The client's exceptions: a class per ErrorInfo reason, under a class per gRPC code, under KeelClientError.

Catch the narrowest class that makes sense: `RunNotFound` for that reason only, `NotFoundError`
for anything NOT_FOUND, `KeelClientError` for every failure of a call. A reason this client does
not know yet still raises the class of its gRPC code, with the reason in `code`.
"""

from __future__ import annotations

from typing import Any

import grpc

from keel_core.status import from_rpc_error


class KeelClientError(Exception):
    """A failed EngineService call: `code` is the ErrorInfo reason (stable), `message` is for people."""

    grpc_status: grpc.StatusCode | None = None

    def __init__(
        self,
        code: str,
        message: str,
        *,
        category: str = "internal",
        retryable: bool = False,
        details: dict[str, Any] | None = None,
        grpc_status: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.category = category
        self.retryable = retryable
        self.details: dict[str, Any] = dict(details or {})
        if grpc_status is not None:
            self.grpc_status = grpc_status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


# One class per gRPC status code: the fallback for reasons not listed below.
class InvalidArgumentError(KeelClientError):
    """INVALID_ARGUMENT: the request must change before it can succeed."""

    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(KeelClientError):
    """NOT_FOUND: something the request names does not exist."""

    grpc_status = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(KeelClientError):
    """ALREADY_EXISTS: something the request would create exists, differently."""

    grpc_status = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(KeelClientError):
    """FAILED_PRECONDITION: the system is not in a state where the request can succeed."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(KeelClientError):
    """ABORTED: a compare-and-swap lost to a concurrent writer."""

    grpc_status = grpc.StatusCode.ABORTED


class ResourceExhaustedError(KeelClientError):
    """RESOURCE_EXHAUSTED: a message beyond the size limit, or a quota used up."""

    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(KeelClientError):
    """UNAVAILABLE: the engine or something behind it cannot be reached now (already retried)."""

    grpc_status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(KeelClientError):
    """DEADLINE_EXCEEDED: the call's deadline passed before it finished."""

    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDeniedError(KeelClientError):
    """PERMISSION_DENIED: the caller may not do this."""

    grpc_status = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(KeelClientError):
    """UNAUTHENTICATED: the call carried no valid credentials."""

    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class CallCancelledError(KeelClientError):
    """CANCELLED: the call was cancelled before it finished."""

    grpc_status = grpc.StatusCode.CANCELLED


class UnimplementedError(KeelClientError):
    """UNIMPLEMENTED: this engine does not implement the RPC (yet)."""

    grpc_status = grpc.StatusCode.UNIMPLEMENTED


class DataLossError(KeelClientError):
    """DATA_LOSS: something stored cannot be read back (junk appended to a run's stream, say)."""

    grpc_status = grpc.StatusCode.DATA_LOSS


class InternalError(KeelClientError):
    """INTERNAL or UNKNOWN: the engine failed in a way the caller cannot fix."""

    grpc_status = grpc.StatusCode.INTERNAL


# One class per ErrorInfo reason Keel documents.
class RunNotFound(NotFoundError):
    """`run_not_found`: no run has this id."""


class ManifestNotFound(NotFoundError):
    """`manifest_not_found`: the run's manifest artifact is missing from the store."""


class RunAlreadyExists(AlreadyExistsError):
    """`run_already_exists`: a run with this id exists with a different manifest."""


class InvalidPlan(InvalidArgumentError):
    """`invalid_plan`: a cycle, an unknown dependency or op, a duplicate step id (the message names it)."""


class InvalidArgument(InvalidArgumentError):
    """`invalid_argument`: a malformed request field (the message says which)."""


class InvalidJson(InvalidArgumentError):
    """`invalid_json`: a value is not JSON the wire can carry exactly (e.g. an integer beyond 2**53)."""


class InvalidRunId(InvalidArgumentError):
    """`invalid_run_id`: a run id that is not a UUID in its 36-character form."""


class InputTooLarge(InvalidArgumentError):
    """`input_too_large`: an input, context or op config beyond the engine's size limit (see `details`)."""


class MissingFactKey(InvalidArgumentError):
    """`missing_fact_key`: an I/O call was made without a fact key."""


class SecretsDetected(InvalidArgumentError):
    """`secrets_detected`: a fact key looks like a secret; nothing was persisted."""


class FactKeyTooLong(InvalidArgumentError):
    """`fact_key_too_long`: a fact key beyond 512 characters (see `details`: length, limit)."""


class MalformedRequest(InvalidArgumentError):
    """`malformed_request`: the request bytes did not decode as the RPC's message (a proto mismatch)."""


class CorruptEvent(DataLossError):
    """`corrupt_event`: the run's stream holds an event the engine cannot decode (`details`: stream_id, seq).

    The run can still be listed, and terminalized as canceled or failed.
    """


class ChildRunConflict(FailedPreconditionError):
    """`child_run_conflict`: a child with this fact key exists with a different op or input."""


class ParentRunCanceled(FailedPreconditionError):
    """`parent_run_canceled`: the parent was canceled; its cancel would close this child (use abandon)."""


class ChildRunRequestInvalid(InvalidArgumentError):
    """`child_run_request_invalid`: a SpawnChild/AwaitChild request of the wrong kind or shape."""


class StoreUnavailable(UnavailableError):
    """`store_unavailable`: the engine cannot reach its store; trying again later may succeed."""


class ChildrenNotClosed(UnavailableError):
    """`children_not_closed`: the run is canceled but some children are not yet; cancel it again."""


class SequenceConflict(AbortedError):
    """`sequence_conflict`: another writer advanced the run's stream first."""


class RunTerminal(FailedPreconditionError):
    """`run_terminal`: the run has ended, so it consumes no more signals; nothing was recorded."""


class InvalidSignal(InvalidArgumentError):
    """`invalid_signal`: a signal's name or id breaks the rules (the message says which)."""


class SignalTooLarge(InvalidArgumentError):
    """`signal_too_large`: a signal's payload beyond 256 KiB of JSON (see `details`: size, limit)."""


class SignalInboxFull(ResourceExhaustedError):
    """`signal_inbox_full`: the run received as many signals as it may (10,000)."""


_BY_REASON: dict[str, type[KeelClientError]] = {
    "run_not_found": RunNotFound,
    "manifest_not_found": ManifestNotFound,
    "run_already_exists": RunAlreadyExists,
    "invalid_plan": InvalidPlan,
    "invalid_argument": InvalidArgument,
    "invalid_json": InvalidJson,
    "invalid_run_id": InvalidRunId,
    "input_too_large": InputTooLarge,
    "missing_fact_key": MissingFactKey,
    "secrets_detected": SecretsDetected,
    "fact_key_too_long": FactKeyTooLong,
    "malformed_request": MalformedRequest,
    "corrupt_event": CorruptEvent,
    "child_run_conflict": ChildRunConflict,
    "child_run_request_invalid": ChildRunRequestInvalid,
    "parent_run_canceled": ParentRunCanceled,
    "store_unavailable": StoreUnavailable,
    "children_not_closed": ChildrenNotClosed,
    "sequence_conflict": SequenceConflict,
    "run_terminal": RunTerminal,
    "invalid_signal": InvalidSignal,
    "signal_too_large": SignalTooLarge,
    "signal_inbox_full": SignalInboxFull,
}

_BY_STATUS: dict[grpc.StatusCode, type[KeelClientError]] = {
    cls.grpc_status: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        AbortedError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        PermissionDeniedError,
        UnauthenticatedError,
        CallCancelledError,
        UnimplementedError,
        DataLossError,
        InternalError,
    )
    if cls.grpc_status is not None
}


def error_class(reason: str, status: grpc.StatusCode | None = None) -> type[KeelClientError]:
    """The exception class for an ErrorInfo reason, else for the gRPC status, else KeelClientError."""
    by_reason = _BY_REASON.get(reason)
    if by_reason is not None:
        return by_reason
    if status is not None:
        return _BY_STATUS.get(status, KeelClientError)
    return KeelClientError


def error_from_rpc(error: grpc.RpcError) -> KeelClientError:
    """The typed exception for a failed call (reason and metadata from its google.rpc.ErrorInfo)."""
    keel_error = from_rpc_error(error)
    status = error.code() if hasattr(error, "code") else None
    cls = error_class(keel_error.code, status)
    return cls(
        keel_error.code,
        keel_error.message,
        category=keel_error.category.value,
        retryable=keel_error.retryable,
        details=keel_error.details,
        grpc_status=status,
    )


def invalid_request(message: str) -> InvalidArgument:
    """A request the client refuses before sending it (same class as the engine's `invalid_argument`)."""
    return InvalidArgument("invalid_argument", message, category="invalid_argument")
