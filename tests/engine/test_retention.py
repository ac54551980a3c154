"""Retention with a real store and engine in this process: DeleteRun, passes, artifact collection.

What is gone is checked in the store itself (ListStreams, HasArtifact), not only through the engine.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc
from keel.worker.v1 import worker_pb2, worker_pb2_grpc

import engine_service.metrics as engine_metrics
from engine_service.domain.retention import artifact_ids_in
from keel_core.json_values import to_value
from store_service.server import StoreConfig, start_store
from tests.engine.conftest import Cluster, gate, start_test_engine
from tests.engine.test_engine_rpcs import expect_error, pipeline, step


async def _cluster(tmp_path: Path, *, allow_deletes: bool) -> AsyncIterator[Cluster]:
    store = await start_store(
        StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store"), allow_deletes=allow_deletes)
    )
    address = f"127.0.0.1:{store.port}"
    engine = await start_test_engine(address)
    assert engine.engine is not None
    engine.engine.retention.artifact_grace = 0.0  # collect at once: nothing else writes to this store
    engine_channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
    store_channel = grpc.aio.insecure_channel(address)
    try:
        yield Cluster(
            address,
            engine,
            0.2,
            engine_pb2_grpc.EngineServiceStub(engine_channel),
            store_pb2_grpc.StoreServiceStub(store_channel),
        )
    finally:
        await engine_channel.close(grace=None)
        await store_channel.close(grace=None)
        await engine.drain(0.5)
        await store.drain(0.5)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A store that accepts deletes (--allow-deletes) and an engine."""
    async for made in _cluster(tmp_path, allow_deletes=True):
        yield made


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A store without a token and without --allow-deletes."""
    async for made in _cluster(tmp_path, allow_deletes=False):
        yield made


def fan_out(n: int) -> engine_pb2.StartRunRequest:
    """A run that spawns `n` test.tick_once children and waits for them."""
    config = to_value({"op_id": "test.tick_once", "inputs": list(range(n))})
    return engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=config), wait=True
    )


async def streams(cluster: Cluster) -> list[str]:
    """Every stream the store holds (this engine's own liveness record left out)."""
    page = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=1000))
    return sorted(s.stream_id for s in page.streams if not s.stream_id.startswith("engine:"))


async def artifacts(cluster: Cluster) -> set[str]:
    """Every artifact the store holds."""
    before = Timestamp()
    before.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    page = await cluster.store_stub.ListArtifacts(
        store_pb2.ListArtifactsRequest(stored_before=before, page_size=1000)
    )
    return {a.artifact_id for a in page.artifacts}


async def mentioned(cluster: Cluster) -> set[str]:
    """Every artifact id any event of any stream mentions."""
    found: set[str] = set()
    page = await cluster.store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=1000))
    for summary in page.streams:
        read = await cluster.store_stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=summary.stream_id))
        for event in read.events:
            found |= artifact_ids_in(event.payload)
    return found


def owned(run_id: str) -> list[str]:
    """The streams named after a run."""
    return [f"{prefix}{run_id}" for prefix in ("run:", "children:", "ledger:", "lease:", "retention:")]


async def get(cluster: Cluster, run_id: str) -> engine_pb2.Run:
    """GetRun."""
    return (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run


async def test_a_pass_deletes_whole_terminal_trees_and_keeps_a_running_parents_children(
    cluster: Cluster,
) -> None:
    assert cluster.engine.engine is not None
    retention = cluster.engine.engine.retention
    done = await cluster.stub.StartRun(fan_out(2))
    done_children = [c.child_run_id for c in done.run.children]
    failing = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.fail_n_times", op_config=to_value({"n": 1, "retryable": False})),
        wait=True,
    )
    failed = (await cluster.stub.StartRun(failing)).run_id
    name = f"retention-{uuid.uuid4()}"
    door = gate(name)
    busy_pipeline = pipeline(
        step("spawn", "keel.fan_out", {"op_id": "test.tick_once", "inputs": [7]}),
        step("wait", "test.gated", {"gate": name}, ("spawn",)),
    )
    busy = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=busy_pipeline))
    await door.wait_for(1)
    busy_children = [c.child_run_id for c in (await get(cluster, busy.run_id)).children]
    assert (
        len(busy_children) == 1
        and (await get(cluster, busy_children[0])).status == engine_pb2.RUN_STATUS_COMPLETED
    )
    runs_before = engine_metrics.RETENTION_RUNS_DELETED._value.get()
    artifacts_before = engine_metrics.RETENTION_ARTIFACTS_DELETED._value.get()

    deleted = await retention.pass_once(0.0)

    assert sorted(deleted.runs) == sorted([done.run_id, *done_children, failed])
    assert deleted.runs[0] in (done.run_id, failed)  # a parent goes before its children
    for gone in (done.run_id, *done_children, failed):
        await expect_error(
            cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=gone)),
            grpc.StatusCode.NOT_FOUND,
            "run_not_found",
        )
    left = await streams(cluster)
    assert not set(left) & {s for gone in (done.run_id, *done_children, failed) for s in owned(gone)}
    listed = {r.run_id for r in (await cluster.stub.ListRuns(engine_pb2.ListRunsRequest())).runs}
    assert listed == {busy.run_id, *busy_children}
    # Only artifacts that some stream still mentions are left, and the kept runs read whole.
    assert await artifacts(cluster) <= await mentioned(cluster)
    assert (await get(cluster, busy_children[0])).HasField("input")
    assert engine_metrics.RETENTION_RUNS_DELETED._value.get() - runs_before == 4
    assert engine_metrics.RETENTION_ARTIFACTS_DELETED._value.get() - artifacts_before == deleted.artifacts > 0

    door.opened.set()
    await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=busy.run_id))
    again = await retention.pass_once(0.0)
    assert sorted(again.runs) == sorted([busy.run_id, *busy_children])
    assert await streams(cluster) == []
    assert await artifacts(cluster) == set()  # nothing mentions any artifact any more


async def test_a_pass_keeps_runs_that_ended_within_the_retention(cluster: Cluster) -> None:
    assert cluster.engine.engine is not None
    run_id = (await cluster.stub.StartRun(fan_out(1))).run_id
    deleted = await cluster.engine.engine.retention.pass_once(3600.0)
    assert deleted.runs == []
    assert (await get(cluster, run_id)).status == engine_pb2.RUN_STATUS_COMPLETED


async def test_delete_run_deletes_the_tree_and_the_engine_forgets_it(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(fan_out(3))
    children = sorted(c.child_run_id for c in started.run.children)
    await get(cluster, started.run_id)  # this engine finished it: its view is held in memory
    response = await cluster.stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=started.run_id))
    assert response.deleted_run_ids[0] == started.run_id
    assert sorted(response.deleted_run_ids[1:]) == children
    assert response.deleted_streams >= 4
    for gone in (started.run_id, *children):
        await expect_error(
            cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=gone)),
            grpc.StatusCode.NOT_FOUND,
            "run_not_found",
        )
    await expect_error(
        cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=started.run_id)),
        grpc.StatusCode.NOT_FOUND,
        "run_not_found",
    )
    assert await streams(cluster) == []


async def test_delete_run_refusals_write_and_delete_nothing(cluster: Cluster) -> None:
    name = f"retention-busy-{uuid.uuid4()}"
    door = gate(name)
    busy = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="test.gated", op_config=to_value({"gate": name}))
        )
    )
    await door.wait_for(1)
    parent = await cluster.stub.StartRun(fan_out(1))
    child = parent.run.children[0].child_run_id
    before = await streams(cluster)

    def delete(run_id: str) -> Any:
        return cluster.stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=run_id))

    await expect_error(delete(busy.run_id), grpc.StatusCode.FAILED_PRECONDITION, "run_not_terminal")
    await expect_error(delete(child), grpc.StatusCode.FAILED_PRECONDITION, "run_has_parent")
    await expect_error(delete(str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND, "run_not_found")
    await expect_error(delete("nope"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_run_id")
    # A rerun links the children it reused: their run stays while the rerun exists.
    rerun = await cluster.stub.RerunRun(engine_pb2.RerunRunRequest(run_id=parent.run_id, from_step_id="main"))
    await cluster.stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=rerun.run_id))
    with_rerun = await streams(cluster)
    await expect_error(delete(parent.run_id), grpc.StatusCode.FAILED_PRECONDITION, "run_has_reruns")
    assert await streams(cluster) == with_rerun
    assert set(before) <= set(with_rerun)
    # Deleting the rerun keeps the children it linked but did not spawn; then the parent goes.
    await delete(rerun.run_id)
    assert (await get(cluster, child)).status == engine_pb2.RUN_STATUS_COMPLETED
    deleted = await delete(parent.run_id)
    assert child in deleted.deleted_run_ids
    door.opened.set()


async def test_a_store_that_refuses_deletes_leaves_everything(locked: Cluster) -> None:
    run_id = (await locked.stub.StartRun(fan_out(1))).run_id
    before = await streams(locked)
    await expect_error(
        locked.stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=run_id)),
        grpc.StatusCode.PERMISSION_DENIED,
        "deletes_not_allowed",
    )
    await expect_error(
        locked.store_stub.DeleteStreams(store_pb2.DeleteStreamsRequest(stream_ids=[f"run:{run_id}"])),
        grpc.StatusCode.PERMISSION_DENIED,
        "deletes_not_allowed",
    )
    assert await streams(locked) == before
    assert (await get(locked, run_id)).status == engine_pb2.RUN_STATUS_COMPLETED


async def test_a_run_deleted_by_another_engine_is_gone_from_the_engine_that_finished_it(
    cluster: Cluster,
) -> None:
    started = await cluster.stub.StartRun(fan_out(1))
    await get(cluster, started.run_id)  # held in this engine's memory: it finished the run
    other = await start_test_engine(cluster.store_address)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            deleted = await stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=started.run_id))
            assert deleted.deleted_run_ids[0] == started.run_id
    finally:
        await other.drain(0.5)
    await expect_error(
        cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=started.run_id)),
        grpc.StatusCode.NOT_FOUND,
        "run_not_found",
    )
    listed = await cluster.stub.ListRuns(engine_pb2.ListRunsRequest())
    assert started.run_id not in {r.run_id for r in listed.runs}


async def test_a_pass_forgets_workers_idle_longer_than_the_retention(cluster: Cluster) -> None:
    assert cluster.engine.engine is not None
    retention = cluster.engine.engine.retention
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.engine.port}") as channel:
        workers = worker_pb2_grpc.WorkerServiceStub(channel)
        for worker_id in ("gone-1", "gone-2"):
            poll = worker_pb2.PollTaskRequest(
                task_queue="retention-q", worker_id=worker_id, ops=[worker_pb2.OpRef(op_id="x")]
            )
            poll.wait.FromMilliseconds(10)
            await workers.PollTask(poll)
        assert await streams(cluster) == ["worker:gone-1", "worker:gone-2"]

        kept = await retention.pass_once(3600.0)
        assert kept.streams == 0 and await streams(cluster) == ["worker:gone-1", "worker:gone-2"]
        streams_before = engine_metrics.RETENTION_STREAMS_DELETED._value.get()

        forgotten = await retention.pass_once(0.0)

        assert forgotten.streams == 2 and await streams(cluster) == []
        assert engine_metrics.RETENTION_STREAMS_DELETED._value.get() - streams_before == 2
        listed = await workers.ListQueues(worker_pb2.ListQueuesRequest())
        assert [q.task_queue for q in listed.queues] == []
