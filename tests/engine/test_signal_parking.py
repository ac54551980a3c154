"""keel.wait_signal parks its attempt: no coroutine waits for the signal, and it is delivered once.

Real store and engines (in this process on 127.0.0.1:0, or as subprocesses SIGKILLed); each test
judges what the run stream records (RunParked, StepWaiting, the consuming facts), never wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from keel.engine.v1 import engine_pb2, engine_pb2_grpc
from keel.store.v1 import store_pb2, store_pb2_grpc

import engine_service.builtin_ops
from engine_service.domain import (
    COMPLETED,
    DEFAULT_REGISTRY,
    BuildProvenance,
    FactRecorded,
    RunManifest,
    TransportRegistry,
    make_run_config,
    single_op_pipeline,
)
from engine_service.domain.events import RunParked, RunResumed
from engine_service.domain.signals import Signal, encode_signal
from engine_service.domain.streams import run_stream_id, signals_stream_id
from engine_service.domain.waits import PARK_AFTER_US
from engine_service.failpoints import Failpoints
from engine_service.runtime.environment import RunEnvironment
from engine_service.runtime.kernel import Engine
from engine_service.store import AppendResult, InMemoryEventLog
from engine_service.store.grpc_client import StoreClient
from keel_core.clock import now_us
from keel_core.json_values import from_struct, to_value
from tests.engine.conftest import Cluster, gate, start_test_engine
from tests.engine.processes import ServiceProcess, eventually, start_engine_process, start_store_process
from tests.engine.test_signal_crashes import stream as store_events
from tests.engine.test_signals import consumed, finished, output, pipeline, run_events, signal, wait_step

if TYPE_CHECKING:
    from keel.engine.v1.engine_pb2_grpc import EngineServiceAsyncStub

WAIT = 60.0
_ = engine_service.builtin_ops  # keel.wait_signal


def of_type(events: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    """The payloads of the events of one type."""
    return [data for name, data in events if name == kind]


async def until_parked(cluster: Cluster, run_id: str) -> None:
    """Until the run's stream is labelled parked."""

    async def parked() -> bool:
        head = await cluster.store_stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=f"run:{run_id}"))
        return head.status == store_pb2.STREAM_STATUS_PARKED

    await eventually(parked, "the run parked", within=WAIT, poll=0.02)


async def test_a_run_waiting_for_a_signal_is_parked_and_completes_once_when_it_comes(
    cluster: Cluster,
) -> None:
    after = engine_pb2.Step(step_id="after", op_id="keel.echo", depends_on=["approve"])
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("approve", "approval", timeout=3600), after))
    )
    run_id = started.run_id
    await until_parked(cluster, run_id)
    engine = cluster.engine.engine
    assert engine is not None
    # Its driver ends once RunParked landed and a last look found no signal: no coroutine holds it.
    await eventually(lambda: run_id not in engine.drivers, "the driver ended", within=WAIT, poll=0.01)
    head = await cluster.store_stub.HeadSeq(store_pb2.HeadSeqRequest(stream_id=f"run:{run_id}"))
    assert head.status == store_pb2.STREAM_STATUS_PARKED
    run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
    assert run.status == engine_pb2.RUN_STATUS_RUNNING
    step = run.steps[0]
    assert step.status == engine_pb2.STEP_STATUS_WAITING
    assert (step.waiting_for_signal.name, step.waiting_for_signal.fact_key) == ("approval", "approve.signal")
    assert step.waiting_for_signal.HasField("timeout_at") and step.waiting_for_signal.HasField("since")
    wait = step.attempts[-1].wait
    assert wait.kind == "signal" and from_struct(wait.detail)["name"] == "approval"
    assert wait.until.ToMicroseconds() == step.waiting_for_signal.timeout_at.ToMicroseconds()
    sent = await signal(cluster, run_id, "approval", {"by": "ada"}, "sig-1")
    again = await signal(cluster, run_id, "approval", {"by": "ada"}, "sig-1")
    assert sent.created and not again.created and again.inbox_seq == sent.inbox_seq
    run = await finished(cluster, run_id)
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED
    assert output(run, "approve") == {"by": "ada"}
    assert not any(s.HasField("waiting_for_signal") for s in run.steps)
    events = await run_events(cluster, run_id)
    assert [c["signal_id"] for c in await consumed(cluster, run_id)] == ["sig-1"]
    assert [e["attempt"] for e in of_type(events, "StepCompleted") if e["step_id"] == "approve"] == [0]
    assert of_type(events, "RunParked") and of_type(events, "RunResumed")
    assert not of_type(events, "SignalAwaited")  # StepWaiting's detail says what it waits for


async def parked_here(cluster: Cluster) -> tuple[str, Engine]:
    """A run of one step waiting for signal `go` on the cluster's engine, parked, its driver ended."""
    started = await cluster.stub.StartRun(engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "go"))))
    run_id = started.run_id
    await until_parked(cluster, run_id)
    engine = cluster.engine.engine
    assert engine is not None
    await eventually(lambda: run_id not in engine.drivers, "the driver ended", within=WAIT, poll=0.01)
    return run_id, engine


async def test_a_run_woken_here_does_not_read_back_the_snapshot_it_parked_with(cluster: Cluster) -> None:
    # The engine stored the run's start snapshot itself: its store client still holds the bytes.
    run_id, engine = await parked_here(cluster)
    store = engine.env.store
    assert isinstance(store, StoreClient)
    before = store.calls["GetArtifact"]
    await signal(cluster, run_id, "go", "now", "n")
    run = await finished(cluster, run_id)
    assert run.status == engine_pb2.RUN_STATUS_COMPLETED and output(run, "w") == "now"
    assert store.calls["GetArtifact"] == before


async def test_a_run_parked_here_is_woken_here_at_once_even_after_a_recovery_scan(cluster: Cluster) -> None:
    run_id, engine = await parked_here(cluster)
    # A scan lists active runs only; the parked run's implicit lease is still this engine's, and a
    # wake-up here takes it up now (not once that lease expired, a ttl after the run started).
    await engine.recovery.recover()
    assert await engine.wake_run(run_id)
    await signal(cluster, run_id, "go", "now", "n")
    run = await finished(cluster, run_id)
    assert output(run, "w") == "now"
    assert [c["signal_id"] for c in await consumed(cluster, run_id)] == ["n"]


async def test_two_parked_branches_waiting_for_one_name_never_take_the_same_signal(cluster: Cluster) -> None:
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("a", "x"), wait_step("b", "x")))
    )
    run_id = started.run_id
    await until_parked(cluster, run_id)
    await signal(cluster, run_id, "x", "p", "p")
    await signal(cluster, run_id, "x", "q", "q")
    run = await finished(cluster, run_id)
    assert sorted([output(run, "a"), output(run, "b")]) == ["p", "q"]
    assert sorted(c["signal_id"] for c in await consumed(cluster, run_id)) == ["p", "q"]


async def test_a_signal_served_by_another_engine_wakes_a_wait_driven_here_through_the_subscription(
    cluster: Cluster,
) -> None:
    door = f"held-{uuid.uuid4()}"
    hold = engine_pb2.Step(step_id="hold", op_id="test.gated", op_config=to_value({"gate": door}))
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(hold, wait_step("w", "go")))
    )
    run_id = started.run_id
    await gate(door).wait_for(1)  # "hold" runs: the run is driven here, not parked

    async def waiting() -> bool:
        return any(e["step_id"] == "w" for e in of_type(await run_events(cluster, run_id), "StepWaiting"))

    await eventually(waiting, "w waits", within=WAIT, poll=0.02)
    other = await start_test_engine(cluster.store_address)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as channel:
            other_stub = engine_pb2_grpc.EngineServiceStub(channel)
            await other_stub.SignalRun(
                engine_pb2.SignalRunRequest(run_id=run_id, name="go", payload=to_value(7), signal_id="g")
            )

        # The other engine cannot take the run (its lease is here) nor make it due (it is not
        # parked): only this engine's signal-wakeups subscription tells its driver.
        async def w_completed() -> bool:
            return any(
                e["step_id"] == "w" for e in of_type(await run_events(cluster, run_id), "StepCompleted")
            )

        await eventually(w_completed, "w completes while hold still runs", within=WAIT, poll=0.02)
        assert not gate(door).opened.is_set()
    finally:
        gate(door).opened.set()
        await other.drain(0.5)
    run = await finished(cluster, run_id)
    assert output(run, "w") == 7
    assert [c["signal_id"] for c in await consumed(cluster, run_id)] == ["g"]


async def test_a_parked_wait_times_out_and_the_retry_policy_waits_again_with_a_fresh_deadline(
    cluster: Cluster,
) -> None:
    seconds = 3.0
    assert seconds * 1e6 > 2 * PARK_AFTER_US  # long enough to park, even on a slow machine
    twice = engine_pb2.RunConfig(
        retry_policy=engine_pb2.RetryPolicy(max_attempts=2, initial_backoff=duration_pb2.Duration(nanos=1000))
    )
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(
            pipeline=pipeline(wait_step("w", "never", timeout=seconds)), run_config=twice
        )
    )
    run = await finished(cluster, started.run_id)
    assert run.status == engine_pb2.RUN_STATUS_FAILED
    assert run.error.code == "signal_timeout" and run.error.retryable
    events = await run_events(cluster, started.run_id)
    waits = of_type(events, "StepWaiting")
    failures = of_type(events, "StepAttemptFailed")
    assert [w["attempt"] for w in waits] == [f["attempt"] for f in failures] == [0, 1]
    assert [f["error"]["code"] for f in failures] == ["signal_timeout"] * 2
    for wait, failure in zip(waits, failures, strict=True):
        assert wait["wait"]["kind"] == "signal"
        assert failure["at_us"] >= wait["wait"]["until_us"]  # never before its deadline
    # The retry waited afresh: its deadline counts from after the first one timed out.
    assert waits[1]["wait"]["until_us"] - int(seconds * 1e6) >= failures[0]["at_us"]
    assert len(of_type(events, "RunParked")) >= 2  # each attempt parked while it waited
    assert len(of_type(events, "RunCompleted")) == 1
    assert await consumed(cluster, started.run_id) == []


async def test_a_run_deadline_reached_while_parked_on_a_signal_fails_the_run_once(cluster: Cluster) -> None:
    # Far enough for the run to park (it parks when its deadline is PARK_AFTER_US away or more).
    config = engine_pb2.RunConfig(execution_timeout=duration_pb2.Duration(seconds=5))
    started = await cluster.stub.StartRun(
        engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "never")), run_config=config)
    )
    await until_parked(cluster, started.run_id)
    run = await finished(cluster, started.run_id)
    assert run.status == engine_pb2.RUN_STATUS_FAILED and run.error.code == "run_timeout"
    events = await run_events(cluster, started.run_id)
    [begun] = of_type(events, "RunStarted")
    deadline = begun["at_us"] + 5_000_000
    assert of_type(events, "RunParked")[0]["due_at_us"] == deadline  # parked until the deadline
    [failure] = of_type(events, "StepAttemptFailed")
    assert failure["error"]["code"] == "run_timeout" and failure["at_us"] >= deadline
    [completed] = of_type(events, "RunCompleted")
    assert completed["status"] == "failed" and completed["at_us"] >= deadline


@contextlib.asynccontextmanager
async def engine_stub(address: str) -> AsyncIterator[EngineServiceAsyncStub]:
    """An EngineService stub on `address`."""
    channel = grpc.aio.insecure_channel(address)
    try:
        yield engine_pb2_grpc.EngineServiceStub(channel)
    finally:
        await channel.close(grace=None)


async def parked_in(store: ServiceProcess, run_id: str) -> None:
    """Until the run's stream is labelled parked."""

    async def parked() -> bool:
        async with grpc.aio.insecure_channel(store.address) as channel:
            head = await store_pb2_grpc.StoreServiceStub(channel).HeadSeq(
                store_pb2.HeadSeqRequest(stream_id=f"run:{run_id}"), timeout=30
            )
        return head.status == store_pb2.STREAM_STATUS_PARKED

    await eventually(parked, "the run parked", within=WAIT, poll=0.05)


def signal_request(run_id: str, payload: Any, signal_id: str) -> engine_pb2.SignalRunRequest:
    """SignalRun of `go`."""
    return engine_pb2.SignalRunRequest(
        run_id=run_id, name="go", payload=to_value(payload), signal_id=signal_id
    )


@pytest.mark.slow
async def test_signals_reach_parked_runs_once_through_engine_deaths_and_restarts(tmp_path: Path) -> None:
    store = await start_store_process(tmp_path / "store")
    engines: list[ServiceProcess] = []
    try:
        first = await start_engine_process(store.address)
        engines.append(first)
        start = engine_pb2.StartRunRequest(pipeline=pipeline(wait_step("w", "go", timeout=3600)))
        async with engine_stub(first.address) as stub:
            during = (await stub.StartRun(start, timeout=30)).run_id
            lonely = (await stub.StartRun(start, timeout=30)).run_id
            await parked_in(store, during)
            await parked_in(store, lonely)
            # During the parked wait, twice with one id: one signal, consumed once.
            for _ in range(2):
                await stub.SignalRun(signal_request(during, "d", "one"), timeout=30)
            awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=during), timeout=WAIT)
        assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
        await first.kill()
        # No engine runs now. An engine serves SignalRun and dies once the inbox append is durable,
        # before it wakes the run: the append's nudge (the run due now) is all that is left.
        courier = await start_engine_process(store.address, failpoints="after_signal_sent")
        engines.append(courier)
        async with engine_stub(courier.address) as stub:
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.SignalRun(signal_request(lonely, "l", "two"), timeout=30)
        assert await asyncio.wait_for(courier.process.wait(), 30) == -9, "the failpoint did not fire"
        restarted = await start_engine_process(store.address)
        engines.append(restarted)
        async with engine_stub(restarted.address) as stub:
            # The client's retry of the unanswered call: a repeat, which wakes nothing itself.
            repeat = await stub.SignalRun(signal_request(lonely, "l", "two"), timeout=30)
            assert not repeat.created
            awaited = await stub.AwaitRun(engine_pb2.AwaitRunRequest(run_id=lonely), timeout=WAIT)
        assert awaited.done and awaited.run.status == engine_pb2.RUN_STATUS_COMPLETED
        for run_id, payload, signal_id in [(during, "d", "one"), (lonely, "l", "two")]:
            events = await store_events(store, f"run:{run_id}")
            facts = [
                d["response"] for t, d in events if t == "FactRecorded" and d["namespace"] == "keel.signal"
            ]
            assert [(f["signal_id"], f["payload"]) for f in facts] == [(signal_id, payload)]
            assert len(await store_events(store, f"signals:{run_id}")) == 1
            assert [d["attempt"] for t, d in events if t == "StepCompleted"] == [0]
    finally:
        for engine in engines:
            await engine.kill()
        await store.kill()


class SignalBeforeParkLog(InMemoryEventLog):
    """An event log that puts a signal in the run's inbox just before the run's RunParked lands, as
    another engine serving SignalRun would, but without any wake-up (neither the SignalWoken its
    subscription hears nor its wake_soon): what is left is the driver's look after parking."""

    def __init__(self) -> None:
        super().__init__()
        self.run_id = ""
        self.armed = True

    async def append(
        self, stream_id: str, events: Sequence[tuple[str, bytes]], *, expected_seq: int | None, **kw: Any
    ) -> AppendResult:
        if stream_id == run_stream_id(self.run_id) and self.armed and "RunParked" in [t for t, _ in events]:
            self.armed = False
            sent = encode_signal(Signal("late", "go", "just in time", at_us=now_us()))
            await super().append(signals_stream_id(self.run_id), [sent], expected_seq=None)
        return await super().append(stream_id, events, expected_seq=expected_seq, **kw)


async def test_a_signal_that_comes_while_the_driver_decides_to_park_is_consumed_at_once() -> None:
    log = SignalBeforeParkLog()
    env = RunEnvironment(log, DEFAULT_REGISTRY, TransportRegistry(), Failpoints.parse(""))
    kernel = Engine(env, BuildProvenance("test", "3", "none"), checkpoint_linger=0.0, engine_id="mem")
    pipeline = single_op_pipeline("keel.wait_signal", "1", {"name": "go"})
    manifest = RunManifest(
        pipeline, None, {}, make_run_config(max_attempts=1), BuildProvenance("t", "3", "n")
    )
    try:
        log.run_id = str(uuid.uuid4())
        await kernel.start_run(manifest, log.run_id)
        # Parked until its re-check (5 minutes) unless the driver looks at its waits once parked.
        deadline = time.monotonic() + WAIT
        while not await kernel.await_run(log.run_id, 1.0):
            assert time.monotonic() < deadline
        view = await kernel.views.run_view(log.run_id)
        assert view.status == COMPLETED and not log.armed
        events = [stored.event for stored in (await kernel.reader.read_history(log.run_id))[0]]
        facts = [e for e in events if isinstance(e, FactRecorded)]
        assert [f.response["signal_id"] for f in facts] == ["late"]
        # It parked, saw the signal, and went on at once.
        assert [type(e).__name__ for e in events if isinstance(e, RunParked | RunResumed)] == [
            "RunParked",
            "RunResumed",
        ]
    finally:
        await kernel.stop()
