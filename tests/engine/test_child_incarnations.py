"""A parent's tree deleted by another engine and started again under the same run id has children
of the same ids: an engine that finished the first tree's children, and still holds their events,
must not answer the second tree's keel.fan_out with them."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
from keel.engine.v1 import engine_pb2, engine_pb2_grpc

from engine_service.domain.history import fold
from engine_service.domain.streams import run_stream_id
from engine_service.runtime.kernel import Engine
from keel_core.json_values import from_value, to_value
from tests.engine.conftest import Cluster, start_test_engine
from tests.engine.test_retention import cluster  # noqa: F401 (a store that accepts deletes)


def fan_out(run_id: str, inputs: list[int]) -> engine_pb2.StartRunRequest:
    """A waited keel.fan_out of one child per input (test.tick_once doubles it)."""
    config = {"op_id": "test.tick_once", "inputs": inputs}
    op = engine_pb2.SingleOp(op_id="keel.fan_out", op_config=to_value(config))
    return engine_pb2.StartRunRequest(op=op, wait=True, run_id=run_id)


def doubles(run: engine_pb2.Run) -> list[int]:
    return [r["double"] for r in from_value(run.final_snapshot)["main"]["results"]]


async def resolved_doubles(engine: Engine, run_id: str) -> list[int]:
    """What `engine`'s resolver answers for the run's children wait (its first), as doubles."""
    events, _ = await engine.reader.read_history(run_id)
    waits = [fold(e.event for e in events[:n]).waiting for n in range(1, len(events) + 1)]
    waiting = next(iter(next(w for w in waits if w).values()))
    outcome = await engine.children.children_wait_outcome(run_id, waiting)
    assert outcome is not None and outcome.output is not None
    return [r["double"] for r in outcome.output["results"]]


async def test_a_fan_out_of_a_run_id_started_again_is_answered_with_its_own_children(
    cluster: Cluster,  # noqa: F811
) -> None:
    first_engine = cluster.engine.engine
    assert first_engine is not None
    run_id = str(uuid.uuid4())
    first = (await cluster.stub.StartRun(fan_out(run_id, [1, 2]))).run  # its children end here: held
    assert doubles(first) == [2, 4]
    other = await start_test_engine(cluster.store_address)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        await stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=run_id))
        second = (await stub.StartRun(fan_out(run_id, [10, 20]))).run  # the same ids, on the other engine
        assert doubles(second) == [20, 40]
    finally:
        await channel.close(grace=None)
        await other.drain(0.5)
    # What the first engine's resolver answers for the second run's wait (as when it takes up a
    # parked parent whose children ended elsewhere): the second run's children, read from the store.
    assert await resolved_doubles(first_engine, run_id) == [20, 40]
    shown = await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))
    assert doubles(shown.run) == [20, 40]


async def test_a_start_whose_first_append_lands_after_a_delete_is_answered_with_its_own_children(
    cluster: Cluster,  # noqa: F811
) -> None:
    # The second run's RunStarted is decided (its time chosen) before the first run of the id spawns
    # its children; its append stalls and lands only after the first tree ended here and another
    # engine deleted it. The first engine, holding the first tree's children, must still answer the
    # second run's wait with the second run's children (a check against the parent's RunStarted
    # time, not its stream's creation, would take the held ones).
    first_engine = cluster.engine.engine
    assert first_engine is not None
    run_id = str(uuid.uuid4())
    other = await start_test_engine(cluster.store_address)
    assert other.engine is not None
    store = other.engine.env.store
    real_append = store.append
    entered, release = asyncio.Event(), asyncio.Event()

    async def stalled_append(stream_id: str, events: Any, **kw: Any) -> Any:
        if stream_id == run_stream_id(run_id) and not entered.is_set():
            entered.set()
            await release.wait()  # the start's first append is slow to land
        return await real_append(stream_id, events, **kw)

    store.append = stalled_append  # type: ignore[method-assign]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{other.port}")
    try:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        second_call = asyncio.ensure_future(stub.StartRun(fan_out(run_id, [10, 20])))
        await entered.wait()  # its RunStarted, with its time, is decided
        await asyncio.sleep(0.01)  # the first tree starts later by the clock
        first = (await cluster.stub.StartRun(fan_out(run_id, [1, 2]))).run  # its children are held here
        assert doubles(first) == [2, 4]
        await stub.DeleteRun(engine_pb2.DeleteRunRequest(run_id=run_id))
        release.set()
        second = (await second_call).run
        assert doubles(second) == [20, 40]
    finally:
        await channel.close(grace=None)
        await other.drain(0.5)
    assert await resolved_doubles(first_engine, run_id) == [20, 40]
