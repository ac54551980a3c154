"""A running op is visible, attempts carry the engine's own times, and AwaitRun resumes an undriven run."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2

from keel_core.json_values import to_value
from tests.engine.conftest import Cluster, gate, start_test_engine


def gated_run(gate_name: str) -> engine_pb2.StartRunRequest:
    """A run of one `test.gated` step named `wait`, after an `echo` step."""
    return engine_pb2.StartRunRequest(
        pipeline=engine_pb2.Pipeline(
            pipeline_id="gated",
            steps=[
                engine_pb2.Step(step_id="echo", op_id="keel.echo"),
                engine_pb2.Step(
                    step_id="wait",
                    op_id="test.gated",
                    op_config=to_value({"gate": gate_name}),
                    depends_on=["echo"],
                ),
            ],
        ),
        input=to_value(7),
    )


async def _until_event(cluster: Cluster, run_id: str, event_type: str) -> None:
    async for message in cluster.stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id)):
        if message.event.type == event_type and message.event.data["step_id"] == "wait":
            return


async def test_step_shows_running_while_its_op_runs(cluster: Cluster) -> None:
    name = f"visible-{uuid.uuid4()}"
    door = gate(name)
    run_id = (await cluster.stub.StartRun(gated_run(name))).run_id
    await door.wait_for(1)
    # The op cannot return before the gate opens: the append can only come from the linger timer.
    await _until_event(cluster, run_id, "StepAttemptStarted")
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    steps = {s.step_id: s for s in run.steps}
    assert run.status == engine_pb2.RUN_STATUS_RUNNING
    assert steps["wait"].status == engine_pb2.STEP_STATUS_RUNNING
    assert not steps["wait"].attempts[0].HasField("finished_at")
    door.opened.set()
    done = await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id))
    assert done.run.status == engine_pb2.RUN_STATUS_COMPLETED


async def test_attempt_times_are_the_engines_not_the_batch_commit_time(cluster: Cluster) -> None:
    name = f"timed-{uuid.uuid4()}"
    door = gate(name)
    run_id = (await cluster.stub.StartRun(gated_run(name))).run_id
    await door.wait_for(1)
    door.opened.set()
    run = (await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id))).run
    wait = {s.step_id: s for s in run.steps}["wait"].attempts[0]
    echo = {s.step_id: s for s in run.steps}["echo"].attempts[0]
    # The gate opened only after the op had started: its finish is strictly later than its start.
    assert wait.finished_at.ToMicroseconds() > wait.started_at.ToMicroseconds()
    assert echo.started_at.ToMicroseconds() <= echo.finished_at.ToMicroseconds()
    assert echo.finished_at.ToMicroseconds() <= wait.started_at.ToMicroseconds()
    assert run.created_at.ToMicroseconds() <= echo.started_at.ToMicroseconds()
    assert run.completed_at.ToMicroseconds() >= wait.finished_at.ToMicroseconds()
    events = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
    stamps = {e.type: json.loads(e.payload)["at_us"] for e in events.events if e.type != "FactRecorded"}
    assert set(stamps) == {"RunStarted", "StepAttemptStarted", "StepCompleted", "RunCompleted"}


async def test_await_run_resumes_a_run_no_engine_drives(tmp_path: Path, cluster: Cluster) -> None:
    name = f"parked-{uuid.uuid4()}"
    door = gate(name)
    run_id = (await cluster.stub.StartRun(gated_run(name))).run_id
    await door.wait_for(1)
    await cluster.engine.drain(0)  # parks the run: its op is cancelled, nobody drives it now
    assert door.cancelled == [run_id]
    second = await start_test_engine(
        cluster.store_address, recover_on_start=False, checkpoint_linger=cluster.checkpoint_linger
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{second.port}")
    try:
        door.opened.set()
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        done = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id))
        assert done.done
        assert done.run.status == engine_pb2.RUN_STATUS_COMPLETED
        assert [a.attempt for a in {s.step_id: s for s in done.run.steps}["wait"].attempts] == [0, 1]
    finally:
        await channel.close(grace=None)
        await second.drain(0.5)
