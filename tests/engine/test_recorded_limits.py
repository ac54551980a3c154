"""Values an op or a policy controls can never make an event unrecordable or a decision crash."""

from __future__ import annotations

from typing import Any

from keel.engine.v1 import engine_pb2

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
from keel_core.json_values import to_value
from tests.engine.conftest import Cluster

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


def test_huge_error_details_and_code_are_recorded_cut_to_a_bounded_size() -> None:
    # An op's OpError(..., body=<the response it got>) carries whatever the op put there.
    error = ErrorRecord("c" * ONE_MIB, "op", False, "failed", {"body": "x" * (3 * ONE_MIB), "status": 502})
    name, payload = encode_event(StepAttemptFailed("s1", 0, error))
    assert len(payload) < 4 * MAX_RECORDED_TEXT
    decoded = decode_event(name, payload)
    assert isinstance(decoded, StepAttemptFailed)
    assert decoded.error.code.startswith("ccc") and decoded.error.code.endswith("characters, truncated)")
    assert decoded.error.details["status"] == 502
    assert str(decoded.error.details["body"]).endswith("characters, truncated)")


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


def _pipeline(steps: list[dict[str, Any]]) -> engine_pb2.StartRunRequest:
    request = engine_pb2.StartRunRequest(wait=True)
    request.pipeline.pipeline_id = "limits"
    for step in steps:
        added = request.pipeline.steps.add(step_id=step["step_id"], op_id=step["op_id"])
        added.op_config.CopyFrom(to_value(step["op_config"]))
    return request


async def test_pipeline_of_many_pure_steps_completes(cluster: Cluster) -> None:
    """More completed steps than one append may carry checkpoints for: the driver splits its batches."""
    steps = [{"step_id": f"s{i}", "op_id": "keel.echo", "op_config": {"i": i}} for i in range(40)]
    response = await cluster.stub.StartRun(_pipeline(steps), timeout=60)
    assert response.run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert len(response.run.steps) == 40


async def test_transport_answer_too_large_to_record_fails_the_step_instead_of_stalling(
    cluster: Cluster,
) -> None:
    """A fact the store could not hold in one event fails its step, recorded, with the reason."""
    request = {"blob": "x" * (1024 * 1024)}
    steps = [
        {
            "step_id": "big",
            "op_id": "keel.io_call",
            "op_config": {"namespace": "keel.echo", "request": request, "fact_key": "big"},
        }
    ]
    response = await cluster.stub.StartRun(_pipeline(steps), timeout=60)
    assert response.run.status == engine_pb2.RUN_STATUS_FAILED
    assert response.run.steps[0].last_error.code == "transport_response_too_large"
