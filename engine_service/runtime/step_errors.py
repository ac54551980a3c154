"""How a step attempt's failure is recorded: an op's exception, or a branch stopped by a sibling."""

from __future__ import annotations

from engine_service.domain import BRANCH_CANCELED, ErrorRecord
from keel_core.errors import ErrorCategory, KeelError
from keel_core.json_rules import check_json


def op_error_record(error: BaseException) -> ErrorRecord:
    """How an op's exception is recorded in StepAttemptFailed."""
    if isinstance(error, KeelError):
        details = dict(error.details)
        try:
            # Recorded two levels down ({"error": {"details": ...}}), and shown: the JSON rule there.
            check_json(details, "error.details", within=2)
        except KeelError:
            details = {str(key): repr(value) for key, value in details.items()}
        return ErrorRecord(error.code, error.category.value, error.retryable, error.message, details)
    return ErrorRecord("op_failed", "op", True, f"{type(error).__name__}: {error}")


def branch_canceled(reason: str) -> ErrorRecord:
    """How an attempt stopped because another branch failed the run is recorded (never retried)."""
    return ErrorRecord(
        BRANCH_CANCELED,
        "cancelled",
        False,
        f"canceled: another branch failed the run ({reason})",
    )


def step_timeout(step_id: str, limit_ms: int) -> KeelError:
    """How an in-process op stopped at its start-to-close timeout fails (retryable)."""
    return KeelError(
        "step_timeout",
        f"step {step_id!r} did not finish within its start_to_close_timeout of {limit_ms} ms "
        "(the op was cancelled)",
        category=ErrorCategory.DEADLINE_EXCEEDED,
        retryable=True,
    )


def op_cancelled(step_id: str) -> ErrorRecord:
    """How an attempt whose op raised CancelledError of its own is recorded (retryable: the retry
    policy bounds how often it runs again). Nobody stopped the run: an inner task was cancelled."""
    return ErrorRecord(
        "op_cancelled",
        "op",
        True,
        f"step {step_id!r}: the op raised CancelledError without the run being stopped "
        "(an inner task or future was cancelled)",
    )
