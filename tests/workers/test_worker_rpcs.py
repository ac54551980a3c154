"""Step timeouts, and bad input to every WorkerService RPC: the right status and reason, nothing written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel.worker.v1 import worker_pb2, worker_pb2_grpc
from keel_client import AsyncKeelClient
from keel_client.worker import TaskContext, Worker, op

from engine_service.domain.tasks import TaskToken
from keel_core.json_rules import MAX_JSON_DEPTH
from keel_core.json_values import to_value
from keel_core.status import from_rpc_error
from tests.workers.conftest import Stack, finished


@op("hang")
async def hang(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Never returns."""
    await asyncio.Event().wait()


def _pipeline(step: dict[str, Any]) -> dict[str, Any]:
    return {"pipeline_id": "timeouts", "steps": [{"step_id": "s", **step}]}


TWO_ATTEMPTS = {"retry_policy": {"max_attempts": 2, "initial_backoff": 0.01}}


async def _failed_with(client: AsyncKeelClient, step: dict[str, Any], code: str) -> None:
    started = await client.start_run(_pipeline(step), run_config=TWO_ATTEMPTS)
    run = await finished(client, started.run_id)
    assert run.status.name == "FAILED"
    attempts = run.steps[0].attempts
    assert [a.attempt for a in attempts] == [0, 1]  # retried once, as the policy says
    assert all(a.error is not None and a.error.code == code and a.error.retryable for a in attempts)


async def test_schedule_to_start_with_no_worker_fails_each_attempt_then_the_run(stack: Stack) -> None:
    async with AsyncKeelClient(stack.engine) as client:
        step = {"op_id": "anything", "task_queue": "nobody-polls", "schedule_to_start_timeout": "0.2s"}
        await _failed_with(client, step, "schedule_to_start_timeout")


async def test_start_to_close_of_a_hung_worker_fails_each_attempt_then_the_run(stack: Stack) -> None:
    worker = Worker(stack.engine, "hung-q", ops=[hang], concurrency=2, heartbeat_every=0.1)
    serving = asyncio.create_task(worker.serve())
    try:
        async with AsyncKeelClient(stack.engine) as client:
            step = {"op_id": "hang", "task_queue": "hung-q", "start_to_close_timeout": "0.3s"}
            await _failed_with(client, step, "step_timeout")
    finally:
        worker.stop()
        await serving


async def test_start_to_close_of_a_hung_in_process_op_cancels_it_and_fails_each_attempt(stack: Stack) -> None:
    async with AsyncKeelClient(stack.engine) as client:
        hung = {"op_id": "keel.sleep_in_process", "op_config": {"seconds": 3600}}
        step = {**hung, "start_to_close_timeout": "0.2s"}
        await _failed_with(client, step, "step_timeout")


async def test_bad_task_queue_names_are_invalid_plan_and_write_nothing(stack: Stack) -> None:
    async with AsyncKeelClient(stack.engine) as client:
        for queue in ["bad queue", "-leading-dash", "x" * 129, "q/slash"]:
            step = {"op_id": "anything", "task_queue": queue}
            with pytest.raises(Exception) as caught:
                await client.start_run(_pipeline(step))
            assert getattr(caught.value, "code", "") == "invalid_plan", caught.value
        page = await client.list_runs()
        assert page.runs == ()


async def test_a_remote_step_left_at_its_defaults_keeps_the_manifest_id_of_before() -> None:
    from engine_service.domain.plan import PipelineSpec, StepSpec

    plain = PipelineSpec("p", "1", (StepSpec("a", "keel.echo"),))
    assert "task_queue" not in str(plain.to_json()) and "timeouts" not in str(plain.to_json())


# --- bad input to every WorkerService RPC ----------------------------------------------------------


@pytest.fixture
async def claimed(
    stack: Stack,
) -> AsyncIterator[tuple[worker_pb2_grpc.WorkerServiceStub, worker_pb2.Task, Any]]:
    """A WorkerService stub, a task claimed by hand, and a store stub to check that nothing was written."""
    async with AsyncKeelClient(stack.engine) as client:
        await client.start_run(_pipeline({"op_id": "manual", "task_queue": "manual-q"}))
    async with (
        grpc.aio.insecure_channel(stack.engine) as channel,
        grpc.aio.insecure_channel(stack.store) as store,
    ):
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        request = worker_pb2.PollTaskRequest(task_queue="manual-q", worker_id="by-hand")
        request.wait.FromSeconds(10)
        polled = await stub.PollTask(request)
        assert polled.HasField("task")
        yield stub, polled.task, store_pb2_grpc.StoreServiceStub(store)


async def _refused(call: Awaitable[Any], status: grpc.StatusCode, reason: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == status, caught.value
    assert from_rpc_error(caught.value).code == reason, caught.value
    return caught.value.details() or ""


async def _task_head(store: Any, task: worker_pb2.Task) -> int:
    stream = TaskToken.decode(task.task_token).stream_id
    response = await store.HeadSeq(store_pb2.HeadSeqRequest(stream_id=stream))
    return int(response.head_seq)


GARBAGE = ["", "garbage", "eyJub3QiOiJhIHRva2VuIn0", "W10"]  # empty, not base64 JSON, an object, []


async def test_bad_input_to_every_worker_rpc_is_refused_with_a_reason_and_writes_nothing(
    claimed: tuple[Any, worker_pb2.Task, Any],
) -> None:
    stub, task, store = claimed
    head = await _task_head(store, task)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await _refused(stub.PollTask(worker_pb2.PollTaskRequest()), invalid, "invalid_task_queue")
    await _refused(stub.PollTask(worker_pb2.PollTaskRequest(task_queue="q")), invalid, "invalid_argument")
    await _refused(
        stub.PollTask(worker_pb2.PollTaskRequest(task_queue="no such queue!", worker_id="w")),
        invalid,
        "invalid_task_queue",
    )
    for token in GARBAGE:
        await _refused(
            stub.HeartbeatTask(worker_pb2.HeartbeatTaskRequest(task_token=token)),
            invalid,
            "task_token_invalid",
        )
        await _refused(
            stub.RecordFact(worker_pb2.RecordFactRequest(task_token=token, namespace="n", fact_key="k")),
            invalid,
            "task_token_invalid",
        )
        await _refused(
            stub.CompleteTask(worker_pb2.CompleteTaskRequest(task_token=token)), invalid, "task_token_invalid"
        )
        failure = engine_pb2.ErrorDetail(code="boom")
        await _refused(
            stub.FailTask(worker_pb2.FailTaskRequest(task_token=token, error=failure)),
            invalid,
            "task_token_invalid",
        )
        await _refused(
            stub.GetArtifact(worker_pb2.GetArtifactRequest(task_token=token, artifact_id="sha256:00")).read(),
            invalid,
            "task_token_invalid",
        )
    unknown = worker_pb2.PollTaskRequest(task_queue="nobody-polls-this", worker_id="w")
    unknown.wait.FromMilliseconds(100)
    assert not (await stub.PollTask(unknown)).HasField("task")  # an unknown queue is an empty one
    # A well-formed token of a task that does not exist.
    real = TaskToken.decode(task.task_token)
    ghost = TaskToken("00000000-0000-4000-8000-000000000000", real.step_id, 0, real.claim).encode()
    await _refused(
        stub.HeartbeatTask(worker_pb2.HeartbeatTaskRequest(task_token=ghost)),
        grpc.StatusCode.NOT_FOUND,
        "task_not_found",
    )
    # A stale claim of the real task.
    stale = TaskToken(real.run_id, real.step_id, real.attempt, real.claim + 5).encode()
    await _refused(
        stub.CompleteTask(worker_pb2.CompleteTaskRequest(task_token=stale)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "task_stale",
    )
    # The real token with bad contents.
    token = task.task_token
    fact = worker_pb2.RecordFactRequest
    await _refused(
        stub.RecordFact(fact(task_token=token, namespace="n", fact_key="")), invalid, "missing_fact_key"
    )
    await _refused(
        stub.RecordFact(fact(task_token=token, namespace="n", fact_key="DB_PASSWORD=hunter2")),
        invalid,
        "secrets_detected",
    )
    await _refused(
        stub.RecordFact(fact(task_token=token, namespace="", fact_key="k")), invalid, "invalid_argument"
    )
    nan = struct_pb2.Value(number_value=float("nan"))
    await _refused(
        stub.RecordFact(fact(task_token=token, namespace="n", fact_key="k", response=nan)),
        invalid,
        "invalid_json",
    )
    big = struct_pb2.Value(string_value="x" * (5 * 1024 * 1024))
    await _refused(
        stub.CompleteTask(worker_pb2.CompleteTaskRequest(task_token=token, output=big)),
        invalid,
        "output_too_large",
    )
    await _refused(stub.FailTask(worker_pb2.FailTaskRequest(task_token=token)), invalid, "invalid_argument")
    await _refused(
        stub.GetArtifact(worker_pb2.GetArtifactRequest(task_token=token, artifact_id="sha256:00")).read(),
        grpc.StatusCode.NOT_FOUND,
        "artifact_not_found",
    )
    assert await _task_head(store, task) == head  # nothing was written
    # And the claim still works: the task completes, and a repeated completion is OK.
    done = worker_pb2.CompleteTaskRequest(task_token=token, output=struct_pb2.Value(string_value="ok"))
    await stub.CompleteTask(done)
    await stub.CompleteTask(done)
    other = worker_pb2.CompleteTaskRequest(task_token=token, output=struct_pb2.Value(string_value="other"))
    await _refused(stub.CompleteTask(other), grpc.StatusCode.FAILED_PRECONDITION, "task_stale")
    queues = await stub.ListQueues(worker_pb2.ListQueuesRequest())
    listed = [(q.task_queue, q.backlog, q.running, [w.worker_id for w in q.workers]) for q in queues.queues]
    assert listed == [("manual-q", 0, 0, ["by-hand"]), ("nobody-polls-this", 0, 0, ["w"])]


# --- values the run records some levels down nest that many levels less (keel_core.json_rules) ----


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


async def _watched_to_the_end(engine: str, run_id: str) -> engine_pb2.Run:
    """Every event of the run through WatchRun (which ends after RunCompleted), then GetRun's run."""
    async with grpc.aio.insecure_channel(engine) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        events = [m.event async for m in stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id))]
        assert events[-1].type == "RunCompleted"
        return (await stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run


async def test_a_workers_answer_and_output_nest_one_level_less_as_the_run_holds_them(
    stack: Stack, claimed: tuple[Any, worker_pb2.Task, Any]
) -> None:
    # The run's FactRecorded holds an answer one level down, its context an output.
    stub, task, store = claimed
    token, head = task.task_token, await _task_head(store, task)
    deepest, too_deep = to_value(_nested(MAX_JSON_DEPTH - 1)), to_value(_nested(MAX_JSON_DEPTH))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    fact = worker_pb2.RecordFactRequest(task_token=token, namespace="n", fact_key="k", response=too_deep)
    message = await _refused(stub.RecordFact(fact), invalid, "invalid_json")
    assert message.startswith("response") and f"nests deeper than {MAX_JSON_DEPTH - 1} levels" in message
    done = worker_pb2.CompleteTaskRequest(task_token=token, output=too_deep)
    message = await _refused(stub.CompleteTask(done), invalid, "invalid_json")
    assert message.startswith("output") and f"nests deeper than {MAX_JSON_DEPTH - 1} levels" in message
    assert await _task_head(store, task) == head  # nothing was written
    fact.response.CopyFrom(deepest)
    await stub.RecordFact(fact)
    done.output.CopyFrom(deepest)
    await stub.CompleteTask(done)
    run = await _watched_to_the_end(stack.engine, TaskToken.decode(token).run_id)
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert run.steps[0].output == deepest


async def test_a_workers_error_details_nest_two_levels_less_as_the_failure_events_hold_them(
    stack: Stack, claimed: tuple[Any, worker_pb2.Task, Any]
) -> None:
    # StepAttemptFailed and RunCompleted hold them at {"error": {"details": ...}}.
    stub, task, store = claimed
    head = await _task_head(store, task)
    too_deep = engine_pb2.ErrorDetail(code="boom", details=to_value({"v": _nested(MAX_JSON_DEPTH - 2)}))
    failed = worker_pb2.FailTaskRequest(task_token=task.task_token, error=too_deep)
    message = await _refused(stub.FailTask(failed), grpc.StatusCode.INVALID_ARGUMENT, "invalid_json")
    assert message.startswith("error.details") and f"deeper than {MAX_JSON_DEPTH - 2} levels" in message
    assert await _task_head(store, task) == head  # nothing was written
    deepest = to_value({"v": _nested(MAX_JSON_DEPTH - 3)})
    failed.error.details.CopyFrom(deepest)
    await stub.FailTask(failed)
    run = await _watched_to_the_end(stack.engine, TaskToken.decode(task.task_token).run_id)
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "boom" and run.error.details == deepest
