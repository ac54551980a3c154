"""GetRun shows each step's dependencies and, once it completed, its output (also while the run runs)."""

from __future__ import annotations

import uuid

from keel.engine.v1 import engine_pb2

from keel_core.json_values import from_value, to_value
from tests.engine.conftest import Cluster, gate
from tests.engine.test_engine_rpcs import pipeline, step


async def _step_completed(cluster: Cluster, run_id: str, step_id: str) -> None:
    """Until the run's stream holds StepCompleted for `step_id` (write-behind may hold it back a little)."""
    async for message in cluster.stub.WatchRun(engine_pb2.WatchRunRequest(run_id=run_id)):
        if message.event.type == "StepCompleted" and message.event.data["step_id"] == step_id:
            return
    raise AssertionError(f"the run ended without completing {step_id}")


async def test_outputs_come_from_the_latest_checkpoint_while_running_and_after(cluster: Cluster) -> None:
    door = f"outputs-{uuid.uuid4()}"
    request = engine_pb2.StartRunRequest(
        pipeline=pipeline(
            step("a", "keel.echo", {"x": 1}),
            step("b", "test.gated", {"gate": door}, depends_on=("a",)),
            step("c", "keel.echo", depends_on=("a", "b")),
        ),
        input=to_value({"n": 7}),
    )
    run_id = (await cluster.stub.StartRun(request)).run_id
    await gate(door).wait_for(1)
    await _step_completed(cluster, run_id, "a")
    running = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    steps = {s.step_id: s for s in running.steps}
    assert [list(steps[s].depends_on) for s in "abc"] == [[], ["a"], ["a", "b"]]
    assert steps["a"].HasField("output")
    assert from_value(steps["a"].output) == {"input": {"n": 7}, "config": {"x": 1}}
    assert not steps["b"].HasField("output") and not steps["c"].HasField("output")
    gate(door).opened.set()
    done = (await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id))).run
    assert done.status == engine_pb2.RUN_STATUS_COMPLETED
    final = from_value(done.final_snapshot)
    for state in done.steps:
        assert state.HasField("output") and from_value(state.output) == final[state.step_id]
