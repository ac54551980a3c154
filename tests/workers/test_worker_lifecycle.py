"""What a worker author is promised beyond the happy path: a graceful SIGTERM (finish, or hand back),
a context too large to travel inline, fetched through WorkerService.GetArtifact, a cancel of the run
reaching the worker as `cancel_requested` on its next heartbeat, and RecordFact of a key the run
holds answering the recorded response."""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf import struct_pb2
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel.worker.v1 import worker_pb2, worker_pb2_grpc
from keel_client import AsyncKeelClient
from keel_client.worker import CallInfo, OpFailure, TaskContext, TaskIo, Worker, _in_a_thread, _worker_op, op

from engine_service.domain.streams import task_stream_id
from engine_service.domain.tasks import (
    TaskScheduled,
    decode_op_descriptions,
    decode_task_event,
    encode_op_descriptions,
)
from engine_service.runtime.task_board import MAX_INLINE_CONTEXT_BYTES
from keel_core.json_values import from_value, to_value
from keel_core.status import from_rpc_error
from tests.engine.processes import ServiceProcess, eventually, start_engine_process, start_store_process
from tests.workers.conftest import Stack, Workers, finished, ledger_lines

WITHIN = 60.0  # bounds each wait; no timing claim


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A store-service subprocess on SQLite."""
    process = await start_store_process(tmp_path / "store")
    try:
        yield process
    finally:
        await process.kill()


def _one_remote_step(step_id: str, op_id: str, queue: str, **fields: Any) -> dict[str, Any]:
    return {
        "pipeline_id": "lifecycle",
        "steps": [{"step_id": step_id, "op_id": op_id, "task_queue": queue, **fields}],
    }


async def test_sigterm_lets_the_running_task_finish_takes_no_new_one_and_exits(
    store: ServiceProcess, workers: Workers
) -> None:
    engine = await start_engine_process(store.address)
    try:
        worker = await workers.start(engine.address, "term-q", "worker-a", shutdown_grace=WITHIN * 2)
        async with AsyncKeelClient(engine.address) as client:
            pipeline = _one_remote_step(
                "g",
                "gated",
                "term-q",
            )
            first = await client.start_run(pipeline)
            await eventually(
                lambda: ledger_lines(workers.ledger, "start"),
                "worker A took the task",
                within=WITHIN,
                poll=0.02,
            )
            worker.signal(signal.SIGTERM)
            await eventually(
                lambda: "waiting up to" in worker.log_text(),
                "worker A stopped polling and waits for its task",
                within=WITHIN,
                poll=0.02,
            )
            second = await client.start_run(pipeline)  # nobody polls the queue now
            worker.signal(signal.SIGUSR1)  # opens the gate: the task completes
            assert await asyncio.wait_for(worker.process.wait(), WITHIN) == 0
            run = await finished(client, first.run_id)
            assert run.status.name == "COMPLETED", run
            assert run.final_snapshot["g"] == {"attempt": 0}
            assert [a.worker_id for a in run.steps[0].attempts] == ["worker-a"]
            waiting = await client.get_run(second.run_id)
            assert waiting.status.name == "RUNNING"
            queues = {q.task_queue: q for q in await client.list_queues()}
            assert queues["term-q"].backlog == 1 and queues["term-q"].running == 0
            assert len(ledger_lines(workers.ledger, "start")) == 1  # the second task was never taken
            (await workers.start(engine.address, "term-q", "worker-b")).signal(signal.SIGUSR1)
            later = await finished(client, second.run_id)
            assert later.status.name == "COMPLETED", later
            assert [a.worker_id for a in later.steps[0].attempts] == ["worker-b"]
    finally:
        await engine.kill()


async def test_sigterm_hands_a_task_still_running_after_the_grace_back_for_the_next_worker(
    store: ServiceProcess, workers: Workers
) -> None:
    engine = await start_engine_process(store.address)
    try:
        worker = await workers.start(engine.address, "back-q", "worker-a", shutdown_grace=0.5)
        async with AsyncKeelClient(engine.address) as client:
            # The claim would outlive the test: only the hand-back can end attempt 0.
            pipeline = _one_remote_step(
                "pay", "slow_pay", "back-q", op_config={"hang_attempts": [0]}, heartbeat_timeout="600s"
            )
            started = await client.start_run(pipeline, input={"amount": 3})
            await eventually(
                lambda: ledger_lines(workers.ledger, "paid"), "worker A paid", within=WITHIN, poll=0.02
            )
            worker.signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.process.wait(), WITHIN) == 0
            await workers.start(engine.address, "back-q", "worker-b")
            run = await finished(client, started.run_id)
            assert run.status.name == "COMPLETED", run
            attempts = run.steps[0].attempts
            assert [a.worker_id for a in attempts] == ["worker-a", "worker-b"]
            assert attempts[0].error is not None and attempts[0].error.code == "worker_shutdown"
            # Worker B was served the payment worker A recorded.
            assert ledger_lines(workers.ledger, "pay") == [f"pay pay:{started.run_id}:pay"]
            assert run.final_snapshot["pay"] == {"receipt": {"paid": 3}, "attempt": 1, "seen": []}
    finally:
        await engine.kill()


@op("measure")
async def measure(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """The sizes of the blobs the steps before this one echoed, and the context's keys."""
    return {"sizes": [len(ctx.context[s]["input"]["blob"]) for s in ("a", "b")], "keys": sorted(ctx.context)}


async def test_a_context_too_large_to_inline_reaches_the_worker_through_get_artifact(stack: Stack) -> None:
    # The context a step starts from holds the outputs of the steps it depends on: two echoes of an
    # input under the input's own size limit (1 MiB) make it larger than a task carries inline.
    blob = "x" * (MAX_INLINE_CONTEXT_BYTES // 2 + 1)
    pipeline = {
        "pipeline_id": "big-context",
        "steps": [
            {"step_id": "a", "op_id": "keel.echo"},
            {"step_id": "b", "op_id": "keel.echo"},
            {"step_id": "m", "op_id": "measure", "task_queue": "big", "depends_on": ["a", "b"]},
        ],
    }
    worker = Worker(stack.engine, "big", ops=[measure], concurrency=1)
    serving = asyncio.create_task(worker.serve())
    try:
        async with AsyncKeelClient(stack.engine) as client:
            started = await client.start_run(pipeline, input={"blob": blob})
            run = await finished(client, started.run_id)
            assert run.status.name == "COMPLETED", run
            assert run.final_snapshot["m"] == {"sizes": [len(blob), len(blob)], "keys": ["a", "b"]}
        # The task carried the context as an artifact, not inline.
        async with grpc.aio.insecure_channel(stack.store) as channel:
            read = await store_pb2_grpc.StoreServiceStub(channel).ReadEvents(
                store_pb2.ReadEventsRequest(stream_id=task_stream_id(started.run_id, "m", 0))
            )
        scheduled = decode_task_event(read.events[0].type, read.events[0].payload)
        assert isinstance(scheduled, TaskScheduled)
        assert scheduled.context_artifact_id.startswith("sha256:")
    finally:
        worker.stop()
        await serving


async def test_a_cancel_reaches_the_claim_as_cancel_requested_and_its_completion_is_stale(
    stack: Stack,
) -> None:
    async with AsyncKeelClient(stack.engine) as client:
        started = await client.start_run(
            _one_remote_step("s", "manual", "cancel-q", heartbeat_timeout="600s")
        )
        async with grpc.aio.insecure_channel(stack.engine) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            poll = worker_pb2.PollTaskRequest(task_queue="cancel-q", worker_id="by-hand")
            poll.wait.FromSeconds(int(WITHIN))
            task = (await stub.PollTask(poll)).task
            beat = worker_pb2.HeartbeatTaskRequest(task_token=task.task_token)
            assert not (await stub.HeartbeatTask(beat)).cancel_requested
            await client.cancel(started.run_id, reason="operator")
            assert (await stub.HeartbeatTask(beat)).cancel_requested
            canceled = await client.get_run(started.run_id)
            done = worker_pb2.CompleteTaskRequest(
                task_token=task.task_token, output=struct_pb2.Value(number_value=1)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CompleteTask(done)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert from_rpc_error(refused.value).code == "task_stale"
            after = await client.get_run(started.run_id)
            assert after.status.name == "CANCELED" and after.head_seq == canceled.head_seq


STARTED: asyncio.Event | None = None
CANCELLED: asyncio.Event | None = None


@op("until_cancelled")
async def until_cancelled(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Waits until its task is cancelled, and says so."""
    assert STARTED is not None and CANCELLED is not None
    STARTED.set()
    try:
        await asyncio.Event().wait()
    finally:
        CANCELLED.set()


async def test_a_cancel_of_the_run_cancels_the_python_workers_op(stack: Stack) -> None:
    global STARTED, CANCELLED
    STARTED, CANCELLED = asyncio.Event(), asyncio.Event()
    worker = Worker(stack.engine, "stop-q", ops=[until_cancelled], concurrency=1, heartbeat_every=0.1)
    serving = asyncio.create_task(worker.serve())
    try:
        async with AsyncKeelClient(stack.engine) as client:
            started = await client.start_run(_one_remote_step("s", "until_cancelled", "stop-q"))
            await asyncio.wait_for(STARTED.wait(), WITHIN)
            await client.cancel(started.run_id)
            await asyncio.wait_for(CANCELLED.wait(), WITHIN)
            run = await finished(client, started.run_id)
            assert run.status.name == "CANCELED"
    finally:
        worker.stop()
        await serving


async def test_record_fact_of_a_key_the_run_holds_answers_the_recorded_response(stack: Stack) -> None:
    pipeline = {
        "pipeline_id": "facts-per-run",
        "steps": [
            # An in-process op records the fact `shared` first: facts are keyed per run.
            {
                "step_id": "a",
                "op_id": "keel.io_call",
                "op_config": {"namespace": "keel.echo", "request": {"from": "a"}, "fact_key": "shared"},
            },
            {"step_id": "r", "op_id": "manual", "task_queue": "facts-q", "depends_on": ["a"]},
        ],
    }
    async with AsyncKeelClient(stack.engine) as client:
        started = await client.start_run(pipeline)
        async with grpc.aio.insecure_channel(stack.engine) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            poll = worker_pb2.PollTaskRequest(task_queue="facts-q", worker_id="by-hand")
            poll.wait.FromSeconds(int(WITHIN))
            task = (await stub.PollTask(poll)).task
            assert {f.fact_key: from_value(f.response) for f in task.facts} == {
                "shared": {"echo": {"from": "a"}}
            }

            def record(key: str, response: Any) -> Any:
                return stub.RecordFact(
                    worker_pb2.RecordFactRequest(
                        task_token=task.task_token, namespace="n", fact_key=key, response=to_value(response)
                    )
                )

            first = await record("mine", {"n": 1})
            assert from_value(first.response) == {"n": 1} and not first.already_recorded
            again = await record("mine", {"n": 2})
            assert from_value(again.response) == {"n": 1} and again.already_recorded
            shared = await record("shared", {"from": "r"})
            assert from_value(shared.response) == {"echo": {"from": "a"}} and shared.already_recorded
            await stub.CompleteTask(
                worker_pb2.CompleteTaskRequest(task_token=task.task_token, output=to_value({"done": True}))
            )
        run = await finished(client, started.run_id)
        assert run.status.name == "COMPLETED", run
        recorded = [
            e.data["fact_key"] async for e in client.watch_run(started.run_id) if e.type == "FactRecorded"
        ]
        assert sorted(recorded) == ["mine", "shared"]  # each key once in the run's stream


def test_op_descriptions_fit_one_attribute_and_read_back() -> None:
    few = {"charge@1": "Charges  the\norder once", "refund@1": ""}
    assert decode_op_descriptions(encode_op_descriptions(few)) == {"charge@1": "Charges the order once"}
    many = {f"op{n}@1": f"café {n} " + "x" * 300 for n in range(50)}
    encoded = encode_op_descriptions(many)
    assert len(encoded) <= 1000 and encoded.isascii() and encoded.isprintable()
    kept = decode_op_descriptions(encoded)
    assert 1 < len(kept) < len(many) and all(many[key].startswith(value) for key, value in kept.items())
    assert encode_op_descriptions({}) == "" and decode_op_descriptions("not json") == {}


RELEASE = threading.Event()
TOLD = threading.Event()
paid_keys: list[str] = []


async def _pay(request: Any, call: CallInfo) -> Any:
    paid_keys.append(call.fact_key)
    return {"paid": request["amount"]}


@op("blocking_pay")
def blocking_pay(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """A plain op that blocks its thread (a synchronous SDK, say), then pays through ctx.io."""
    RELEASE.wait(WITHIN)  # a hang detector, not a timing claim
    receipt = ctx.io.call_blocking("payments", {"amount": input["n"]}, fact_key=f"pay:{ctx.run_id}")
    return {"receipt": receipt, "in_a_thread": threading.current_thread() is not threading.main_thread()}


LINGER = threading.Event()
AFTER_STOP: list[str] = []


@op("blocking_until_told")
def blocking_until_told(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """A plain op that works until the worker tells it to stop, then tries to pay, then lingers."""
    RELEASE.set()  # started
    if ctx.cancelled.wait(WITHIN):
        TOLD.set()
    try:
        ctx.io.call_blocking("payments", {"amount": 1}, fact_key=f"late:{ctx.run_id}")
    except OpFailure as refused:
        AFTER_STOP.append(refused.code)
    LINGER.wait(WITHIN)  # a stopped op that runs on must not hold the worker's slot
    return {"stopped": True}


@op("quick")
def quick(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """A plain op that answers at once."""
    return {"quick": True}


async def test_a_plain_op_that_blocks_keeps_its_claim_and_pays_once(stack: Stack) -> None:
    # A blocking op used to run on the worker's event loop and stop its heartbeats: past the step's
    # heartbeat timeout the claim lapsed and another attempt ran the op (and its payment) again.
    # A plain `def` op runs in a thread; the heartbeats go on while it blocks.
    RELEASE.clear()
    paid_keys.clear()
    worker = Worker(stack.engine, "block-q", ops=[blocking_pay], transports={"payments": _pay}, concurrency=2)
    serving = asyncio.create_task(worker.serve())
    try:
        async with AsyncKeelClient(stack.engine) as client:
            pipeline = _one_remote_step("s", "blocking_pay", "block-q", heartbeat_timeout="3s")
            started = await client.start_run(pipeline, input={"n": 7})
            # Six beats, one every second: blocked twice as long as the heartbeat timeout allows.
            await eventually(
                lambda: worker.heartbeats >= 6, "six heartbeats while the op blocks", within=WITHIN, poll=0.05
            )
            RELEASE.set()
            run = await finished(client, started.run_id)
            assert run.status.name == "COMPLETED", run
            assert run.final_snapshot["s"] == {"receipt": {"paid": 7}, "in_a_thread": True}
            assert [a.attempt for a in run.steps[0].attempts] == [0]
            assert paid_keys == [f"pay:{started.run_id}"]
    finally:
        RELEASE.set()
        worker.stop()
        await serving


async def test_a_plain_op_is_told_when_its_run_is_canceled_and_calls_nothing_after(stack: Stack) -> None:
    RELEASE.clear()
    TOLD.clear()
    LINGER.clear()
    AFTER_STOP.clear()
    paid_keys.clear()
    worker = Worker(
        stack.engine,
        "told-q",
        ops=[blocking_until_told, quick],
        transports={"payments": _pay},
        concurrency=1,
        heartbeat_every=0.1,
    )
    serving = asyncio.create_task(worker.serve())
    try:
        async with AsyncKeelClient(stack.engine) as client:
            started = await client.start_run(_one_remote_step("s", "blocking_until_told", "told-q"))
            await asyncio.to_thread(RELEASE.wait, WITHIN)
            await client.cancel(started.run_id)
            assert await asyncio.to_thread(TOLD.wait, WITHIN)
            run = await finished(client, started.run_id)
            assert run.status.name == "CANCELED"
            await eventually(lambda: AFTER_STOP, "the stopped op's call refused", within=WITHIN, poll=0.05)
            assert AFTER_STOP == ["task_stopped"]
            assert paid_keys == []  # its thread runs on, but calls nothing
            # The stopped op still runs in its thread; the worker's one slot is free for the next.
            second = await client.start_run(_one_remote_step("q", "quick", "told-q"))
            run = await finished(client, second.run_id)
            assert run.status.name == "COMPLETED" and run.final_snapshot["q"] == {"quick": True}
    finally:
        LINGER.set()
        worker.stop()
        await serving


def test_which_ops_run_in_a_thread_and_what_a_thread_op_hands_back() -> None:
    def logged(function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any) -> Any:
            return function(*args)  # a sync wrapper: the coroutine it returns is awaited on the loop

        return wrapper

    @logged
    async def wrapped(ctx: TaskContext, op_config: Any, input: Any) -> Any:
        return {"wrapped": True}

    class Called:
        async def __call__(self, ctx: TaskContext, op_config: Any, input: Any) -> Any:
            return {}

    def stops() -> Any:
        raise StopIteration  # a future cannot hold it: it hung the op for ever

    assert _worker_op(op("wrapped")(wrapped)).blocking  # what is called is sync
    assert not _worker_op(op("called")(Called())).blocking
    assert not _worker_op(op("partial")(functools.partial(wrapped.__wrapped__))).blocking
    assert _worker_op(blocking_pay).blocking

    async def main() -> None:
        assert await _in_a_thread(lambda: wrapped(None, None, None), "t") == {"wrapped": True}
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(_in_a_thread(stops, "t"), WITHIN)  # a hang detector

    asyncio.run(main())


def test_io_call_blocking_on_the_event_loop_is_refused_not_a_deadlock() -> None:
    async def main() -> None:
        running = cast(Any, object())
        io = TaskIo(running, {}, asyncio.get_running_loop(), threading.Event())
        with pytest.raises(OpFailure) as refused:
            io.call_blocking("payments", {}, fact_key="k")
        assert refused.value.code == "blocking_call_on_event_loop"

    asyncio.run(main())
