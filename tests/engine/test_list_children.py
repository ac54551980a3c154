"""ListRuns by parent: the children of one run, from the store's attribute index."""

from __future__ import annotations

import grpc
from keel.engine.v1 import engine_pb2

from keel_core.json_values import to_value
from tests.engine.conftest import Cluster
from tests.engine.test_engine_rpcs import expect_error
from tests.engine.test_run_labels import listed


async def _fan_out(cluster: Cluster, inputs: list[int]) -> engine_pb2.StartRunResponse:
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(
            op_id="keel.fan_out", op_config=to_value({"op_id": "test.tick_once", "inputs": inputs})
        ),
        wait=True,
    )
    started = await cluster.stub.StartRun(request)
    assert started.run.status == engine_pb2.RUN_STATUS_COMPLETED
    return started


async def test_list_runs_of_one_parent(cluster: Cluster) -> None:
    first, second = await _fan_out(cluster, [1, 2]), await _fan_out(cluster, [3, 4, 5])
    for parent in (first, second):
        children = {c.child_run_id for c in parent.run.children}
        assert set(await listed(cluster, parent_run_id=parent.run_id)) == children
        # Combined with the other filters (AND): children are never top-level.
        assert (
            await listed(cluster, parent_run_id=parent.run_id, lineage=engine_pb2.RUN_LINEAGE_TOP_LEVEL) == []
        )
    assert await listed(cluster, parent_run_id="6f1c2b9e-3d4a-4e5f-9a8b-7c6d5e4f3a2b") == []


async def test_list_runs_refuses_a_parent_that_is_not_a_run_id(cluster: Cluster) -> None:
    for bad in ("not-a-uuid", "6f1c2b9e3d4a4e5f9a8b7c6d5e4f3a2b", "x" * 5000):
        request = engine_pb2.ListRunsRequest(parent_run_id=bad)
        await expect_error(cluster.stub.ListRuns(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_run_id")
