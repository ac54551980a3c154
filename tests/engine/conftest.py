"""In-process store + engine fixtures (real grpc.aio servers on 127.0.0.1:0, real SQLite in tmp_path)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2_grpc
from keel.store.v1 import store_pb2_grpc

from engine_service import (
    EngineConfig,
    EngineServingHandle,
    OpError,
    OpRegistry,
    StepContext,
    TransportRegistry,
    op,
    start_engine,
)
from engine_service.domain.child_runs import AWAIT_KIND, AWAIT_NAMESPACE, SPAWN_KIND, SPAWN_NAMESPACE
from engine_service.domain.waits import TIMER, ParkStep
from keel_core.clock import now_us
from store_service.backend import StoreBackend
from store_service.server import StoreConfig, start_store

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub
    from keel.store.v1.store_pb2_grpc import StoreServiceAsyncStub


class MemoryClock:
    """A transport that counts its calls and answers with a new number each time."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """A fresh answer per call."""
        self.calls.append((run_id, fact_key))
        return {"tick": len(self.calls)}


TEST_OPS = OpRegistry()
TEST_TRANSPORTS = TransportRegistry()
CLOCK = MemoryClock()
TEST_TRANSPORTS.register("test.clock", CLOCK)


class BigIntAnswer:
    """A transport whose answer protobuf cannot carry exactly (an integer beyond 2**53)."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """Always {"n": 2**60}."""
        return {"n": 2**60}


TEST_TRANSPORTS.register("test.big_int", BigIntAnswer())
_seen: dict[tuple[str, str], list[Any]] = {}


@op("test.clock_then_fail", registry=TEST_OPS, description="Reads the clock fact, fails twice, then returns")
async def clock_then_fail(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Reads the clock fact on every attempt, fails the first two, returns all it saw."""
    seen = _seen.setdefault((ctx.run_id, ctx.step_id), [])
    seen.append(await ctx.io.call("test.clock", {}, "clock"))
    if ctx.attempt < 2:
        raise OpError("flaky", "not yet", retryable=True)
    return {"attempt": ctx.attempt, "seen": seen}


ATTEMPT_TIMES: dict[str, list[float]] = {}


@op("test.timed_flaky", registry=TEST_OPS, description="Notes when each attempt starts; fails the first two")
async def timed_flaky(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Notes the monotonic time of each attempt, fails attempts 0 and 1."""
    ATTEMPT_TIMES.setdefault(ctx.run_id, []).append(time.monotonic())
    if ctx.attempt < 2:
        raise OpError("flaky", "not yet", retryable=True)
    return {"attempt": ctx.attempt}


class Gate:
    """An op's way to tell the test it runs, and the test's way to let it finish (or see it cancelled)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()
        self.left = asyncio.Event()  # set when an op waiting at the gate was cancelled
        self.runs: list[str] = []
        self.cancelled: list[str] = []

    async def wait_for(self, n: int) -> None:
        """Until `n` ops have entered (no timing: each entry sets the event)."""
        while len(self.runs) < n:
            self.entered.clear()
            await self.entered.wait()


GATES: dict[str, Gate] = {}


def gate(name: str) -> Gate:
    """The gate called `name` (created on first use)."""
    return GATES.setdefault(name, Gate())


@op("test.gated", registry=TEST_OPS, description="Enters op_config.gate and waits until it opens")
async def gated(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Notes that it runs, waits for the gate to open, returns its input."""
    door = gate(str(op_config["gate"]))
    door.runs.append(ctx.run_id)
    door.entered.set()
    try:
        await door.opened.wait()
    except asyncio.CancelledError:
        door.cancelled.append(ctx.run_id)
        door.left.set()
        raise
    return {"input": input}


@op(
    "test.calls_then_gated", registry=TEST_OPS, description="Records op_config.calls answers, then test.gated"
)
async def calls_then_gated(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Records `calls` keel.echo answers one after another, then waits at its gate as test.gated does."""
    for i in range(int(op_config["calls"])):
        await ctx.io.call("keel.echo", {"i": i}, f"call-{i}")
    return await gated(ctx, op_config, input)


@op("test.tick_once", registry=TEST_OPS, description="Makes one recorded call to the counting clock")
async def tick_once(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Reads the clock fact once; returns the input doubled and the tick."""
    answer = await ctx.io.call("test.clock", {}, "tick")
    return {"double": input * 2 if isinstance(input, int) else input, "tick": answer["tick"]}


@op("test.nested_output", registry=TEST_OPS, description="Returns JSON nested op_config.depth levels deep")
async def nested_output(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """[[...[1]...]], `depth` arrays deep."""
    value: Any = 1
    for _ in range(int(op_config["depth"])):
        value = [value]
    return value


def nested(levels: int) -> Any:
    """[[...[1]...]], `levels` arrays deep."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


class NestedAnswer:
    """A transport answering JSON nested request["depth"] arrays deep."""

    async def call(self, namespace: str, request: Any, fact_key: str, run_id: str) -> Any:
        """[[...[1]...]], `depth` arrays deep."""
        return nested(int(request["depth"]))


TEST_TRANSPORTS.register("test.nested", NestedAnswer())


@op("test.nested_answer", registry=TEST_OPS, description="Calls test.nested for op_config.depth levels")
async def nested_answer(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Records an answer `depth` arrays deep; returns only that it came (its own output stays small)."""
    await ctx.io.call("test.nested", {"depth": op_config["depth"]}, "nested")
    return {"answered": True}


@op("test.park_nested", registry=TEST_OPS, description="Parks on a timer due now, with a nested output")
async def park_nested(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """A wait due at once whose output is `depth` arrays deep."""
    return ParkStep(TIMER, until_us=now_us(), output=nested(int(op_config["depth"])))


@op("test.fail_nested", registry=TEST_OPS, description="Fails with details nested op_config.depth levels")
async def fail_nested(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Fails for good with details {"value": ...}: `depth` levels of arrays and objects in all."""
    raise OpError("nested_details", "fails with nested details", value=nested(int(op_config["depth"]) - 1))


@op("test.await_nested_child", registry=TEST_OPS, description="Awaits a child whose output nests deep")
async def await_nested_child(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """Spawns a test.nested_output child of op_config.depth and awaits it; returns its status only."""
    spawn = {"kind": SPAWN_KIND, "op_id": "test.nested_output", "op_config": {"depth": op_config["depth"]}}
    spawned = await ctx.io.call(SPAWN_NAMESPACE, spawn, "child")
    awaited = await ctx.io.call(
        AWAIT_NAMESPACE, {"kind": AWAIT_KIND, "child_run_id": spawned["child_run_id"]}, "awaited"
    )
    return {"child_status": awaited["status"]}


@op("test.deep_output", registry=TEST_OPS, description="Returns JSON nested 40 levels deep")
async def deep_output(ctx: StepContext, op_config: Any, input: Any) -> Any:
    """[[...[1]...]], deeper than Keel's JSON values may nest."""
    value: Any = 1
    for _ in range(40):
        value = [value]
    return value


async def start_test_engine(store: str, **settings: Any) -> EngineServingHandle:
    """An engine in this process on 127.0.0.1:0 with the test ops and transports (and `settings`)."""
    return await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=store,
            failpoints="",
            ops=TEST_OPS,
            transports=TEST_TRANSPORTS,
            **settings,
        )
    )


@dataclass
class Cluster:
    """A running store and engine, with stubs for both."""

    store_address: str
    engine: EngineServingHandle
    checkpoint_linger: float
    stub: EngineServiceAsyncStub
    store_stub: StoreServiceAsyncStub
    # The store's backend, for a test that sets its clock (SqlStoreBackend.now_us).
    store_backend: StoreBackend | None = None


@pytest.fixture(params=[0.2, 0.0], ids=["write-behind", "append-per-step"])
async def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    """A store and an engine in this process (with and without write-behind), torn down after the test."""
    store = await start_store(StoreConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "store")))
    address = f"127.0.0.1:{store.port}"
    engine = await start_engine(
        EngineConfig(
            listen="127.0.0.1:0",
            store=address,
            failpoints="",
            ops=TEST_OPS,
            transports=TEST_TRANSPORTS,
            checkpoint_linger=request.param,
        )
    )
    engine_channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}")
    store_channel = grpc.aio.insecure_channel(address)
    try:
        yield Cluster(
            address,
            engine,
            request.param,
            engine_pb2_grpc.EngineServiceStub(engine_channel),
            store_pb2_grpc.StoreServiceStub(store_channel),
            store.backend,
        )
    finally:
        await engine_channel.close(grace=None)
        await store_channel.close(grace=None)
        await engine.drain(0.5)
        await store.drain(0.5)
