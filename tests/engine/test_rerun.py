"""RerunRun over gRPC with a real store and engine: what is reused, what runs again, bad input.

Executions are counted in this module's own ledger (EXECUTIONS: one entry per op call) and the
counting clock transport's calls, never inferred from the engine's events.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from keel.engine.v1 import engine_pb2

from engine_service import OpError, StepContext, op
from keel_core.json_values import from_value, to_value
from tests.engine.conftest import CLOCK, TEST_OPS, Cluster, gate
from tests.engine.test_engine_rpcs import all_streams, expect_error, pipeline, step

# (run id, step id) of every op execution in this module.
EXECUTIONS: list[tuple[str, str]] = []
# Steps whose op fails (not retryably) while their name is here.
BROKEN: set[str] = set()


@op("test.rerun_counted", registry=TEST_OPS, description="Counts itself, records a clock fact, may fail")
async def counted(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Notes the execution, reads the clock as a fact; fails while op_config.switch is BROKEN."""
    EXECUTIONS.append((ctx.run_id, ctx.step_id))
    tick = await ctx.io.call("test.clock", {}, f"{ctx.step_id}.tick")
    switch = (op_config or {}).get("switch", "")
    if switch in BROKEN:
        raise OpError("broken", f"switch {switch} is broken", retryable=False)
    return {"tick": tick["tick"], "saw": sorted(k for k in ctx.context if not k.startswith("_"))}


def executions(run_id: str) -> list[str]:
    """The steps executed in `run_id`, in order."""
    return [s for r, s in EXECUTIONS if r == run_id]


def diamond(switch: str) -> engine_pb2.Pipeline:
    """fetch -> shape -> final, a side step on its own, and a fan-out of two children."""
    return pipeline(
        step("fetch", "test.rerun_counted"),
        step("spawn", "keel.fan_out", {"op_id": "test.tick_once", "inputs": [1, 2]}),
        step("side", "test.rerun_counted"),
        step("shape", "test.rerun_counted", None, ("fetch",)),
        step("final", "test.rerun_counted", {"switch": switch}, ("shape", "spawn")),
        pipeline_id="rerun-diamond",
    )


async def get(cluster: Cluster, run_id: str) -> engine_pb2.Run:
    """GetRun."""
    return (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run


async def rerun(
    cluster: Cluster, run_id: str, from_step_id: str, run_id_new: str = ""
) -> engine_pb2.RerunRunResponse:
    """RerunRun, then wait until the new run is terminal."""
    response = await cluster.stub.RerunRun(
        engine_pb2.RerunRunRequest(run_id=run_id, from_step_id=from_step_id, run_id_new=run_id_new)
    )
    await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=response.run_id))
    return response


async def test_rerun_of_a_failed_run_executes_the_step_and_its_descendants_only(cluster: Cluster) -> None:
    switch = f"s-{uuid.uuid4()}"
    BROKEN.add(switch)
    old = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=diamond(switch), wait=True))
    assert old.run.status == engine_pb2.RUN_STATUS_FAILED
    assert sorted(executions(old.run_id)) == ["fetch", "final", "shape", "side"]
    children = sorted(c.child_run_id for c in old.run.children)
    assert len(children) == 2
    clock_calls = len(CLOCK.calls)

    BROKEN.discard(switch)
    response = await rerun(cluster, old.run_id, "shape")
    new_id = response.run_id
    assert response.created and new_id != old.run_id
    assert sorted(executions(new_id)) == ["final", "shape"]
    # Only shape's and final's clock facts were asked again: the children did not run again either.
    assert sorted(k for r, k in CLOCK.calls[clock_calls:]) == ["final.tick", "shape.tick"]
    assert [r for r, _ in CLOCK.calls[clock_calls:]] == [new_id, new_id]

    new = await get(cluster, new_id)
    assert new.status == engine_pb2.RUN_STATUS_COMPLETED
    assert (new.rerun_of_run_id, new.rerun_from_step_id) == (old.run_id, "shape")
    reused = {s.step_id: s.reused_from_run_id for s in new.steps}
    assert reused == {"fetch": old.run_id, "spawn": old.run_id, "side": old.run_id, "shape": "", "final": ""}
    assert sorted(c.child_run_id for c in new.children) == children
    # The reused outputs are the old run's, and the rerun steps saw them.
    old_final = from_value(old.run.final_snapshot)
    new_final = from_value(new.final_snapshot)
    for reused_step in ("fetch", "spawn", "side"):
        assert new_final[reused_step] == old_final[reused_step]
    assert new_final["shape"]["saw"] == ["fetch"]
    assert new_final["final"]["saw"] == ["fetch", "shape", "spawn"]
    assert list((await get(cluster, old.run_id)).reruns) == [new_id]


async def test_rerun_reuses_facts_of_reused_steps_by_step_id(cluster: Cluster) -> None:
    old = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=diamond("never"), wait=True))
    assert old.run.status == engine_pb2.RUN_STATUS_COMPLETED
    new_id = (await rerun(cluster, old.run_id, "final")).run_id
    assert executions(new_id) == ["final"]
    final = from_value((await get(cluster, new_id)).final_snapshot)
    old_final = from_value(old.run.final_snapshot)
    assert final["shape"] == old_final["shape"]
    assert final["final"]["tick"] != old_final["final"]["tick"]  # final's fact was not copied
    # A second rerun of the same run lists both, oldest first.
    again = (await rerun(cluster, old.run_id, "fetch")).run_id
    assert sorted(executions(again)) == ["fetch", "final", "shape"]
    assert list((await get(cluster, old.run_id)).reruns) == [new_id, again]


async def test_rerun_of_a_canceled_run(cluster: Cluster) -> None:
    name = f"rerun-{uuid.uuid4()}"
    door = gate(name)
    steps = pipeline(
        step("first", "test.rerun_counted"),
        step("wait", "test.gated", {"gate": name}, ("first",)),
        pipeline_id="rerun-cancel",
    )
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=steps))
    await door.wait_for(1)
    await cluster.stub.Terminalize(
        engine_pb2.TerminalizeRequest(run_id=started.run_id, target=engine_pb2.TERMINAL_TARGET_CANCELED)
    )
    door.opened.set()
    new = await rerun(cluster, started.run_id, "wait")
    run = await get(cluster, new.run_id)
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert executions(new.run_id) == []  # `first` was reused; `wait` ran (the gate counts it)
    assert door.runs == [started.run_id, new.run_id]


async def test_rerun_with_the_same_new_id_is_idempotent(cluster: Cluster) -> None:
    old = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=diamond("never"), wait=True))
    new_id = str(uuid.uuid4())
    first = await rerun(cluster, old.run_id, "side", new_id)
    second = await rerun(cluster, old.run_id, "side", new_id)
    assert (first.run_id, first.created) == (new_id, True)
    assert (second.run_id, second.created) == (new_id, False)
    assert executions(new_id) == ["side"]
    assert list((await get(cluster, old.run_id)).reruns) == [new_id]


async def test_rerun_bad_input_fails_with_its_reason_and_writes_nothing(cluster: Cluster) -> None:
    done = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=diamond("never"), wait=True))
    name = f"rerun-busy-{uuid.uuid4()}"
    door = gate(name)
    busy = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="test.gated", op_config=to_value({"gate": name}))
        )
    )
    await door.wait_for(1)
    before = await all_streams(cluster)
    unknown = str(uuid.uuid4())

    def ask(run_id: str, from_step_id: str, run_id_new: str = "") -> Any:
        return cluster.stub.RerunRun(
            engine_pb2.RerunRunRequest(run_id=run_id, from_step_id=from_step_id, run_id_new=run_id_new)
        )

    await expect_error(ask(done.run_id, "nope"), grpc.StatusCode.NOT_FOUND, "step_not_found")
    await expect_error(ask(unknown, "fetch"), grpc.StatusCode.NOT_FOUND, "run_not_found")
    await expect_error(ask(busy.run_id, "main"), grpc.StatusCode.FAILED_PRECONDITION, "run_not_terminal")
    await expect_error(
        ask(done.run_id, "fetch", busy.run_id), grpc.StatusCode.ALREADY_EXISTS, "run_already_exists"
    )
    await expect_error(
        ask(done.run_id, "fetch", done.run_id), grpc.StatusCode.ALREADY_EXISTS, "run_already_exists"
    )
    await expect_error(
        ask(done.run_id, "fetch", "not-a-uuid"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_run_id"
    )
    await expect_error(ask("not-a-uuid", "fetch"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_run_id")
    await expect_error(ask(done.run_id, ""), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument")
    # A rerun under an id that is the rerun of another step is another run.
    new_id = str(uuid.uuid4())
    await rerun(cluster, done.run_id, "side", new_id)
    after_rerun = await all_streams(cluster)
    await expect_error(
        ask(done.run_id, "fetch", new_id), grpc.StatusCode.ALREADY_EXISTS, "run_already_exists"
    )
    assert await all_streams(cluster) == after_rerun
    # The rerun wrote its run and the links of the reused fan-out's children, nothing else.
    assert sorted(set(after_rerun) - set(before)) == [f"children:{new_id}", f"run:{new_id}"]
    door.opened.set()
