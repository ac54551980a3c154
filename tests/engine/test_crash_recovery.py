"""Crash tests with real processes: engines SIGKILLed at each failpoint, the store SIGKILLed mid-batch."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

from engine_service import EngineConfig, start_engine
from keel_core.json_values import from_value, to_value
from tests.engine.crash_ops import read_io_log
from tests.engine.processes import ServiceProcess, start_engine_process, start_store_process

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub

pytestmark = pytest.mark.slow


def crash_pipeline() -> engine_pb2.Pipeline:
    """echo -> two recorded calls -> transform of both."""
    return engine_pb2.Pipeline(
        pipeline_id="crashy",
        steps=[
            engine_pb2.Step(step_id="s1", op_id="keel.echo", op_config=to_value({"n": 1})),
            engine_pb2.Step(step_id="s2", op_id="test.two_calls", depends_on=["s1"]),
            engine_pb2.Step(
                step_id="s3",
                op_id="keel.transform",
                op_config=to_value({"fields": {"got": "$context.s2.second", "in": "$input.order"}}),
                depends_on=["s2"],
            ),
        ],
    )


def start_request(order: int, **kwargs: Any) -> engine_pb2.StartRunRequest:
    """A StartRun of the crash pipeline."""
    return engine_pb2.StartRunRequest(pipeline=crash_pipeline(), input=to_value({"order": order}), **kwargs)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A store subprocess over a fresh data dir."""
    process = await start_store_process(tmp_path / "store")
    yield process
    await process.kill()


async def _stub(engine: ServiceProcess) -> tuple[grpc.aio.Channel, EngineServiceAsyncStub]:
    channel = grpc.aio.insecure_channel(engine.address)
    return channel, engine_pb2_grpc.EngineServiceStub(channel)


@pytest.mark.parametrize(
    "failpoint",
    [
        "after_step_attempt_started:s2",
        "after_fact_recorded:s2",
        "after_op_returned:s2",
        # s2's StepCompleted is still write-behind when s3 returns: s2 reruns, its facts come from the stream.
        "after_op_returned:s3",
        "before_run_completed",
    ],
)
# A long linger makes "s2's StepCompleted is still pending when s3 returns" certain, not likely.
@pytest.mark.parametrize("linger", [30.0, 0.0], ids=["write-behind", "append-per-step"])
async def test_run_killed_at_failpoint_completes_on_a_new_engine_with_each_fact_called_once(
    store: ServiceProcess, tmp_path: Path, failpoint: str, linger: float
) -> None:
    io_log = str(tmp_path / "io.log")
    doomed = await start_engine_process(
        store.address, failpoints=failpoint, io_log=io_log, checkpoint_linger=linger
    )
    channel, stub = await _stub(doomed)
    run_id = str(uuid.uuid4())
    try:
        with contextlib.suppress(grpc.aio.AioRpcError):  # the engine may die before it answers
            await stub.StartRun(start_request(7, run_id=run_id), timeout=30)
        assert await asyncio.wait_for(doomed.process.wait(), 30) == -9, "the failpoint did not fire"
    finally:
        await channel.close(grace=None)
        await doomed.kill()

    survivor = await start_engine_process(store.address, io_log=io_log)
    channel, stub = await _stub(survivor)
    try:
        # Nobody calls ResumeRun: the new engine resumes active runs on start-up.
        awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=30)
        assert awaited.done
        assert awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
        reference = await stub.StartRun(start_request(7, wait=True), timeout=30)
        assert reference.run.status == engine_pb2.RUN_STATUS_COMPLETED
        assert from_value(awaited.run.final_snapshot) == from_value(reference.run.final_snapshot)
        assert awaited.run.final_snapshot_id == reference.run.final_snapshot_id
        calls = collections.Counter(key for run, key in read_io_log(io_log) if run == run_id)
        assert calls == {"s2-first": 1, "s2-second": 1}
        # Each step completed exactly once.
        for step in awaited.run.steps:
            assert [a.status for a in step.attempts].count(engine_pb2.STEP_STATUS_COMPLETED) == 1
        if failpoint == "after_op_returned:s3" and linger > 0:
            s2 = next(step for step in awaited.run.steps if step.step_id == "s2")
            assert [a.attempt for a in s2.attempts] == [0, 1]  # rerun; its facts were served from the stream
    finally:
        await channel.close(grace=None)
        assert await survivor.terminate() == 0


async def test_store_killed_mid_batch_and_restarted_every_run_completes_once(tmp_path: Path) -> None:
    data = tmp_path / "store"
    io_log = str(tmp_path / "io.log")
    store = await start_store_process(data)
    engine = await start_engine_process(store.address, io_log=io_log)
    channel, stub = await _stub(engine)
    pipeline = engine_pb2.Pipeline(
        pipeline_id="slowish",
        steps=[
            engine_pb2.Step(step_id="nap", op_id="keel.sleep", op_config=to_value({"seconds": 0.3})),
            engine_pb2.Step(step_id="s2", op_id="test.two_calls", depends_on=["nap"]),
            engine_pb2.Step(
                step_id="nap2", op_id="keel.sleep", op_config=to_value({"seconds": 0.3}), depends_on=["s2"]
            ),
        ],
    )
    try:
        run_ids = []
        for order in range(12):
            response = await stub.StartRun(
                engine_pb2.StartRunRequest(pipeline=pipeline, input=to_value({"order": order})), timeout=30
            )
            run_ids.append(response.run_id)
        await asyncio.sleep(0.2)
        await store.kill()
        await asyncio.sleep(1.0)
        store = await start_store_process(data, port=store.port)
        for run_id in run_ids:
            awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=60)
            assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run
            for step in awaited.run.steps:
                assert [a.status for a in step.attempts].count(engine_pb2.STEP_STATUS_COMPLETED) == 1
        listed = await stub.ListRuns(engine_pb2.ListRunsRequest(page_size=100), timeout=30)
        assert sorted(r.run_id for r in listed.runs) == sorted(run_ids)
        calls = collections.Counter(read_io_log(io_log))
        assert set(calls.values()) == {1}
        assert len(calls) == 2 * len(run_ids)
    finally:
        await channel.close(grace=None)
        assert await engine.terminate() == 0
        await store.kill()


async def test_sigterm_parks_running_runs_and_the_next_engine_finishes_them(store: ServiceProcess) -> None:
    engine = await start_engine_process(store.address)
    channel, stub = await _stub(engine)
    steps = engine_pb2.Pipeline(
        pipeline_id="napper",
        steps=[
            engine_pb2.Step(step_id="first", op_id="keel.echo"),
            engine_pb2.Step(
                # An op that stays running (a durable keel.sleep would be waiting, not running).
                step_id="nap",
                op_id="keel.sleep_in_process",
                op_config=to_value({"seconds": 30}),
                depends_on=["first"],
            ),
        ],
    )
    try:
        started = await stub.StartRun(engine_pb2.StartRunRequest(pipeline=steps), timeout=30)
    finally:
        await channel.close(grace=None)
    assert await engine.terminate() == 0  # drained without waiting for the 30 s op
    second = await start_engine_process(store.address)
    channel, stub = await _stub(second)
    try:
        run = (await stub.GetRun(engine_pb2.GetRunRequest(run_id=started.run_id), timeout=30)).run
        assert run.status == engine_pb2.RUN_STATUS_RUNNING
        # The decided work was flushed when the run was parked: `first` stays completed.
        assert run.steps[0].status == engine_pb2.STEP_STATUS_COMPLETED
        assert run.steps[1].status == engine_pb2.STEP_STATUS_RUNNING
    finally:
        await channel.close(grace=None)
        assert await second.terminate() == 0


async def test_retrying_an_idempotent_start_after_a_crash_drives_the_run_to_the_end(
    store: ServiceProcess,
) -> None:
    doomed = await start_engine_process(store.address, failpoints="after_step_attempt_started:s2")
    channel, stub = await _stub(doomed)
    run_id = str(uuid.uuid4())
    try:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.StartRun(start_request(3, run_id=run_id), timeout=30)
        assert await asyncio.wait_for(doomed.process.wait(), 30) == -9
    finally:
        await channel.close(grace=None)
        await doomed.kill()
    # An engine that does not recover on start-up: only the client's retried start can revive the run.
    engine = await start_engine(
        EngineConfig(listen="127.0.0.1:0", store=store.address, recover_on_start=False)
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
    try:
        retried = await engine_pb2_grpc.EngineServiceStub(channel).StartRun(
            start_request(3, run_id=run_id, wait=True), timeout=30
        )
        assert not retried.created
        assert retried.run.status == engine_pb2.RUN_STATUS_COMPLETED
    finally:
        await channel.close(grace=None)
        await engine.drain(0.5)
