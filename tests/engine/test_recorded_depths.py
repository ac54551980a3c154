"""Values the engine records inside its events nest less than a value may, so WatchRun shows every run.

A value nests at most MAX_JSON_DEPTH levels (keel_core.json_rules), and WatchRun refuses, as DATA_LOSS
`corrupt_event`, an event that does not keep that rule. Each value recorded some levels down in an
event is held to the rule less those levels where it comes in: at the largest depth allowed the run
can be watched to its end and read; one level deeper is refused with the right status and reason.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2

from keel_core.json_rules import MAX_JSON_DEPTH
from keel_core.json_values import from_value, to_value
from tests.engine.conftest import Cluster, nested
from tests.engine.test_engine_rpcs import all_streams, expect_error
from tests.engine.test_signals import finished, pipeline, run_events, signal, wait_step


def single(op_id: str, **config: Any) -> engine_pb2.StartRunRequest:
    """A waited single-op run of `op_id` with `config` as its op_config."""
    return engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id=op_id, op_config=to_value(config)), wait=True
    )


async def watched_to_the_end(cluster: Cluster, run_id: str) -> engine_pb2.Run:
    """Every event of the run through WatchRun (which ends after RunCompleted), then GetRun's run."""
    events = [m.event async for m in cluster.stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id))]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].type == "RunCompleted"
    return (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run


def failed_for_good(run: engine_pb2.Run, code: str) -> str:
    """The run's error message, once asserted that it failed with `code` at its first attempt."""
    assert run.status == engine_pb2.RUN_STATUS_FAILED, run
    assert run.error.code == code and not run.error.retryable
    assert len(run.steps[0].attempts) == 1
    return run.error.message


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
async def test_an_io_answer_nests_one_level_less_than_a_value_as_factrecorded_holds_it(
    cluster: Cluster, depth: int
) -> None:
    run = (await cluster.stub.StartRun(single("test.nested_answer", depth=depth))).run
    got = await watched_to_the_end(cluster, run.run_id)
    if depth < MAX_JSON_DEPTH:
        assert run.status == got.status == engine_pb2.RUN_STATUS_COMPLETED
        return
    message = failed_for_good(got, "transport_response_invalid")
    assert "'test.nested' transport answered with a value that nests too deeply to be recorded" in message
    assert f"nests deeper than {MAX_JSON_DEPTH - 1} levels" in message and "not JSON" not in message


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1])
async def test_a_signal_payload_nests_two_levels_less_as_the_wait_records_it(
    cluster: Cluster, depth: int
) -> None:
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "go"))))
    if depth < MAX_JSON_DEPTH - 1:
        await signal(cluster, started.run_id, "go", nested(depth))
        assert (await finished(cluster, started.run_id)).status == engine_pb2.RUN_STATUS_COMPLETED
        got = await watched_to_the_end(cluster, started.run_id)
        assert from_value(got.final_snapshot)["w"] == nested(depth)
        return
    sent = signal(cluster, started.run_id, "go", nested(depth))
    message = await expect_error(sent, grpc.StatusCode.INVALID_ARGUMENT, "invalid_json")
    assert message.startswith("payload") and f"nests deeper than {MAX_JSON_DEPTH - 2} levels" in message
    assert await run_events(cluster, started.run_id, "signals:") == []


async def test_a_start_signal_nested_past_its_limit_is_invalid_json_and_writes_nothing(
    cluster: Cluster,
) -> None:
    payload = to_value(nested(MAX_JSON_DEPTH - 1))
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(wait_step("w", "go")), signals=[engine_pb2.SignalInput(name="go", payload=payload)]
    )
    message = await expect_error(
        cluster.stub.StartRun(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_json"
    )
    assert message.startswith("signals[0].payload") and f"deeper than {MAX_JSON_DEPTH - 2} levels" in message
    assert await all_streams(cluster) == []


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1])
async def test_a_parked_steps_output_nests_two_levels_less_as_stepwaiting_holds_it(
    cluster: Cluster, depth: int
) -> None:
    run = (await cluster.stub.StartRun(single("test.park_nested", depth=depth))).run
    got = await watched_to_the_end(cluster, run.run_id)
    if depth < MAX_JSON_DEPTH - 1:
        assert run.status == got.status == engine_pb2.RUN_STATUS_COMPLETED
        assert from_value(got.steps[0].output) == nested(depth)
        return
    message = failed_for_good(got, "op_output_invalid")
    assert "'test.park_nested' parked its step with a wait that nests too deeply to be recorded" in message
    assert f"a parked step's output nests at most {MAX_JSON_DEPTH - 2} levels" in message


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1])
async def test_an_awaited_childs_output_nests_three_levels_less_as_its_parent_records_it(
    cluster: Cluster, depth: int
) -> None:
    # The parent's FactRecorded holds the await's answer, which holds the child's final context,
    # which holds its output. The child itself completes at each depth (its output nests at most 29).
    run = (await cluster.stub.StartRun(single("test.await_nested_child", depth=depth))).run
    got = await watched_to_the_end(cluster, run.run_id)
    child = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=got.children[0].child_run_id))).run
    assert child.status == engine_pb2.RUN_STATUS_COMPLETED
    if depth < MAX_JSON_DEPTH - 2:
        assert run.status == got.status == engine_pb2.RUN_STATUS_COMPLETED
        assert from_value(got.steps[0].output) == {"child_status": "completed"}
        return
    message = failed_for_good(got, "transport_response_invalid")
    assert "the awaited child run's output (or its initial context) nests too deeply" in message
    assert "for its parent to record it" in message
    assert f"an awaited child's output nests at most {MAX_JSON_DEPTH - 3} levels" in message
    assert "not JSON" not in message


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH - 1])
async def test_error_details_too_deep_for_the_failure_event_are_recorded_as_text(
    cluster: Cluster, depth: int
) -> None:
    # StepAttemptFailed and RunCompleted hold the details two levels down ({"error": {"details"}}).
    run = (await cluster.stub.StartRun(single("test.fail_nested", depth=depth))).run
    got = await watched_to_the_end(cluster, run.run_id)
    failed_for_good(got, "nested_details")
    value = from_value(got.error.details)["value"]
    if depth < MAX_JSON_DEPTH - 1:
        assert value == nested(depth - 1)
    else:
        assert value == repr(nested(depth - 1))
