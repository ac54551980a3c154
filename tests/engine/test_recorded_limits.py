"""Values an op or a policy controls can never make an event unrecordable or a decision crash."""

from __future__ import annotations

from engine_service.domain.events import (
    CANCELED,
    MAX_RECORDED_TEXT,
    ErrorRecord,
    RunCompleted,
    StepAttemptFailed,
    decode_event,
    encode_event,
)
from engine_service.domain.run_config import RetryPolicy

ONE_MIB = 1024 * 1024


def test_huge_error_message_is_recorded_cut_to_a_bounded_size() -> None:
    error = ErrorRecord("op_failed", "op", True, "x" * (3 * ONE_MIB))
    name, payload = encode_event(StepAttemptFailed("s1", 0, error))
    assert len(payload) < 2 * MAX_RECORDED_TEXT
    decoded = decode_event(name, payload)
    assert isinstance(decoded, StepAttemptFailed)
    assert decoded.error.message.startswith("x" * 100)
    assert decoded.error.message.endswith("characters, truncated)")
    assert (decoded.error.code, decoded.error.retryable) == ("op_failed", True)


def test_huge_terminal_reason_is_recorded_cut_to_a_bounded_size() -> None:
    name, payload = encode_event(RunCompleted(CANCELED, "", reason="r" * ONE_MIB))
    assert len(payload) < 2 * MAX_RECORDED_TEXT
    decoded = decode_event(name, payload)
    assert isinstance(decoded, RunCompleted) and decoded.reason.startswith("rrr")


def test_short_texts_are_recorded_as_they_are() -> None:
    error = ErrorRecord("op_failed", "op", False, "boom")
    name, payload = encode_event(StepAttemptFailed("s1", 2, error))
    decoded = decode_event(name, payload)
    assert isinstance(decoded, StepAttemptFailed) and decoded.error.message == "boom"


def test_backoff_of_a_huge_multiplier_or_attempt_is_the_cap_not_an_overflow() -> None:
    assert RetryPolicy(max_attempts=1000, multiplier=3.0, max_backoff_ms=5000).backoff_ms(900) == 5000
    assert RetryPolicy(max_attempts=10, multiplier=1e200, max_backoff_ms=700).backoff_ms(3) == 700
    assert RetryPolicy(initial_backoff_ms=100, multiplier=2.0, max_backoff_ms=10_000).backoff_ms(3) == 400
