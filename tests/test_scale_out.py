"""Scale-out with real processes: two store replicas on one PostgreSQL schema, two engines.

200 runs fan out to two children each; every child makes a recorded call, waits at the test's gate
and makes another. Once every child waits (its first fact durable: nothing in flight), engine a is
SIGKILLed and the gate opened; midway through the finish, store replica 1 is SIGKILLed too. Every
run completes through engine b, each fact reached the counting transport once, every stream is
contiguous with each step completed once, and b took over a's runs (their lease streams say so).
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from keel_core.json_values import to_value
from tests.engine.crash_ops import read_io_log
from tests.engine.processes import (
    ServiceProcess,
    eventually,
    start_engine_process,
    start_postgres_store_process,
)
from tests.store.postgres_schemas import fresh_schema

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub

pytestmark = pytest.mark.slow

RUNS = 200
CHILDREN = 2
TTL = 4.0
WAIT = 120.0  # a bound on waiting for what must happen, never a timing claim
KEYS = ("main-before", "main-after")


def fan_out_run(order: int) -> engine_pb2.StartRunRequest:
    """A run whose one step spawns CHILDREN gated children and awaits them."""
    config = {"op_id": "test.gated_calls", "count": CHILDREN}
    pipeline = engine_pb2.Pipeline(
        pipeline_id="fan",
        steps=[engine_pb2.Step(step_id="fan", op_id="keel.fan_out", op_config=to_value(config))],
    )
    return engine_pb2.StartRunRequest(pipeline=pipeline, input=to_value({"order": order}))


class Deployment:
    """Two store replicas, two engines, the test's channels."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.io_log = str(tmp_path / "io.log")
        self.gate = str(tmp_path / "gate")
        self.stores: list[ServiceProcess] = []
        self.engines: dict[str, ServiceProcess] = {}
        self.stubs: dict[str, EngineServiceAsyncStub] = {}
        self.channels: list[grpc.aio.Channel] = []
        self.store: StoreServiceAsyncStub | None = None

    async def start(self, dsn: str, schema: str) -> None:
        """Both replicas at once (their migrations must not race), then both engines."""
        self.stores = list(
            await asyncio.gather(*(start_postgres_store_process(dsn, schema) for _ in range(2)))
        )
        addresses = ",".join(store.address for store in self.stores)
        for name in ("a", "b"):
            engine = await start_engine_process(
                addresses,
                io_log=self.io_log,
                engine_id=f"engine-{name}",
                lease_ttl=TTL,
                gate=self.gate,
                log_path=str(self.tmp_path / f"engine-{name}.log"),
            )
            self.engines[name] = engine
            channel = grpc.aio.insecure_channel(engine.address)
            self.channels.append(channel)
            self.stubs[name] = engine_pb2_grpc.EngineServiceStub(channel)
        # The test reads through the replica that survives.
        channel = grpc.aio.insecure_channel(self.stores[1].address)
        self.channels.append(channel)
        self.store = store_pb2_grpc.StoreServiceStub(channel)

    async def events(self, stream_id: str) -> list[store_pb2.RecordedEvent]:
        """Every event of a stream (through the surviving replica)."""
        assert self.store is not None
        page = await self.store.ReadEvents(store_pb2.ReadEventsRequest(stream_id=stream_id))
        return list(page.events)

    async def close(self) -> None:
        """Kill what is left, close the channels."""
        for process in [*self.engines.values(), *self.stores]:
            await process.kill()
        for channel in self.channels:
            await channel.close(None)


@pytest.fixture
async def deployment(postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    """The deployment on a fresh PostgreSQL schema, dropped afterwards."""
    async with fresh_schema(postgres_dsn) as schema:
        made = Deployment(tmp_path)
        try:
            await made.start(postgres_dsn, schema)
            yield made
        finally:
            await made.close()


def calls_of(io_log: str) -> collections.Counter[tuple[str, str]]:
    """How often each (run, fact key) reached the counting transport."""
    return collections.Counter(read_io_log(io_log))


async def test_two_engines_two_store_replicas_lose_one_of_each_midway_and_every_run_completes_once(
    deployment: Deployment,
) -> None:
    limit = asyncio.Semaphore(32)
    names = list(deployment.stubs)

    async def start(order: int) -> tuple[str, str]:
        name = names[order % 2]
        async with limit:
            response = await deployment.stubs[name].StartRun(fan_out_run(order))
        return name, response.run_id

    started = await asyncio.gather(*(start(order) for order in range(RUNS)))
    parents = {run_id: name for name, run_id in started}

    # Every child waits at the gate with its first fact durable: no transport call is in flight.
    def all_children_called() -> bool:
        firsts = [key for (_, key) in read_io_log(deployment.io_log) if key == "main-before"]
        return len(firsts) == RUNS * CHILDREN

    await eventually(all_children_called, "every child made its first call", within=WAIT, poll=0.2)
    children = sorted({run_id for run_id, _ in read_io_log(deployment.io_log)})

    async def first_fact_durable() -> bool:
        for child in children:
            if "FactRecorded" not in [e.type for e in await deployment.events(f"run:{child}")]:
                return False
        return True

    await eventually(first_fact_durable, "every child's first fact durable", within=WAIT, poll=0.2)

    await deployment.engines["a"].kill()
    Path(deployment.gate).touch()  # noqa: ASYNC240

    # Midway through the finish, one store replica dies too (engine b's client balances over both).
    def some_finished() -> bool:
        return sum(1 for (_, key) in read_io_log(deployment.io_log) if key == "main-after") >= RUNS // 2

    await eventually(some_finished, "half the children finished their second call", within=WAIT, poll=0.2)
    await deployment.stores[0].kill()

    survivor = deployment.stubs["b"]

    async def completed(run_id: str) -> int:
        async with limit:
            awaited = await survivor.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=WAIT)
        assert awaited.done, run_id
        assert awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, (run_id, awaited.run.reason)
        return len(awaited.run.children)

    assert await asyncio.gather(*(completed(run_id) for run_id in parents)) == [CHILDREN] * RUNS

    # No fact executed twice: each child's two calls reached the transport once; parents make none.
    calls = calls_of(deployment.io_log)
    assert len(children) == RUNS * CHILDREN
    assert calls == {(child, key): 1 for child in children for key in KEYS}

    # No event lost or duplicated: every stream contiguous, each step completed once, one end.
    for run_id in [*parents, *children]:
        events = await deployment.events(f"run:{run_id}")
        types = [e.type for e in events]
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), run_id
        assert types.count("RunStarted") == 1 and types.count("StepCompleted") == 1, (run_id, types)
        assert types[-1] == "RunCompleted" and types.count("RunCompleted") == 1, (run_id, types)
        keys = [json.loads(e.payload)["fact_key"] for e in events if e.type == "FactRecorded"]
        assert len(keys) == len(set(keys)), (run_id, keys)

    # The survivor took over the dead engine's runs: their lease streams name a (unless it died
    # before a run's implicit lease needed writing), then b; b's log names each takeover. b's own
    # runs name b alone, or nobody: a run that finished within ttl/3 of its start (one started
    # last, whose children were the last to make their first call) never needed its implicit
    # lease written.
    log = (deployment.tmp_path / "engine-b.log").read_text(encoding="utf-8")
    for run_id, name in parents.items():
        holders = [
            json.loads(e.payload)["engine_id"]
            for e in await deployment.events(f"lease:{run_id}")
            if e.type == "LeaseAcquired"
        ]
        if name == "a":
            assert holders and holders[-1] == "engine-b", (run_id, holders)
            assert holders == sorted(holders), (run_id, holders)
            assert f"took over run {run_id}" in log
        else:
            assert set(holders) <= {"engine-b"}, (run_id, holders)
    assert log.count("took over run") >= RUNS // 2
    deployment.engines["b"].process.send_signal(signal.SIGTERM)
    assert await deployment.engines["b"].process.wait() == 0
