"""Signals across crashes, with real processes: engines SIGKILLed while a run waits for a signal.

Whatever dies when, each signal is consumed exactly once (one consuming fact in the run stream)
and the side effect after the wait happens once (the counting transport's fsynced log).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service import EngineConfig, start_engine
from keel_core.json_values import from_value, to_value
from tests.engine.crash_ops import read_io_log
from tests.engine.processes import ServiceProcess, eventually, start_engine_process, start_store_process

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub

pytestmark = pytest.mark.slow


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """A store subprocess over a fresh data dir."""
    process = await start_store_process(tmp_path / "store")
    yield process
    await process.kill()


@contextlib.asynccontextmanager
async def engine_stub(address: str) -> AsyncIterator[EngineServiceAsyncStub]:
    """An EngineService stub on `address`."""
    channel = grpc.aio.insecure_channel(address)
    try:
        yield engine_pb2_grpc.EngineServiceStub(channel)
    finally:
        await channel.close(grace=None)


async def stream(store: ServiceProcess, stream_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(type, payload) of a stream's events."""
    async with grpc.aio.insecure_channel(store.address) as channel:
        reply = await store_pb2_grpc.StoreServiceStub(channel).ReadEvents(
            store_pb2.ReadEventsRequest(stream_id=stream_id), timeout=30
        )
    return [(e.type, json.loads(e.payload)) for e in reply.events]


async def consumed(store: ServiceProcess, run_id: str) -> list[str]:
    """The signal ids the run's waits consumed, in order."""
    events = await stream(store, f"run:{run_id}")
    return [
        d["response"]["signal_id"]
        for t, d in events
        if t == "FactRecorded" and d["namespace"] == "keel.signal"
    ]


async def start_waiting_run(stub: EngineServiceAsyncStub, config: dict[str, Any] | None = None) -> str:
    """A run of test.wait_then_call, once GetRun shows it waiting for `go`."""
    started = await stub.StartRun(
        engine_pb2.StartRunRequest(
            op=engine_pb2.SingleOp(op_id="test.wait_then_call", op_config=to_value(config))
        ),
        timeout=30,
    )

    async def waiting() -> bool:
        run = (await stub.GetRun(engine_pb2.GetRunRequest(run_id=started.run_id), timeout=30)).run
        return run.steps[0].HasField("waiting_for_signal")

    await eventually(waiting, "the run waits for its signal", within=30, poll=0.05)
    return started.run_id


async def completed(stub: EngineServiceAsyncStub, run_id: str) -> engine_pb2.Run:
    """The run, once it completed."""
    awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=60)
    assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run
    return awaited.run


async def test_engine_killed_after_consuming_a_signal_reruns_the_op_with_the_same_payload(
    store: ServiceProcess, tmp_path: Path
) -> None:
    io_log = str(tmp_path / "io.log")
    doomed = await start_engine_process(store.address, failpoints="after_fact_recorded:main", io_log=io_log)
    other = await start_engine_process(store.address, io_log=io_log)
    try:
        async with engine_stub(doomed.address) as stub:
            run_id = await start_waiting_run(stub)
        async with engine_stub(other.address) as stub:
            # Sent through another engine: the waiting one hears of it through its wake-up subscription.
            await stub.SignalRun(
                engine_pb2.SignalRunRequest(
                    run_id=run_id, name="go", payload=to_value({"n": 1}), signal_id="one"
                ),
                timeout=30,
            )
            assert await asyncio.wait_for(doomed.process.wait(), 30) == -9, "the failpoint did not fire"
            run = await completed(stub, run_id)  # the other engine takes the run over
            await stub.SignalRun(
                engine_pb2.SignalRunRequest(
                    run_id=run_id, name="go", payload=to_value({"n": 2}), signal_id="one"
                ),
                timeout=30,
            )  # a repeat after the end: answered as it was
        assert from_value(run.final_snapshot)["main"]["payload"] == {"n": 1}
        assert [a.attempt for a in run.steps[0].attempts] == [0, 1]
        assert await consumed(store, run_id) == ["one"]
        assert collections.Counter(read_io_log(io_log)) == {(run_id, "after-go"): 1}
    finally:
        await doomed.kill()
        assert await other.terminate() == 0


async def test_signal_sent_while_no_engine_drives_the_run_is_consumed_once_after_a_restart(
    store: ServiceProcess, tmp_path: Path
) -> None:
    io_log = str(tmp_path / "io.log")
    doomed = await start_engine_process(store.address, io_log=io_log)
    async with engine_stub(doomed.address) as stub:
        run_id = await start_waiting_run(stub, {"timeout": 3600})
    await doomed.kill()
    before = [d for t, d in await stream(store, f"run:{run_id}") if t == "SignalAwaited"]
    # An engine that drives nothing (no recovery on start-up) serves the signal: nobody consumes it yet.
    courier = await start_engine(
        EngineConfig(listen="127.0.0.1:0", store=store.address, recover_on_start=False)
    )
    try:
        async with engine_stub(f"127.0.0.1:{courier.port}") as stub:
            for _ in range(2):  # twice with one id: one signal
                sent = await stub.SignalRun(
                    engine_pb2.SignalRunRequest(
                        run_id=run_id, name="go", payload=to_value("late"), signal_id="s"
                    ),
                    timeout=30,
                )
                assert sent.inbox_seq == 1
            run = (await stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id), timeout=30)).run
            assert run.status == engine_pb2.RUN_STATUS_RUNNING
    finally:
        await courier.drain(0.5)
    assert await consumed(store, run_id) == []
    survivor = await start_engine_process(store.address, io_log=io_log)
    try:
        async with engine_stub(survivor.address) as stub:
            run = await completed(stub, run_id)
        assert from_value(run.final_snapshot)["main"]["payload"] == "late"
        assert await consumed(store, run_id) == ["s"]
        assert collections.Counter(read_io_log(io_log)) == {(run_id, "after-go"): 1}
        waits = [d for t, d in await stream(store, f"run:{run_id}") if t == "SignalAwaited"]
        # The rerun waited until the deadline the first attempt recorded, not a new one.
        assert len(before) == 1 and {w["deadline_us"] for w in waits} == {before[0]["deadline_us"]}
        assert [w["attempt"] for w in waits] == [0, 1]
    finally:
        assert await survivor.terminate() == 0


async def test_many_runs_wait_on_one_engine_and_each_gets_its_own_signal(store: ServiceProcess) -> None:
    engine = await start_engine_process(store.address)
    try:
        async with engine_stub(engine.address) as stub:
            run_ids = [await start_waiting_run(stub) for _ in range(5)]
            for n, run_id in enumerate(run_ids):
                await stub.SignalRun(
                    engine_pb2.SignalRunRequest(run_id=run_id, name="go", payload=to_value(n)), timeout=30
                )
            runs = [await completed(stub, run_id) for run_id in run_ids]
        assert [from_value(run.final_snapshot)["main"]["payload"] for run in runs] == list(range(5))
        for run_id in run_ids:
            assert len(await consumed(store, run_id)) == 1
    finally:
        assert await engine.terminate() == 0
