"""Retention killed in the middle of deleting a run tree (a real SIGKILL at a failpoint), on both backends.

An engine deletes a tree root first, one run per store transaction, after recording the tree in a
`retention:<root>` stream. It is killed right after the root went (failpoint
`retention_after_run_deleted`). Then every run is either listed and readable (the children) or gone
(the root), as another engine shows; and a third engine's first retention pass finishes the tree,
deletes the record and collects the tree's artifacts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service.domain.retention import artifact_ids_in
from keel_core.json_values import to_value
from tests.engine.processes import (
    ServiceProcess,
    eventually,
    start_engine_process,
    start_postgres_store_process,
    start_store_process,
)
from tests.engine.test_engine_rpcs import expect_error
from tests.store.postgres_schemas import fresh_schema

if TYPE_CHECKING:
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A store process that accepts deletes, on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        process = await start_store_process(tmp_path / "store", allow_deletes=True)
        try:
            yield process
        finally:
            await process.kill()
        return
    dsn = request.getfixturevalue("postgres_dsn")
    async with fresh_schema(dsn) as schema:
        process = await start_postgres_store_process(dsn, schema, allow_deletes=True)
        try:
            yield process
        finally:
            await process.kill()


async def tree_artifacts(stub: StoreServiceAsyncStub, run_ids: list[str]) -> set[str]:
    """Every artifact the runs' own streams mention."""
    found: set[str] = set()
    for run_id in run_ids:
        for stream_id in (f"run:{run_id}", f"children:{run_id}"):
            read = await stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=stream_id))
            for event in read.events:
                found |= artifact_ids_in(event.payload)
    return found


async def exists(stub: StoreServiceAsyncStub, stream_id: str) -> bool:
    """Whether the store holds the stream."""
    return (await stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=stream_id))).head_seq > 0


async def stored_artifacts(stub: StoreServiceAsyncStub) -> set[str]:
    """Every artifact the store holds."""
    before = Timestamp()
    before.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    page = await stub.ListArtifacts(store_pb2.ListArtifactsRequest(stored_before=before, page_size=1000))
    return {a.artifact_id for a in page.artifacts}


async def test_a_deletion_killed_after_the_root_leaves_whole_children_and_the_next_pass_finishes_it(
    store: ServiceProcess,
) -> None:
    store_channel = grpc.aio.insecure_channel(store.address)
    store_stub: StoreServiceAsyncStub = store_pb2_grpc.StoreServiceStub(store_channel)
    # A lease that outlives this loaded machine's pauses: the run is driven by this engine alone.
    doomed = await start_engine_process(
        store.address, failpoints="retention_after_run_deleted", lease_ttl=10.0
    )
    engines = [doomed]
    try:
        async with grpc.aio.insecure_channel(doomed.address) as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            config = to_value({"op_id": "keel.echo", "inputs": [1, 2, 3]})
            started = await stub.StartRun(
                engine_pb2.StartRunRequest(
                    op=engine_pb2.SingleOp(op_id="keel.fan_out", op_config=config), wait=True
                )
            )
            root = started.run_id
            # AwaitRun blocks until the run is terminal, whichever engine ends up driving it.
            done = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=root))
            assert done.done and done.run.status == engine_pb2.RUN_STATUS_COMPLETED
            children = sorted(c.child_run_id for c in done.run.children)
            artifacts = await tree_artifacts(store_stub, [root, *children])
            assert artifacts and artifacts <= await stored_artifacts(store_stub)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=root))
        assert await doomed.process.wait() == -9  # killed by its failpoint, not by us

        # In between: the root is gone, each child is whole, the record names the tree.
        assert not await exists(store_stub, f"run:{root}")
        assert await exists(store_stub, f"retention:{root}")
        reader = await start_engine_process(store.address)
        engines.append(reader)
        async with grpc.aio.insecure_channel(reader.address) as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            await expect_error(
                stub.GetRun(engine_pb2.GetRunRequest(run_id=root)), grpc.StatusCode.NOT_FOUND, "run_not_found"
            )
            listed = {r.run_id for r in (await stub.ListRuns(engine_pb2.ListRunsRequest())).runs}
            assert listed == set(children)
            for child in children:
                run = (await stub.GetRun(engine_pb2.GetRunRequest(run_id=child))).run
                assert run.status == engine_pb2.RUN_STATUS_COMPLETED and run.HasField("input")
        await reader.terminate()

        # Another engine's first retention pass finishes the tree (whatever the runs' age).
        finisher = await start_engine_process(
            store.address,
            extra_args=("--retention", "1h", "--retention-interval", "1h", "--artifact-grace", "0s"),
        )
        engines.append(finisher)

        async def finished() -> bool:
            streams = await store_stub.ListStreams(store_pb2.ListStreamsRequest(page_size=1000))
            left = [s.stream_id for s in streams.streams if not s.stream_id.startswith("engine:")]
            return not left and not await stored_artifacts(store_stub) & artifacts

        await eventually(
            finished, "the next pass deleted the children, the record and the artifacts", within=60, poll=0.1
        )
        async with grpc.aio.insecure_channel(finisher.address) as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            for child in children:
                await expect_error(
                    stub.GetRun(engine_pb2.GetRunRequest(run_id=child)),
                    grpc.StatusCode.NOT_FOUND,
                    "run_not_found",
                )
    finally:
        for engine in engines:
            await engine.kill()
        await store_channel.close(grace=None)
