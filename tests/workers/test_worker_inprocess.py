"""Remote steps end to end in one process: a real store, a real engine, and keel_client.worker.Worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel_client import AsyncKeelClient, InvalidPlan
from keel_client.worker import CallInfo, TaskContext, Worker, op

from keel_core.metrics import REGISTRY
from tests.client.conftest import run_keel
from tests.engine.processes import eventually
from tests.workers.conftest import Stack, finished


@op("double")
async def double(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Doubles the input's n, seeing the context."""
    return {"n": input["n"] * 2, "saw": sorted(ctx.context)}


@op("charge")
async def charge(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Charges through a transport (a fact)."""
    receipt = await ctx.io.call("payments", {"amount": input["n"]}, fact_key=f"charge:{ctx.run_id}")
    return {"receipt": receipt}


class Ledger:
    """Counts transport calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def pay(self, request: Any, call: CallInfo) -> Any:
        self.calls.append(call.fact_key)
        return {"paid": request["amount"], "n": len(self.calls)}


async def test_pipeline_mixing_in_process_and_worker_steps_completes(stack: Stack) -> None:
    engine = stack.engine
    ledger = Ledger()
    worker = Worker(engine, "q1", ops=[double, charge], transports={"payments": ledger.pay}, concurrency=4)
    serving = asyncio.create_task(worker.serve())
    pipeline = {
        "pipeline_id": "mixed",
        "steps": [
            {"step_id": "a", "op_id": "keel.echo", "op_config": {"x": 1}},
            {"step_id": "b", "op_id": "double", "task_queue": "q1", "depends_on": ["a"]},
            {"step_id": "c", "op_id": "charge", "task_queue": "q1", "depends_on": ["b"]},
            {
                "step_id": "d",
                "op_id": "keel.transform",
                "depends_on": ["c"],
                "op_config": {"fields": {"n": "$context.b.n", "r": "$context.c.receipt"}},
            },
        ],
    }
    try:
        async with AsyncKeelClient(engine) as client:
            started = await client.start_run(pipeline, input={"n": 21})
            run = await finished(client, started.run_id)
            assert run.status.name == "COMPLETED", run
            assert run.final_snapshot["b"] == {"n": 42, "saw": ["a"]}
            assert run.final_snapshot["d"] == {"n": 42, "r": {"paid": 21, "n": 1}}
            assert ledger.calls == [f"charge:{started.run_id}"]
            remote = {s.step_id: s.attempts[-1] for s in run.steps if s.step_id in ("b", "c")}
            assert {a.worker_id for a in remote.values()} == {worker.worker_id}
            assert {a.task_queue for a in remote.values()} == {"q1"}
            shown = await asyncio.to_thread(run_keel, "get", started.run_id, engine=engine)
            assert "remote attempts:" in shown.stdout and worker.worker_id in shown.stdout, shown
            queues = await asyncio.to_thread(run_keel, "queues", engine=engine)
            header, row = queues.stdout.splitlines()[:2]
            assert header.split()[:3] == ["QUEUE", "BACKLOG", "RUNNING"]
            assert row.split()[:4] == ["q1", "0", "0", worker.worker_id], queues
            assert "charge@1" in row and "double@1" in row
            ops = await asyncio.to_thread(run_keel, "ops", "--json", engine=engine)
            declared = {(op["op_id"], op["task_queue"]) for op in json.loads(ops.stdout) if op["task_queue"]}
            assert declared == {("charge", "q1"), ("double", "q1")}
            described = {op["op_id"]: op["description"] for op in json.loads(ops.stdout) if op["task_queue"]}
            assert described == {  # the @op docstrings' first lines, as the worker declared them
                "charge": "Charges through a transport (a fact).",
                "double": "Doubles the input's n, seeing the context.",
            }
        # Metrics: both tasks' schedule-to-start and outcomes were counted.
        assert (
            REGISTRY.get_sample_value("keel_engine_task_schedule_to_start_seconds_count", {"queue": "q1"})
            or 0
        ) >= 2
        completed = {"outcome": "completed", "code": ""}
        assert (REGISTRY.get_sample_value("keel_engine_task_outcomes_total", completed) or 0) >= 2
    finally:
        worker.stop()
        await serving


async def test_a_spawned_child_whose_op_names_a_task_queue_runs_on_the_worker(stack: Stack) -> None:
    worker = Worker(stack.engine, "kids", ops=[double], concurrency=2)
    serving = asyncio.create_task(worker.serve())
    try:
        async with AsyncKeelClient(stack.engine) as client:
            parent = await client.start_run(op="keel.sleep", op_config={"seconds": 30})
            child = await client.spawn_child(
                parent.run_id, "kid-1", "double", input={"n": 4}, task_queue="kids"
            )
            result = await client.await_child(child.child_run_id, child.child_manifest_id)
            assert result.status.name == "COMPLETED"
            assert result.final_snapshot == {"main": {"n": 8, "saw": []}}
            with pytest.raises(InvalidPlan):
                await client.spawn_child(parent.run_id, "kid-2", "double", task_queue="no good")
            await client.cancel(parent.run_id)
    finally:
        worker.stop()
        await serving


@op("charge_order")
async def charge_order(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Charges once per order (the fact key names the order, not the run)."""
    receipt = await ctx.io.call("payments", {"amount": input["n"]}, fact_key=f"charge:{input['order']}")
    return {"receipt": receipt}


async def test_a_replay_serves_the_replayed_runs_facts_to_the_worker_and_calls_nothing(stack: Stack) -> None:
    ledger = Ledger()
    ops = [charge, charge_order]
    worker = Worker(stack.engine, "pay", ops=ops, transports={"payments": ledger.pay}, concurrency=2)
    serving = asyncio.create_task(worker.serve())
    try:
        async with AsyncKeelClient(stack.engine) as client:
            for op_id, code in (("charge_order", None), ("charge", "replay_fact_missing")):
                pipeline = {
                    "pipeline_id": op_id,
                    "steps": [{"step_id": "c", "op_id": op_id, "task_queue": "pay"}],
                }
                first = await client.start_run(pipeline, input={"n": 3, "order": "A-1"})
                original = await finished(client, first.run_id)
                calls = len(ledger.calls)
                replay_config = {"execution_mode": "replay", "replay_of_run_id": first.run_id}
                replay = await client.start_run(
                    pipeline, input={"n": 3, "order": "A-1"}, run_config=replay_config
                )
                replayed = await finished(client, replay.run_id)
                assert len(ledger.calls) == calls  # a replay calls nothing
                if code is None:
                    assert replayed.status.name == "COMPLETED", replayed
                    assert replayed.final_snapshot == original.final_snapshot
                else:  # `charge` keys its fact by run id: the replayed run recorded no such fact
                    assert replayed.status.name == "FAILED" and replayed.error is not None
                    assert replayed.error.code == code
    finally:
        worker.stop()
        await serving


GATE: asyncio.Event | None = None


@op("gated")
async def gated(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Returns once the test opens the gate."""
    assert GATE is not None
    await GATE.wait()
    return {"opened": True}


async def test_a_remote_step_longer_than_a_moment_parks_the_run_and_the_outcome_wakes_it(
    stack: Stack,
) -> None:
    global GATE
    GATE = asyncio.Event()
    worker = Worker(stack.engine, "slow", ops=[gated], concurrency=1, heartbeat_every=0.2)
    serving = asyncio.create_task(worker.serve())
    pipeline = {
        "pipeline_id": "parks",
        "steps": [
            {"step_id": "wait", "op_id": "gated", "task_queue": "slow"},
            {"step_id": "after", "op_id": "keel.echo", "depends_on": ["wait"]},
        ],
    }
    try:
        async with AsyncKeelClient(stack.engine) as client, grpc.aio.insecure_channel(stack.store) as channel:
            store = store_pb2_grpc.StoreServiceStub(channel)
            started = await client.start_run(pipeline)
            stream = f"run:{started.run_id}"

            async def parked() -> bool:
                head = await store.HeadSeq(store_pb2.HeadSeqRequest(stream_id=stream))
                return bool(head.status == store_pb2.STREAM_STATUS_PARKED)

            await eventually(parked, "the run parked while its remote step runs", within=30, poll=0.05)
            GATE.set()
            run = await finished(client, started.run_id)
            assert run.status.name == "COMPLETED", run
            assert run.final_snapshot["wait"] == {"opened": True}
            assert run.steps[0].attempts[-1].worker_id == worker.worker_id
            types = [event.type async for event in client.watch_run(started.run_id)]
            assert "StepWaiting" in types and "RunParked" in types and "RunResumed" in types
    finally:
        GATE.set()
        worker.stop()
        await serving
