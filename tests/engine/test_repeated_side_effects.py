"""A call that returned an answer is not repeated while its engine is alive (issue 10, items 1-4).

Real processes throughout: a store (or two replicas on one PostgreSQL schema), engines with the
test ops, and the gated transport of tests/engine/crash_ops.py, whose call stays in flight until the
test opens its gate. Its log (one line per call that reached it, fsynced) is the ground truth.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

from engine_service import EngineConfig, start_engine
from engine_service.domain import StepAttemptStarted
from engine_service.domain.events import decode_event
from keel_core.json_values import to_value
from tests.engine.crash_ops import IO_LOG_ENV, read_dedup_log, read_io_log
from tests.engine.processes import (
    ServiceProcess,
    eventually,
    start_engine_process,
    start_postgres_store_process,
    start_store_process,
)
from tests.store.postgres_schemas import fresh_schema

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub

pytestmark = pytest.mark.slow

STEP = "call"


def gated_pipeline(gate: Path) -> engine_pb2.Pipeline:
    """One step making one call through the gated transport (in flight until `gate` exists)."""
    return engine_pb2.Pipeline(
        pipeline_id="gated",
        steps=[
            engine_pb2.Step(step_id=STEP, op_id="test.gated_call", op_config=to_value({"gate": str(gate)}))
        ],
    )


@contextlib.asynccontextmanager
async def engine_stub(address: str) -> AsyncIterator[EngineServiceAsyncStub]:
    """A stub for the API of the engine at `address`, its channel closed after."""
    async with grpc.aio.insecure_channel(address) as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)


async def start_gated_run(engine: str, gate: Path, *, run_id: str = "") -> str:
    """Start a run of the gated pipeline (RunStarted durable when this returns)."""
    request = engine_pb2.StartRunRequest(pipeline=gated_pipeline(gate), run_id=run_id)
    async with engine_stub(engine) as stub:
        started = await stub.StartRun(request, timeout=30)
    return started.run_id


async def await_completed(engine: str, run_id: str) -> None:
    """Wait for the run to finish, through `engine`; it must have completed."""
    async with engine_stub(engine) as stub:
        while True:
            try:
                awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=run_id), timeout=60)
            except grpc.aio.AioRpcError as error:
                # The store may not answer the engine for a while (items 1 and 3): ask again.
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                continue
            if awaited.done:
                break
    assert awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED, awaited.run


def calls(io_log: str) -> collections.Counter[tuple[str, str]]:
    """How often each (run, fact key) reached a transport."""
    return collections.Counter(read_io_log(io_log))


async def call_in_flight(io_log: str, run_id: str) -> None:
    """Wait until the run's call has reached the gated transport."""
    await eventually(
        lambda: calls(io_log)[(run_id, f"{STEP}-gated")] > 0,
        "the call reached the transport",
        within=60,
        poll=0.05,
    )


def is_stopped(process: ServiceProcess) -> bool:
    """Whether the process is stopped (SIGSTOP): state T in /proc."""
    with open(f"/proc/{process.process.pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


async def test_store_down_while_a_call_is_in_flight_the_answer_is_recorded_when_it_is_back(
    tmp_path: Path,
) -> None:
    # Item 1: the engine outlives the store's absence (and its lease's trust) holding the answer.
    data, io_log, gate = tmp_path / "store", str(tmp_path / "io.log"), tmp_path / "gate"
    store = await start_store_process(data)
    engine = await start_engine_process(store.address, io_log=io_log, lease_ttl=1.0)
    try:
        run_id = await start_gated_run(engine.address, gate)
        await call_in_flight(io_log, run_id)
        await store.kill()
        # Two ttls: the lease can be neither trusted nor renewed meanwhile.
        await asyncio.sleep(2.0)
        gate.touch()  # the transport answers while the store is down and the lease untrusted
        await asyncio.sleep(1.0)
        store = await start_store_process(data, port=store.port)
        await await_completed(engine.address, run_id)
        assert calls(io_log) == {(run_id, f"{STEP}-gated"): 1}
    finally:
        assert await engine.terminate() == 0
        await store.kill()


async def test_a_lease_lost_while_the_answer_waits_for_the_store_does_not_drop_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Item 1, the engine's lease upkeep giving up on the absent store (patience 1 s) while the
    # answer's append waits for it: the lease is lost and the driver cancelled, but the answer
    # is recorded when the store is back. In this process, to see the lease go.
    data, io_log, gate = tmp_path / "store", str(tmp_path / "io.log"), tmp_path / "gate"
    monkeypatch.setenv(IO_LOG_ENV, io_log)
    store = await start_store_process(data)
    config = EngineConfig(
        listen="127.0.0.1:0", store=store.address, failpoints="", lease_ttl=1.0, store_patience=1.0
    )
    handle = await start_engine(config)
    assert handle.engine is not None
    leases = handle.engine.leases
    served = f"127.0.0.1:{handle.port}"
    try:
        run_id = await start_gated_run(served, gate)
        await call_in_flight(io_log, run_id)
        await store.kill()
        gate.touch()  # the answer comes while the store is down
        await eventually(lambda: run_id not in leases.held, "the lease was lost", within=60, poll=0.05)
        store = await start_store_process(data, port=store.port)
        await await_completed(served, run_id)
        assert calls(io_log) == {(run_id, f"{STEP}-gated"): 1}
    finally:
        await handle.drain(1.0)
        await store.kill()


async def test_a_lease_lost_while_a_call_is_in_flight_does_not_cut_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in the chaos test on PostgreSQL: the engine's implicit lease could not be recorded (the
    # store away) while a call was in flight, so its driver was stopped; that cancelled the call,
    # and the engine resumed the run later and called again. A lost lease is not a takeover: the
    # call goes on, its answer is recorded once the store is back, and nothing is called twice.
    data, io_log, gate = tmp_path / "store", str(tmp_path / "io.log"), tmp_path / "gate"
    monkeypatch.setenv(IO_LOG_ENV, io_log)
    store = await start_store_process(data)
    config = EngineConfig(
        listen="127.0.0.1:0", store=store.address, failpoints="", lease_ttl=1.0, store_patience=1.0
    )
    handle = await start_engine(config)
    assert handle.engine is not None
    leases = handle.engine.leases
    served = f"127.0.0.1:{handle.port}"
    try:
        run_id = await start_gated_run(served, gate)
        await call_in_flight(io_log, run_id)
        await store.kill()
        await eventually(lambda: run_id not in leases.held, "the lease was lost", within=60, poll=0.05)
        gate.touch()  # only now does the call answer: it was in flight through the loss
        store = await start_store_process(data, port=store.port)
        await await_completed(served, run_id)
        assert calls(io_log) == {(run_id, f"{STEP}-gated"): 1}
    finally:
        await handle.drain(1.0)
        await store.kill()


async def test_lease_trust_lapsing_with_nobody_taking_over_keeps_the_answer(tmp_path: Path) -> None:
    # Item 2: a 1.7 s pause at ttl 2 while the call is in flight; no other engine exists.
    data, io_log, gate = tmp_path / "store", str(tmp_path / "io.log"), tmp_path / "gate"
    store = await start_store_process(data)
    engine = await start_engine_process(store.address, io_log=io_log, lease_ttl=2.0)
    try:
        run_id = await start_gated_run(engine.address, gate)
        await call_in_flight(io_log, run_id)
        engine.process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(1.7)  # past the lease's trust (ttl - margin = 1.6 s after its last renewal)
        gate.touch()  # the answer is there the moment the engine runs again
        engine.process.send_signal(signal.SIGCONT)
        await await_completed(engine.address, run_id)
        assert calls(io_log) == {(run_id, f"{STEP}-gated"): 1}
    finally:
        engine.process.send_signal(signal.SIGCONT)
        assert await engine.terminate() == 0
        await store.kill()


async def test_a_stalled_store_replica_costs_a_healthy_engine_no_lease(
    postgres_dsn: str, tmp_path: Path
) -> None:
    # Item 3: one of two replicas SIGSTOPped while a call is in flight, a second engine ready to
    # take the run over should the first one's heartbeats not land in time.
    io_log, gate = str(tmp_path / "io.log"), tmp_path / "gate"
    async with fresh_schema(postgres_dsn) as schema:
        stores = [await start_postgres_store_process(postgres_dsn, schema) for _ in range(2)]
        addresses = ",".join(store.address for store in stores)
        engines = [
            await start_engine_process(addresses, io_log=io_log, lease_ttl=2.0, engine_id=f"engine-{n}")
            for n in range(2)
        ]
        try:
            run_id = await start_gated_run(engines[0].address, gate)
            await call_in_flight(io_log, run_id)
            stores[1].process.send_signal(signal.SIGSTOP)
            # Many heartbeats (one every ttl/4), each with well under 10 s of patience.
            await asyncio.sleep(6.0)
            gate.touch()
            await await_completed(engines[0].address, run_id)
            assert calls(io_log) == {(run_id, f"{STEP}-gated"): 1}
            async with grpc.aio.insecure_channel(stores[0].address) as channel:
                reader = store_pb2_grpc.StoreServiceStub(channel)
                lease = await reader.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"lease:{run_id}"))
            assert [e.type for e in lease.events] == ["LeaseAcquired"]  # never changed hands
        finally:
            stores[1].process.send_signal(signal.SIGCONT)
            for engine in engines:
                await engine.kill()
            for store in stores:
                await store.kill()


async def test_a_paused_engine_enters_no_transport_after_a_takeover_and_transports_get_fencing(
    tmp_path: Path,
) -> None:
    # Item 4: engine A stops itself after its attempt is durable and before it calls the transport;
    # engine B takes the run over and makes the call; A, continued, must not call.
    data, io_log, gate = tmp_path / "store", str(tmp_path / "io.log"), tmp_path / "gate"
    gate.touch()  # calls answer at once here
    a_log = str(tmp_path / "a.log")
    store = await start_store_process(data)
    paused = await start_engine_process(
        store.address,
        io_log=io_log,
        engine_id="engine-a",
        failpoints=f"pause_before_transport_call:{STEP}",
        log_path=a_log,
    )
    taker = await start_engine_process(store.address, io_log=io_log, engine_id="engine-b")
    try:
        run_id = str(uuid.uuid4())
        # A may stop itself before it answers: the start is not awaited (RunStarted is seen instead).
        starting = asyncio.create_task(start_gated_run(paused.address, gate, run_id=run_id))
        await eventually(lambda: is_stopped(paused), "engine A paused itself", within=60, poll=0.05)
        await await_completed(taker.address, run_id)
        paused.process.send_signal(signal.SIGCONT)
        await eventually(
            lambda: "stopped driving it here" in Path(a_log).read_text(encoding="utf-8"),
            "engine A stopped driving the run",
            within=60,
            poll=0.1,
        )
        assert calls(io_log) == {(run_id, f"{STEP}-gated"): 1}
        async with grpc.aio.insecure_channel(store.address) as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            page = await stub.ReadEvents(store_pb2.ReadEventsRequest(stream_id=f"run:{run_id}"))
        started = {}
        for event in page.events:
            decoded = decode_event(event.type, event.payload)
            if isinstance(decoded, StepAttemptStarted):
                started[(decoded.step_id, decoded.attempt)] = event.seq  # the last one: the claim
        [got] = read_dedup_log(io_log)
        assert got == {
            "run_id": run_id,
            "fact_key": f"{STEP}-gated",
            "step_id": STEP,
            "attempt": got["attempt"],
            "fencing": started[(STEP, got["attempt"])],
        }
        assert got["fencing"] == max(started.values())  # the taker's claim, not A's attempt
        with contextlib.suppress(grpc.aio.AioRpcError):
            await starting
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(paused.process.pid, signal.SIGCONT)
        await paused.kill()
        assert await taker.terminate() == 0
        await store.kill()
