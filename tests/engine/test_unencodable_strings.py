"""A string that is not UTF-8 (a lone surrogate, as os.fsdecode makes of an undecodable file name).

It passes for a Python str but cannot be stored: an op returning one, or a transport answering one,
fails the step for good (`op_output_invalid`, `transport_response_invalid`), once, rather than with
a retryable UnicodeEncodeError that runs the op, and calls the transport, again.
"""

from __future__ import annotations

import collections
from typing import Any

import pytest

from engine_service.domain import (
    FAILED,
    BuildProvenance,
    OpRegistry,
    RunManifest,
    StepContext,
    TransportRegistry,
    canonical_json_bytes,
    make_run_config,
    op,
    single_op_pipeline,
)
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import InMemoryEventLog
from keel_core.errors import KeelError

OPS = OpRegistry()
BUILD = BuildProvenance("test", "3", "none")
LONE_SURROGATE = "file-\udcff"  # os.fsdecode(b"file-\xff")
CALLS: collections.Counter[str] = collections.Counter()


class SurrogateTransport:
    """Answers with a string no store can hold."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        CALLS[fact_key] += 1
        return {"name": LONE_SURROGATE}


@op("surrogate.output", registry=OPS)
async def surrogate_output(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Returns a lone surrogate."""
    return {LONE_SURROGATE: 1}


@op("surrogate.answer", registry=OPS)
async def surrogate_answer(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Calls the transport that answers a lone surrogate."""
    return await ctx.io.call("surrogate", {}, "list")


def test_canonical_json_refuses_a_lone_surrogate_as_invalid_json() -> None:
    with pytest.raises(KeelError) as refused:
        canonical_json_bytes({"name": LONE_SURROGATE})
    assert refused.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("op_id", "code"),
    [("surrogate.output", "op_output_invalid"), ("surrogate.answer", "transport_response_invalid")],
)
async def test_a_value_that_is_not_utf8_fails_the_step_once_for_good(op_id: str, code: str) -> None:
    CALLS.clear()
    transports = TransportRegistry()
    transports.register("surrogate", SurrogateTransport())
    engine = Engine(RunEnvironment(InMemoryEventLog(), OPS, transports, Failpoints.parse("")), BUILD)
    config = make_run_config(max_attempts=3, initial_backoff_ms=1, max_backoff_ms=2)
    manifest = RunManifest(single_op_pipeline(op_id, "1", None), None, {}, config, BUILD)
    try:
        outcome = await engine.start_run(manifest, None, wait=True, wait_seconds=30)
        view = await engine.views.run_view(outcome.run_id)
        assert view.status == FAILED
        assert view.error is not None and view.error.code == code
        assert len(view.steps[0].attempts) == 1
        expected_calls = {"list": 1} if op_id == "surrogate.answer" else {}
        assert dict(CALLS) == expected_calls
    finally:
        await engine.stop()
