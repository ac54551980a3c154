"""Crash tests of child runs: a real engine process SIGKILLed at each point of a parent's fan-out."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.json_values import from_value, to_value
from tests.engine.crash_ops import read_io_log
from tests.engine.processes import ServiceProcess, start_engine_process, start_store_process

pytestmark = pytest.mark.slow

CHILDREN = 2


def parent_request(run_id: str) -> engine_pb2.StartRunRequest:
    """A parent whose step `fan` spawns two `test.two_calls` children (step `main` each) and awaits them."""
    config = {"op_id": "test.two_calls", "inputs": [10, 20]}
    return engine_pb2.StartRunRequest(
        run_id=run_id,
        pipeline=engine_pb2.Pipeline(
            pipeline_id="parent",
            steps=[engine_pb2.Step(step_id="fan", op_id="keel.fan_out", op_config=to_value(config))],
        ),
    )


async def recorded_facts(store_address: str, run_ids: list[str]) -> set[tuple[str, str]]:
    """The (run_id, fact_key) pairs whose FactRecorded is durable in the store now."""
    recorded: set[tuple[str, str]] = set()
    async with grpc.aio.insecure_channel(store_address) as channel:
        stub = store_pb2_grpc.StoreServiceStub(channel)
        for run_id in run_ids:
            page = await stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
            for event in page.events:
                if event.type == "FactRecorded":
                    recorded.add((run_id, json.loads(event.payload)["fact_key"]))
    return recorded


@dataclass
class StoreProcess:
    """A store subprocess over a data dir, which a test may restart (same data, same port)."""

    process: ServiceProcess
    data_dir: Path

    @property
    def address(self) -> str:
        """Where it listens."""
        return self.process.address

    async def settle(self) -> None:
        """Stop it gracefully and start it again: every append it had received is now committed or gone.

        A SIGKILLed engine may have sent an append that the store commits a moment later; what is
        read after this is all the store will ever hold of that engine's writes.
        """
        assert await self.process.terminate() == 0
        self.process = await start_store_process(self.data_dir, port=self.process.port)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StoreProcess]:
    """A store subprocess over a fresh data dir."""
    running = StoreProcess(await start_store_process(tmp_path / "store"), tmp_path / "store")
    yield running
    await running.process.kill()


@pytest.mark.parametrize(
    "failpoint",
    [
        "before_child_started",  # the child's manifest is stored, its RunStarted is not
        "after_child_spawn_recorded",  # the parent recorded a spawn; the child may or may not run yet
        "after_fact_recorded:main",  # a child is running (its first call is recorded)
        "after_child_completed",  # every child is terminal; the parent has not settled its wait
        # keel.fan_out records no await (it parks on its children): a kill right after the parent
        # parked is tests/engine/test_waits.py's, with children that are sure to outlive the park.
    ],
)
async def test_parent_killed_around_a_child_completes_with_one_child_per_key_and_each_fact_once(
    store: StoreProcess, tmp_path: Path, failpoint: str
) -> None:
    io_log = str(tmp_path / "io.log")
    run_id = str(uuid.uuid4())
    doomed = await start_engine_process(store.address, failpoints=failpoint, io_log=io_log)
    channel = grpc.aio.insecure_channel(doomed.address)
    try:
        with contextlib.suppress(grpc.aio.AioRpcError):  # the engine may die before it answers
            await engine_pb2_grpc.EngineServiceStub(channel).StartRun(parent_request(run_id), timeout=30)
        assert await asyncio.wait_for(doomed.process.wait(), 30) == -9, "the failpoint did not fire"
    finally:
        await channel.close(grace=None)
        await doomed.kill()
    children = [str(uuid.uuid5(uuid.UUID(run_id), f"fan.child.{i}")) for i in range(CHILDREN)]
    # What the dead engine left: the calls it made, and which of their facts were durable. A child
    # runs concurrently with its parent, so the kill may land between a child's transport call and
    # its FactRecorded; that one call is made again (the transport sees it at least once), while a
    # recorded fact is never executed again.
    calls_at_kill = collections.Counter(read_io_log(io_log))
    await store.settle()
    recorded_at_kill = await recorded_facts(store.address, children)

    survivor = await start_engine_process(store.address, io_log=io_log)
    channel = grpc.aio.insecure_channel(survivor.address)
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    try:
        awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=60)
        assert awaited.done
        run = awaited.run
        assert run.status == engine_pb2.RUN_STATUS_COMPLETED, run.reason
        output = from_value(run.final_snapshot)["fan"]
        assert [c["child_run_id"] for c in output["children"]] == children
        assert [r["first"]["request"]["input"] for r in output["results"]] == [10, 20]
        assert sorted(c.child_run_id for c in run.children) == sorted(children)
        # Exactly one child per fact key: the store holds the parent and these children, no others.
        listed = await stub.ListRuns(engine_pb2.ListRunsRequest(page_size=100))
        assert sorted(r.run_id for r in listed.runs) == sorted([run_id, *children])
        # No recorded fact executed again; a call in flight at the kill made once more, and only once.
        calls = collections.Counter(read_io_log(io_log))
        expected_keys = {(child, key) for child in children for key in ("main-first", "main-second")}
        assert set(calls) == expected_keys
        for fact in expected_keys:
            assert calls_at_kill[fact] <= 1, f"{fact} was called twice before the kill"
            made_after_kill = calls[fact] - calls_at_kill[fact]
            assert made_after_kill == (0 if fact in recorded_at_kill else 1), (
                f"{fact}: {calls_at_kill[fact]} call(s) before the kill "
                f"(recorded: {fact in recorded_at_kill}), {made_after_kill} after"
            )
    finally:
        await channel.close(grace=None)
        assert await survivor.terminate() == 0


@pytest.mark.parametrize("then", ["cancel_parent", "await_child"])
async def test_a_spawn_cut_short_by_a_kill_is_pending_on_its_parent_until_cancel_or_await_settles_it(
    store: StoreProcess, tmp_path: Path, then: str
) -> None:
    """SpawnChild through an engine SIGKILLed once the child is linked and before it starts.

    The parent (driven by another engine) lists the child as pending. Canceling the parent records
    the child canceled without running it; awaiting it with its parent starts it from the link.
    """
    io_log = str(tmp_path / "io.log")
    keeper = await start_engine_process(store.address, io_log=io_log)
    doomed = await start_engine_process(store.address, failpoints="before_child_started", io_log=io_log)
    keeper_channel = grpc.aio.insecure_channel(keeper.address)
    doomed_channel = grpc.aio.insecure_channel(doomed.address)
    stub = engine_pb2_grpc.EngineServiceStub(keeper_channel)
    try:
        parent = (
            await stub.StartRun(
                engine_pb2.StartRunRequest(
                    op=engine_pb2.SingleOp(op_id="keel.sleep", op_config=to_value({"seconds": 600}))
                ),
                timeout=30,
            )
        ).run_id
        spawn = engine_pb2.SpawnChildRequest(
            parent_run_id=parent, fact_key="cut-short", op_id="test.two_calls", input=to_value(7)
        )
        with pytest.raises(grpc.aio.AioRpcError):  # the engine dies before it answers
            await engine_pb2_grpc.EngineServiceStub(doomed_channel).SpawnChild(spawn, timeout=30)
        assert await asyncio.wait_for(doomed.process.wait(), 30) == -9, "the failpoint did not fire"
        child = str(uuid.uuid5(uuid.UUID(parent), "cut-short"))

        listed = (await stub.GetRun(engine_pb2.GetRunRequest(run_id=parent), timeout=30)).run.children
        assert [(c.child_run_id, c.fact_key, c.status) for c in listed] == [
            (child, "cut-short", engine_pb2.RUN_STATUS_PENDING)
        ]
        if then == "cancel_parent":
            await stub.Terminalize(
                engine_pb2.TerminalizeRequest(run_id=parent, target=engine_pb2.TERMINAL_TARGET_CANCELED),
                timeout=30,
            )
            closed = (await stub.GetRun(engine_pb2.GetRunRequest(run_id=child), timeout=30)).run
            assert closed.status == engine_pb2.RUN_STATUS_CANCELED
            assert closed.parent_run_id == parent and closed.reason == f"parent run {parent} was canceled"
            assert [step.attempts for step in closed.steps] == [[]], "the child never ran"
            # Spawning it again now answers the canceled child; it still never runs.
            again = await stub.SpawnChild(spawn, timeout=30)
            assert again.child_run_id == child
            assert read_io_log(io_log) == []
        else:
            awaited = await stub.AwaitChild(
                engine_pb2.AwaitChildRequest(child_run_id=child, parent_run_id=parent), timeout=60
            )
            assert awaited.status == engine_pb2.RUN_STATUS_COMPLETED
            assert from_value(awaited.final_snapshot)["main"]["first"]["request"]["input"] == 7
            started = (await stub.GetRun(engine_pb2.GetRunRequest(run_id=child), timeout=30)).run
            assert (started.parent_run_id, started.parent_fact_key) == (parent, "cut-short")
            assert sorted(read_io_log(io_log)) == [(child, "main-first"), (child, "main-second")]
            await stub.Terminalize(
                engine_pb2.TerminalizeRequest(run_id=parent, target=engine_pb2.TERMINAL_TARGET_CANCELED),
                timeout=30,
            )
    finally:
        await keeper_channel.close(grace=None)
        await doomed_channel.close(grace=None)
        await doomed.kill()
        assert await keeper.terminate() == 0
