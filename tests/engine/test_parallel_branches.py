"""Parallel branches: ready steps run at once, up to max_parallel; a step sees its ancestors only.

Overlap is judged on the recorded attempt times (StepAttemptStarted / StepCompleted), never on
wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2

from keel_core.json_values import from_value
from tests.engine.conftest import Cluster, gate
from tests.engine.processes import start_engine_process, start_store_process
from tests.engine.test_engine_rpcs import expect_error, pipeline, step
from tests.engine.test_terminalize import terminalize

WAIT = 60.0


def two_sleeps(seconds: float, max_parallel: int = 0, op_id: str = "keel.sleep") -> engine_pb2.Pipeline:
    """Two independent sleeps (durable timers; `keel.sleep_in_process` keeps each op running)."""
    built = pipeline(
        step("left", op_id, {"seconds": seconds}),
        step("right", op_id, {"seconds": seconds}),
        pipeline_id="two-sleeps",
    )
    built.max_parallel = max_parallel
    return built


def interval(run: engine_pb2.Run, step_id: str) -> tuple[int, int]:
    """The recorded (started, finished) times of a step's completed attempt, in microseconds."""
    state = next(s for s in run.steps if s.step_id == step_id)
    [done] = [a for a in state.attempts if a.status == engine_pb2.STEP_STATUS_COMPLETED]
    return done.started_at.ToMicroseconds(), done.finished_at.ToMicroseconds()


async def run_to_end(cluster: Cluster, request: engine_pb2.StartRunRequest) -> engine_pb2.Run:
    """Start the run and wait for its end."""
    request.wait = True
    run = (await cluster.stub.StartRun(request, timeout=WAIT + 5)).run
    assert run.status != engine_pb2.RUN_STATUS_RUNNING
    return run


async def test_two_independent_sleeps_overlap(cluster: Cluster) -> None:
    run = await run_to_end(cluster, engine_pb2.StartRunRequest(pipeline=two_sleeps(1.0)))
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    left, right = interval(run, "left"), interval(run, "right")
    assert left[0] < right[1] and right[0] < left[1]  # each started before the other finished


async def test_max_parallel_one_serializes_independent_steps(cluster: Cluster) -> None:
    run = await run_to_end(cluster, engine_pb2.StartRunRequest(pipeline=two_sleeps(0.3, max_parallel=1)))
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    left, right = interval(run, "left"), interval(run, "right")
    assert left[1] <= right[0] or right[1] <= left[0]


async def test_negative_max_parallel_is_invalid_plan_and_writes_nothing(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(pipeline=two_sleeps(0.1, max_parallel=-1))
    message = await expect_error(
        cluster.stub.StartRun(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_plan"
    )
    assert "max_parallel" in message
    page = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=10))
    assert list(page.streams) == []


async def test_a_failed_branch_fails_the_run_and_its_running_sibling_is_recorded_canceled(
    cluster: Cluster,
) -> None:
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(
            step("slow", "keel.sleep", {"seconds": WAIT}),
            step("bad", "keel.fail_n_times", {"n": 1, "retryable": False, "code": "bad_branch"}),
            step("after", "keel.echo", None, ("slow", "bad")),
        )
    )
    run = await run_to_end(cluster, request)
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "bad_branch"
    slow = next(s for s in run.steps if s.step_id == "slow")
    [attempt] = slow.attempts
    assert attempt.status == engine_pb2.STEP_STATUS_FAILED
    assert attempt.error.code == "branch_canceled" and not attempt.error.retryable
    after = next(s for s in run.steps if s.step_id == "after")
    assert list(after.attempts) == []


async def test_a_step_sees_its_ancestors_and_not_a_sibling_that_finished_first(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(
            step("slow", "keel.sleep", {"seconds": 0.3}),
            step("quick", "keel.echo", {"q": 1}),
            step(
                "saw",
                "keel.transform",
                {"fields": {"slow": "$context.slow", "quick": "$context.quick"}},
                ("slow",),
            ),
            step(
                "then",
                "keel.transform",
                {"fields": {"slow": "$context.slow", "saw": "$context.saw"}},
                ("saw",),
            ),
        )
    )
    run = await run_to_end(cluster, request)
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    # `quick` had completed (it is in the checkpoint) before `saw` started, and `saw` did not see it.
    assert interval(run, "quick")[1] <= interval(run, "saw")[0]
    final = from_value(run.final_snapshot)
    assert final["quick"] == {"input": None, "config": {"q": 1}}
    assert final["saw"] == {"slow": {"slept": 0.3}, "quick": None}
    assert final["then"] == {"slow": {"slept": 0.3}, "saw": final["saw"]}  # transitively


async def test_cancel_stops_every_running_branch(cluster: Cluster) -> None:
    name = f"branches-{uuid.uuid4()}"
    door = gate(name)
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(
            step("one", "test.gated", {"gate": name}), step("two", "test.gated", {"gate": name})
        )
    )
    run_id = (await cluster.stub.StartRun(request)).run_id
    await asyncio.wait_for(door.wait_for(2), WAIT)  # both branches are in their op (bounded: never hang)
    outcome = await cluster.stub.Terminalize(terminalize(run_id, reason="stop both"))
    assert outcome.status == engine_pb2.RUN_STATUS_CANCELED
    assert door.cancelled == [run_id, run_id]  # each running op was cancelled, none left to finish
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert run.status == engine_pb2.RUN_STATUS_CANCELED
    assert all(a.status != engine_pb2.STEP_STATUS_COMPLETED for s in run.steps for a in s.attempts)


@pytest.mark.slow
async def test_an_engine_killed_with_two_branches_in_flight_resumes_both_as_attempt_one(
    tmp_path: Path,
) -> None:
    store = await start_store_process(tmp_path / "store")
    # `right` fires the failpoint once its StepAttemptStarted is durable; `left` started just before.
    doomed = await start_engine_process(store.address, failpoints="after_step_attempt_started:right")
    run_id = str(uuid.uuid4())
    try:
        channel = grpc.aio.insecure_channel(doomed.address)
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        with contextlib.suppress(grpc.aio.AioRpcError):  # the engine may die before it answers
            await stub.StartRun(
                # Ops running in the engine (not parked timers): both branches are orphans after the kill.
                engine_pb2.StartRunRequest(
                    pipeline=two_sleeps(1.0, op_id="keel.sleep_in_process"), run_id=run_id
                ),
                timeout=30,
            )
        await channel.close(grace=None)
        assert await asyncio.wait_for(doomed.process.wait(), 30) == -9, "the failpoint did not fire"
        survivor = await start_engine_process(store.address)
        channel = grpc.aio.insecure_channel(survivor.address)
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        try:
            awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=WAIT)
        finally:
            await channel.close(grace=None)
            assert await survivor.terminate() == 0
        assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
        for state in awaited.run.steps:
            assert [a.attempt for a in state.attempts] == [0, 1], state
            assert state.attempts[-1].status == engine_pb2.STEP_STATUS_COMPLETED
        left, right = interval(awaited.run, "left"), interval(awaited.run, "right")
        assert left[0] < right[1] and right[0] < left[1]  # the resumed branches ran at once too
    finally:
        await doomed.kill()
        await store.kill()
